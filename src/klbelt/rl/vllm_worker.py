"""Old path of :mod:`klbelt.rl.sampling.vllm_worker` (the vLLM side of the ``vllm`` sampler); it keeps working."""

from .sampling.vllm_worker import generate, init, load, main  # noqa: F401

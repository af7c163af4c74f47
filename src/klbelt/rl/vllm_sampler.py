"""Old path of :mod:`klbelt.rl.sampling.vllm` (sampler ``"vllm"``); it keeps working."""

from .sampling.vllm import ENV_PYTHON, SETUP, WORKER, VLLMSampler, merged_state_dict, resolve_python  # noqa: F401

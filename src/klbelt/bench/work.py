"""The work every side of a trainer benchmark does, built the same way in each measuring process.

Two workloads:

* :func:`gpt2_work` (``klbelt bench trainer``): a random GPT-2 policy of the spec's size, a
  frozen reference (a copy), a GPT-2 sequence-classifier reward model, a word-level
  tokenizer and random prompts, all from one seed. Nothing is downloaded.
* :func:`english_work` (``klbelt bench trainer --model ...``): the English demo's model,
  tokenizer, training prompts and config (``ENGLISH_DEMO_CONFIG``, beta 0.1 fixed).
"""

from __future__ import annotations


def word_tokenizer(vocab: int):
    """A word-level PreTrainedTokenizerFast: words w0..w{V-3}, <eos>, <pad> (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 2)] + ["<eos>", "<pad>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def gpt2_work(spec: dict):
    """Tokenizer, prompts, and the shared models: policy, reference (a copy) and reward model."""
    import copy

    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tok = word_tokenizer(spec["vocab"])
    config = GPT2Config(
        vocab_size=spec["vocab"], n_positions=max(64, spec["prompt_len"] + spec["response_tokens"]), n_embd=spec["dim"],
        n_layer=spec["layers"], n_head=spec["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_labels=1,
    )
    torch.manual_seed(spec["seed"])
    policy = GPT2LMHeadModel(config).eval()
    ref = copy.deepcopy(policy)
    torch.manual_seed(spec["seed"] + 1)
    reward = GPT2ForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(spec["seed"] + 2)
    ids = torch.randint(0, spec["vocab"] - 2, (256, spec["prompt_len"]), generator=g)
    prompts = [" ".join(f"w{i}" for i in row) for row in ids.tolist()]
    return tok, prompts, policy, ref, reward


def prewarm(policy, reward, prompt_ids) -> None:
    """Run every kind of pass once on throwaway copies, so code pages, thread pools and allocator
    arenas that any trainer needs are resident before the memory baseline is taken (both sides alike)."""
    import copy
    import gc

    import torch

    from klbelt.rl.hf import cache_kwarg, returned_cache

    model = copy.deepcopy(policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with torch.no_grad():
        out = model(input_ids=prompt_ids, use_cache=True)
        model(input_ids=prompt_ids[:, -1:], use_cache=True, **{cache_kwarg(model): returned_cache(out)})
        reward(input_ids=prompt_ids)
    model(input_ids=prompt_ids).logits.float().log_softmax(-1).mean().backward()
    opt.step()
    del model, opt, out
    gc.collect()


SMOLLM2_SHAPED = "smollm2-shaped"  # SmolLM2-135M's architecture, random weights, the tiny model's tokenizer
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True)


def smollm2_shaped(layers: int | None = None, hidden: int | None = None):
    """``(model, tokenizer)``: a Llama of SmolLM2-135M's shape (``layers``/``hidden`` smaller for tests), randomly
    initialised from seed 0, over the tiny demo model's tokenizer (1024 tokens: 107M parameters). Nothing downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from klbelt.demo.models import load_model

    _, tok = load_model("tiny")
    shape = dict(SMOLLM2_SHAPE)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    if hidden is not None:  # 9 heads of 64 scaled down: 3 heads (1 key/value head) of hidden / 3
        shape.update(hidden_size=hidden, intermediate_size=8 * hidden // 3, num_attention_heads=3, num_key_value_heads=1,
                     head_dim=hidden // 3)
    rope_theta = shape.pop("rope_theta")
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         **shape)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


def english_work(spec: dict):
    """``(model, tokenizer, prompts, cfg)``: the English demo's update, beta 0.1 fixed, ``spec["bf16"]``, on
    ``spec["device"]`` (default CPU), ``spec["advantage"]`` (default the demo's group baseline), ``spec["batch_size"]``
    (default the demo's). Model ``"smollm2-shaped"``: :func:`smollm2_shaped` (``spec["layers"]``,
    ``spec["hidden"]`` optional)."""
    from dataclasses import replace

    import torch

    from klbelt.demo.english import english_prompts
    from klbelt.demo.models import load_model
    from klbelt.demo.task import ENGLISH_DEMO_CONFIG

    torch.manual_seed(0)
    if spec["model"] == SMOLLM2_SHAPED:
        model, tok = smollm2_shaped(spec.get("layers"), spec.get("hidden"))
    else:
        model, tok = load_model(spec["model"])
    cfg = replace(ENGLISH_DEMO_CONFIG, model=spec["model"], controller="fixed", kl_coef=0.1, bf16=spec["bf16"],
                  batch_size=spec.get("batch_size", ENGLISH_DEMO_CONFIG.batch_size),
                  steps=spec["warmup"] + spec["updates"] + 1, checkpoint_every=10**9, samples_every=10**9,
                  device=spec.get("device", "cpu"), advantage=spec.get("advantage", ENGLISH_DEMO_CONFIG.advantage))
    return model, tok, english_prompts("train"), cfg


def english_lora_config(model, cfg):
    """peft's LoraConfig for the TRL side: klbelt's rank, alpha and target modules on ``model``."""
    from peft import LoraConfig

    from klbelt.rl.lora import LORA_TARGETS, linear_module_names

    targets = [t for t in LORA_TARGETS if t in linear_module_names(model)]
    return LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets, lora_dropout=0.0, bias="none")

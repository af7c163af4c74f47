"""Tiny, locally built Hugging Face models and tokenizers for fast trainer tests."""

from __future__ import annotations

import torch


def word_tokenizer(words: list[str]):
    """A real PreTrainedTokenizerFast over a whitespace word vocabulary (+ <eos>, <pad>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words + ["<eos>", "<pad>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def tiny_gpt2(vocab_size: int, n_layer: int = 1, n_embd: int = 16, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 2,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab_size: int, seed: int = 0, bias: bool = False, n_layer: int = 2, hidden: int = 16):
    """A random Llama (nn.Linear projections, RMSNorm, rotary, tied embeddings: SmolLM2's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
        attention_bias=bias, mlp_bias=bias, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1,
    )
    return LlamaForCausalLM(cfg).eval()

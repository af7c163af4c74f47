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

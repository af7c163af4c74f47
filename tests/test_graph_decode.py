"""The GPU's decode loop (``GraphDecoder``: static KV cache, CUDA graphs) checked on the CPU without graphs.

The graph replays exactly the static step that runs eagerly here, so the step's
maths (cache writes at the step's position, attention over the whole capacity with
the unwritten and padded keys masked, grouped key/value heads) is proven against
Hugging Face's own loop on the CPU; on a GPU ``scripts/gpu_check.sh`` runs it graphed.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_llama, word_tokenizer

WORDS = ["a", "b", "c", "d"] + [f"w{i}" for i in range(40)]


def _llama(tok):
    model = tiny_llama(len(tok), seed=5, n_layer=2, hidden=32)
    model.config.num_attention_heads, model.config.num_key_value_heads = 4, 2
    torch.manual_seed(5)
    return type(model)(model.config).eval()  # 4 query heads over 2 key/value heads (SmolLM2 groups them 3:1)


@pytest.mark.parametrize("prompts", [["a b w4 w5", "c", "w1 w2 w3", "d w9"], ["w1 w2 w3 w4 w5 w6 w7", "a", "b c", "d"]])
def test_the_static_decode_step_samples_what_hugging_faces_loop_samples(prompts):
    # imported here, not at collection: test_attention counts the fp32 attention that lean_decode binds on import
    from klbelt.rl.graph_decode import CAPACITY_STEP, GraphDecoder
    from klbelt.rl.rollout import response_logprobs, sample

    tok = word_tokenizer(WORDS)
    model = _llama(tok)
    decoder = GraphDecoder(model, graphs=False)
    enc = tok(prompts, return_tensors="pt", padding=True)  # left padding
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for seed in range(2):  # the second rollout reuses the cache buffers
        kwargs = dict(max_new_tokens=9, generator=torch.Generator().manual_seed(seed), eos_token_id=tok.eos_token_id,
                      blocked_token_ids=(tok.convert_tokens_to_ids("w7"),))
        theirs = sample(model, ids, mask, **kwargs)
        decoder.reserve(9)
        kwargs["generator"] = torch.Generator().manual_seed(seed)
        mine = sample(decoder, ids, mask, **kwargs)
        assert torch.equal(mine.sequences, theirs.sequences) and torch.equal(mine.response_mask, theirs.response_mask)
        torch.testing.assert_close(mine.logprobs, theirs.logprobs, rtol=1e-5, atol=1e-5)
        # and the recorded log-probs are the model's own when it rescores the rollout
        torch.testing.assert_close(mine.logprobs, response_logprobs(model, mine), rtol=1e-4, atol=1e-4)
    assert len(decoder.caches) == 1 and next(iter(decoder.caches))[1] % CAPACITY_STEP == 0


def test_the_graph_decoder_refuses_what_it_cannot_run_and_a_full_cache():
    from klbelt.rl.graph_decode import CAPACITY_STEP, GraphDecoder
    from tiny_models import tiny_gpt2

    tok = word_tokenizer(WORDS)
    with pytest.raises(ValueError, match="GraphDecoder cannot run GPT2LMHeadModel: model_type 'gpt2'"):
        GraphDecoder(tiny_gpt2(len(tok)))
    decoder = GraphDecoder(_llama(tok), graphs=False)
    assert not decoder.graphs and decoder.why_no_graphs == "graphs=False"
    ids = torch.zeros(2, CAPACITY_STEP, dtype=torch.long)
    out = decoder(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match=f"{CAPACITY_STEP + 1} positions exceed the {CAPACITY_STEP} reserved"):
        decoder(input_ids=ids[:, :1], attention_mask=torch.ones(2, CAPACITY_STEP + 1, dtype=torch.long),
                position_ids=ids[:, :1], cache=out["cache"])


def test_the_merged_copy_sampler_keeps_the_cpu_decode_loop_on_the_cpu():
    from klbelt.rl.attention import set_attention
    from klbelt.rl.lean_decode import LeanDecoder
    from klbelt.rl.merged_sampler import MergedCopySampler

    tok = word_tokenizer(WORDS)
    model = _llama(tok)
    set_attention(model, "klbelt_fp32")
    sampler = MergedCopySampler(torch.float32)
    enc = tok(["a b", "c"], return_tensors="pt", padding=True)
    sampler(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=2)
    assert type(sampler.decoder) is LeanDecoder

"""The run's set-up (issue 23): one ``Run`` owns every change ``train()`` makes to the caller's models, so a
failure anywhere after set-up starts gives the models back as they were."""

from __future__ import annotations

import copy

import pytest
import torch

from klbelt.rl.attention import current
from klbelt.rl.config import TrainConfig
from klbelt.rl.distributed import World
from klbelt.rl.run import Run
from klbelt.rl.scoring import set_fused_head
from klbelt.rl.trainer import train
from tiny_models import tiny_llama, word_tokenizer

WORDS = ["a", "b", "c", "d", "e", "f"]
PROMPTS = ["a b", "c d", "e f", "b c"]


def _reward(texts):
    return torch.tensor([float(len(t)) for t in texts])


def test_a_resume_refused_in_set_up_gives_the_caller_its_attention_back(tmp_path):
    # before issue 23 the attention was switched before the trainer's try: this left the model on klbelt_fp32
    tok = word_tokenizer(WORDS)
    policy, ref = tiny_llama(len(tok), seed=1), tiny_llama(len(tok), seed=1)
    cfg = TrainConfig(steps=1, batch_size=4, max_new_tokens=3, attn_implementation="klbelt_fp32", checkpoint_every=1,
                      out=str(tmp_path / "run"))
    train(cfg, policy, tok, PROMPTS, _reward, ref_policy=ref, warn_alerts=False)
    assert current(policy) == "sdpa"
    other = tiny_llama(len(tok), seed=2)  # a different reference: the resume must be refused
    with pytest.raises(ValueError, match="reference model differs"):
        train(TrainConfig(**{**cfg.to_dict(), "steps": 2}), policy, tok, PROMPTS, _reward, ref_policy=other,
              resume=True, warn_alerts=False)
    assert current(policy) == "sdpa" and current(other) == "sdpa"


def test_a_failing_reward_in_the_loop_also_gives_the_models_back_and_never_touches_the_fused_default(tmp_path):
    tok = word_tokenizer(WORDS)
    policy = tiny_llama(len(tok), seed=3)
    before = set_fused_head(True)
    try:
        cfg = TrainConfig(steps=2, batch_size=4, max_new_tokens=3, attn_implementation="eager", fused_head=False,
                          out=str(tmp_path / "run"))

        def broken(texts):
            raise RuntimeError("reward server down")

        with pytest.raises(RuntimeError, match="reward server down"):
            train(cfg, policy, tok, PROMPTS, broken, warn_alerts=False)
        assert current(policy) == "sdpa"
        assert set_fused_head(True) is True  # the run passed fused_head=False as a parameter, not as a global
    finally:
        set_fused_head(before)


def test_the_run_undoes_its_changes_in_reverse_order_even_when_one_of_them_fails():
    cfg = TrainConfig(batch_size=4)
    undone = []
    with pytest.raises(RuntimeError, match="first undo"):
        with Run(cfg, World.current(), torch.device("cpu"), None, [], _reward) as run:
            run._undo.callback(undone.append, "first")
            run._undo.callback(lambda: (_ for _ in ()).throw(RuntimeError("first undo")))
            run._undo.callback(undone.append, "last")
    assert undone == ["last", "first"]  # every later undo ran although the one before it failed


def test_the_run_carries_one_sampling_params_from_the_config_and_the_tokenizer():
    tok = word_tokenizer(WORDS)
    tok.pad_token = tok.eos_token if tok.pad_token is None else tok.pad_token
    cfg = TrainConfig(batch_size=4, max_new_tokens=5, temperature=0.7, top_k=3, block_eos=True)
    run = Run(cfg, World.current(), torch.device("cpu"), tok, PROMPTS, _reward)
    p = run.sampling
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.filtered) == (5, 0.7, 3, 1.0, True)
    assert p.eos_token_id == tok.eos_token_id and p.blocked_token_ids == (tok.eos_token_id,)
    assert run.correction.filtered and run.correction.fused is True
    assert copy.deepcopy(p) == p

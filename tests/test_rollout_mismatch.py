"""The trainer with a sampler that is not the policy: bf16 sampling, recomputed log-probs, IS weights."""

from __future__ import annotations

import pytest
import torch

from klbelt.rl.config import TrainConfig
from klbelt.rl.losses import ppo_policy_loss
from klbelt.rl.rollout import response_logprobs, sample
from klbelt.rl.samplers import RolloutCorrection, bf16_sample
from klbelt.rl.trainer import train
from tiny_models import tiny_gpt2, word_tokenizer

WORDS = ["a", "b", "c", "d"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def model_and_rollouts():
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=64, seed=3)
    enc = tok(["a b", "c", "w1 w2 w3", "d"] * 4, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rolls = {
        name: fn(model, enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(0), **kw)
        for name, fn in (("policy", sample), ("bf16", bf16_sample))
    }
    return tok, model, rolls


def test_bf16_sampler_is_a_real_mismatch_that_the_fp32_policy_sampler_does_not_have(model_and_rollouts):
    _, model, rolls = model_and_rollouts
    results = {}
    for name, roll in rolls.items():
        old, weights, metrics = RolloutCorrection(name, "tis", cap=2.0)(model, roll, 1.0)
        fresh = response_logprobs(model, roll).detach()  # an independent fp32 forward of the same tokens
        torch.testing.assert_close(old, fresh, atol=0, rtol=0)
        mask = roll.response_mask > 0
        delta = (fresh - roll.logprobs)[mask].double()
        assert metrics["mismatch_kl"] == pytest.approx(float(-delta.mean()), abs=1e-9)
        assert metrics["mismatch_max_logratio"] == pytest.approx(float(delta.abs().max()), abs=1e-9)
        torch.testing.assert_close(weights[mask].double(), delta.exp().clamp(max=2.0), atol=1e-6, rtol=1e-6)
        assert metrics["is_weight_max"] <= 2.0
        results[name] = metrics
    assert results["policy"]["mismatch_max_logratio"] < 1e-4  # fp32 KV cache vs full forward: rounding only
    assert results["bf16"]["mismatch_max_logratio"] > 100 * results["policy"]["mismatch_max_logratio"]
    assert results["bf16"]["mismatch_k3"] > 0


def test_weighting_the_advantages_is_weighting_the_clipped_ppo_terms():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g) - 0.1
    old = lp + 0.3 * torch.randn(3, 5, generator=g)
    adv, w = torch.randn(3, 5, generator=g), 2 * torch.rand(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    loss, _ = ppo_policy_loss(lp, old, adv * w, mask, 0.2)
    ratio = (lp - old).exp()
    per_token = -w * torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    assert float(loss) == pytest.approx(float((per_token * mask).sum() / mask.sum()), rel=1e-6)


@pytest.mark.parametrize("correction", ["tis", "band"])  # off and mis: same path, weights tested above
def test_trainer_with_the_bf16_sampler_logs_the_mismatch_every_step(tmp_path, correction):
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=32, seed=1)
    cfg = TrainConfig(steps=2, batch_size=8, max_new_tokens=6, sampler="bf16", rollout_correction=correction,
                      is_band=[0.8, 1.25] if correction == "band" else None, checkpoint_every=100, out=str(tmp_path))
    history = train(cfg, model, tok, ["a b", "c d"], lambda texts: torch.tensor([float(len(t)) for t in texts]), warn_alerts=False)
    keys = ("mismatch_kl", "mismatch_k3", "mismatch_max_logratio", "is_weight_mean", "is_weight_min", "is_weight_max", "is_clipped_frac")
    for record in history:
        assert all(k in record for k in keys)
        assert record["mismatch_max_logratio"] > 0  # bf16 numerics really differ
        assert record["mismatch_k3"] >= 0
        if correction == "band":
            assert record["is_weight_max"] <= 1.25 and (record["is_weight_min"] >= 0.8 or record["is_weight_min"] == 0)


def test_mis_gives_one_weight_per_sequence_and_off_gives_none(model_and_rollouts):
    _, model, rolls = model_and_rollouts
    roll = rolls["bf16"]
    old, weights, metrics = RolloutCorrection("bf16", "mis", cap=2.0)(model, roll, 1.0)
    mask = roll.response_mask > 0
    seq_ratio = ((old - roll.logprobs) * mask).sum(-1).exp()
    expected = torch.where(seq_ratio <= 2.0, seq_ratio, 0.0)[:, None].expand_as(old) * mask
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-6)
    old_off, weights_off, metrics_off = RolloutCorrection("bf16", "off")(model, roll, 1.0)
    assert weights_off is None and metrics_off["is_clipped_frac"] == 0 and torch.equal(old_off, old)


def test_policy_sampler_without_correction_logs_no_mismatch_and_draws_the_same_tokens(model_and_rollouts):
    _, model, rolls = model_and_rollouts
    roll = rolls["policy"]
    old, weights, metrics = RolloutCorrection("policy", "off")(model, roll, 1.0)
    assert old is roll.logprobs and weights is None and metrics == {}


@pytest.mark.parametrize("bad", [dict(sampler="vllm-gpu"), dict(rollout_correction="yes"), dict(is_cap=1.0), dict(is_band=[0.5, 0.9])])
def test_bad_mismatch_config_is_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def _run(mismatch, kl=0.05, n=40):
    return [{"step": t, "kl": kl, "mismatch_kl": mismatch(t)} for t in range(n)]


def test_rollout_mismatch_rule_warns_above_its_threshold_and_is_unhealthy_when_it_drowns_the_belts_kl():
    from klbelt.monitor import RolloutMismatch, diagnose

    verdicts, alerts = diagnose(_run(lambda t: 0.02 if t >= 20 else 1e-4), [RolloutMismatch()])
    assert [(a.step, a.severity) for a in alerts] == [(22, "warning")] and verdicts[0].status == "warning"
    verdicts, alerts = diagnose(_run(lambda t: 0.02 if t < 25 else 0.08), [RolloutMismatch()])
    assert [(a.step, a.severity) for a in alerts] == [(2, "warning"), (27, "unhealthy")]
    assert verdicts[0].status == "unhealthy" and "steering sampler noise" in verdicts[0].message
    # before warmup the belt's KL is ~0 by design: no "drowned" verdict from a tiny mismatch
    verdicts, alerts = diagnose(_run(lambda t: 1e-4, kl=0.0, n=8), [RolloutMismatch()])
    assert alerts == [] and verdicts[0].status == "ok"
    verdicts, _ = diagnose([{"step": t, "kl": 0.05} for t in range(20)], [RolloutMismatch()])
    assert verdicts[0].status == "n/a"


def test_readers_map_trl_verl_and_openrlhf_mismatch_metrics_to_klbelts_names():
    from klbelt.monitor import METRICS
    from klbelt.monitor.readers import normalize_logs

    logs = {"step": 3, "sampling/sampling_logp_difference/max": 0.5, "sampling/importance_sampling_ratio/mean": 1.01,
            "rollout_corr/kl": 1e-3, "rollout_corr/k3_kl": 9e-4, "rollout_corr/rollout_is_max": 2.0, "train/vllm_kl": 2e-3}
    rec = normalize_logs(logs)
    assert rec["mismatch_max_logratio"] == 0.5 and rec["is_weight_mean"] == 1.01 and rec["mismatch_k3"] == 9e-4
    assert rec["is_weight_max"] == 2.0 and rec["mismatch_kl"] in (1e-3, 2e-3)
    assert set(rec) - {"step"} <= set(METRICS)  # every mapped name has a unit

"""Which KL the belt reports: top-k/top-p as a sampler, the exact KL at the visited states, KL in the loss
over several epochs. Each claim is checked by exact enumeration over a small vocabulary against
softmaxes computed here from the models' raw logits (float64), never through klbelt's own KL code."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from klbelt.rl.config import TrainConfig
from klbelt.rl.lora import Reference
from klbelt.rl.rollout import Rollout, response_logits, sample
from klbelt.rl.samplers import RolloutCorrection
from klbelt.rl.distributed import World
from klbelt.rl.run import Run
from klbelt.rl.update import Batch, KLInLoss, score_batch, shape_rewards_with_kl
from tiny_models import tiny_gpt2, word_tokenizer

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]
FILTERS = [dict(top_k=3), dict(top_p=0.7), dict(top_k=5, top_p=0.8)]


def mu_of(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The filtered, renormalised distribution of one row of logits, float64: top-k, then the
    smallest set of most likely tokens whose probability reaches top_p, written out by hand."""
    p = torch.softmax(logits.double(), -1)
    keep = [True] * len(p)
    if top_k:
        kth = sorted(logits.tolist(), reverse=True)[top_k - 1]
        keep = [float(z) >= kth for z in logits]
    q = torch.tensor([float(pv) if k else 0.0 for pv, k in zip(p, keep)], dtype=torch.float64)
    q = q / q.sum()
    if top_p < 1.0:
        order = sorted(range(len(q)), key=lambda i: -float(q[i]))
        mass, kept = 0.0, set()
        for i in order:
            if mass >= top_p:
                break
            kept.add(i)
            mass += float(q[i])
        q = torch.tensor([float(q[i]) if i in kept else 0.0 for i in range(len(q))], dtype=torch.float64)
        q = q / q.sum()
    return q


def _models(vocab: int):
    ref = tiny_gpt2(vocab, n_layer=1, n_embd=16, seed=1)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy, ref


def _next_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].double()


@pytest.mark.parametrize("filt", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_a_filtered_sampler_records_the_log_probs_of_the_distribution_it_draws_from(filt):
    tok = word_tokenizer(WORDS)
    policy, _ = _models(len(tok))
    enc = tok(["a b", "c", "d e f"], return_tensors="pt", padding=True)
    roll = sample(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=4, temperature=0.9,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(0), **filt)
    with torch.no_grad():
        logits = response_logits(policy, roll).double() / 0.9
    checked = 0
    for b, t in itertools.product(range(roll.responses.shape[0]), range(roll.responses.shape[1])):
        if not roll.response_mask[b, t]:
            continue
        mu = mu_of(logits[b, t], **filt)
        token = int(roll.responses[b, t])
        assert mu[token] > 0  # drawn from mu's support
        assert float(roll.logprobs[b, t]) == pytest.approx(float(mu[token].log()), abs=1e-5)
        dropped = float(torch.softmax(logits[b, t], -1)[mu == 0].sum())
        assert float(roll.filtered_mass[b, t]) == pytest.approx(dropped, abs=1e-5)
        checked += 1
    assert checked >= 6
    assert float(roll.filtered_mass.max()) > 0.05  # the filter really dropped mass


def _all_two_token_rollouts(tok, prompt: list[int], vocab: list[int]) -> Rollout:
    seqs = torch.tensor([prompt + [y1, y2] for y1 in vocab for y2 in vocab])
    n = seqs.shape[0]
    return Rollout(seqs, torch.ones_like(seqs), len(prompt), torch.ones(n, 2), torch.zeros(n, 2),
                   filtered_mass=torch.zeros(n, 2))


@pytest.mark.parametrize("filt", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_the_kl_the_controller_sees_under_top_k_or_top_p_is_the_exact_kl_at_the_visited_states(filt, tmp_path):
    """E over mu's two-token responses of the trainer's per-token KL = E_mu[KL_1 + KL_2(y1)] / 2,
    the reverse KL(pi || ref) at the states mu visits; k1 of mu's tokens, weighted by pi/mu or not, is not."""
    tok = word_tokenizer(WORDS)
    policy, ref = _models(len(tok))
    prompt = tok("a b")["input_ids"]
    vocab = list(range(len(tok)))
    T = 0.8

    def dists(model, prefix):
        z = _next_logits(model, prompt + prefix) / T
        return torch.softmax(z, -1), mu_of(z, **filt)

    def kl(p, q):
        return float((p * (p.log() - q.log())).sum())

    pi1, mu1 = dists(policy, [])
    ref1, _ = dists(ref, [])
    truth, k1_mean, wk1_mean = kl(pi1, ref1), 0.0, 0.0
    mu_y = {}
    for y1 in vocab:
        pi2, mu2 = dists(policy, [y1])
        ref2, _ = dists(ref, [y1])
        truth += float(mu1[y1]) * kl(pi2, ref2)
        for y2 in vocab:
            mu_y[y1, y2] = float(mu1[y1] * mu2[y2])
            if mu_y[y1, y2] > 0:
                lr = [float(pi1[y1].log() - ref1[y1].log()), float(pi2[y2].log() - ref2[y2].log())]
                w = [float(pi1[y1] / mu1[y1]), float(pi2[y2] / mu2[y2])]
                k1_mean += mu_y[y1, y2] * sum(lr) / 2
                wk1_mean += mu_y[y1, y2] * (w[0] * lr[0] + w[1] * lr[1]) / 2
    truth /= 2  # nats/token over the two positions

    cfg = TrainConfig(temperature=T, max_new_tokens=2, batch_size=1, out=str(tmp_path), **filt)
    roll = _all_two_token_rollouts(tok, prompt, vocab)
    batch = Batch([""] * len(mu_y), slice(0, len(mu_y)), roll, [""] * len(mu_y))
    with Run(cfg, World.current(), torch.device("cpu"), tok, [], lambda texts: torch.zeros(len(texts))) as run:
        run.use_models(policy, Reference(policy, ref.eval()))
        assert run.correction == RolloutCorrection("policy", "off", filtered=True, fused=True)
        scores = score_batch(run, batch)
        _, kl_tokens = shape_rewards_with_kl(run, scores, roll.response_mask, 0.1)
    weights = torch.tensor([mu_y[y1, y2] for y1 in vocab for y2 in vocab], dtype=torch.float64)
    seen = float((weights * kl_tokens.double().mean(-1)).sum())
    assert seen == pytest.approx(truth, rel=1e-4, abs=1e-6)
    # the sampled estimators are biased here (mu never draws what the filter dropped); the test can tell
    assert abs(k1_mean - truth) > 0.01 * truth and abs(wk1_mean - truth) > 0.01 * truth


def _tabular(seed: int):
    g = torch.Generator().manual_seed(seed)
    V = 6
    theta_old = torch.randn(V, generator=g, dtype=torch.float64)
    theta = (theta_old + 0.7 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)
    log_ref = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    return theta_old, theta, log_ref


@pytest.mark.parametrize("estimator", ["k2", "k3"])
@pytest.mark.parametrize("corrected", [True, False])
def test_kl_in_the_loss_with_the_ratio_correction_has_the_gradient_of_reverse_kl_in_a_second_epoch(estimator, corrected):
    """Tokens from pi_old (the second epoch's samples), enumerated: the gradient of E_{pi_old}[loss term]
    equals the gradient of KL(pi_theta || ref) with kl_ratio_correction, and not without it."""
    for seed in range(3):
        theta_old, theta, log_ref = _tabular(seed)
        old = torch.log_softmax(theta_old, -1)
        logp = torch.log_softmax(theta, -1)
        term = KLInLoss(estimator, None, "zero", ratio_correction=corrected)
        one = torch.ones(1, 1, dtype=torch.float64)
        expected = sum(old[y].exp() * term.loss_term(logp[y].view(1, 1), log_ref[y].view(1, 1), one, None, 1.0, None,
                                                     old_logprobs=old[y].view(1, 1)) for y in range(len(old)))
        (grad,) = torch.autograd.grad(expected, theta)
        logp = torch.log_softmax(theta, -1)
        truth = torch.autograd.grad((logp.exp() * (logp - log_ref)).sum(), theta)[0]
        if corrected:
            torch.testing.assert_close(grad, truth, rtol=1e-10, atol=1e-12)
        else:
            assert float((grad - truth).norm()) > 0.05 * float(truth.norm())


def test_train_with_top_p_logs_zero_kl_before_any_update_and_the_filtered_mass(tmp_path):
    tok = word_tokenizer(WORDS)
    policy = tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=2)
    from klbelt.rl.trainer import train

    cfg = TrainConfig(steps=1, batch_size=4, max_new_tokens=4, top_p=0.6, lr=1e-6, critic_lr=1e-6, out=str(tmp_path))
    prompts = ["a b", "c", "d e", "f"]
    (record,) = train(cfg, policy, tok, prompts, lambda texts: torch.zeros(len(texts)), warn_alerts=False)
    assert record["kl"] == 0.0
    assert record["filtered_mass"] > 0.05 and record["mismatch_kl"] > 0.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["filtered_mass"] == record["filtered_mass"]


def test_kl_estimator_exact_logs_the_full_vocabulary_kl_never_a_negative_token(tmp_path):
    """Per token, the exact KL(pi || ref) is >= 0 where a k1 sample is often negative; both read 0 before the first update (k1 to rounding)."""
    from klbelt.rl.trainer import train

    tok = word_tokenizer(WORDS)
    runs = {}
    for estimator in ("exact", "k1"):
        cfg = TrainConfig(steps=3, batch_size=8, max_new_tokens=4, lr=3e-2, kl_estimator=estimator, out=str(tmp_path / estimator))
        runs[estimator] = train(cfg, tiny_gpt2(len(tok), seed=2), tok, ["a b", "c", "d e", "f"],
                                lambda texts: torch.tensor([t.count("a") - t.count("c") for t in texts], dtype=torch.float32),
                                warn_alerts=False)
    exact, k1 = runs["exact"], runs["k1"]
    assert exact[0]["kl"] == 0.0 and abs(k1[0]["kl"]) < 1e-6  # k1: the sampler's KV-cached pass vs a full forward
    assert all(r["kl_min"] >= 0.0 for r in exact) and exact[-1]["kl"] > 1e-4
    assert min(r["kl_min"] for r in k1[1:]) < 0.0  # the sampled estimate the exact one replaces


def test_filter_settings_that_cannot_be_honoured_are_refused_by_name():
    with pytest.raises(ValueError, match="config sampler 'vllm' needs top_k 0 and top_p 1.0"):
        TrainConfig(sampler="vllm", top_p=0.9)
    with pytest.raises(ValueError, match="config kl_in='loss' needs kl_estimator 'k2' or 'k3'.*'exact'"):
        TrainConfig(kl_in="loss", kl_estimator="exact")
    with pytest.raises(ValueError, match="config top_p must be a number in \\(0, 1\\]"):
        TrainConfig(top_p=1.5)
    with pytest.raises(ValueError, match="config top_k must be an int >= 0"):
        TrainConfig(top_k=-1)


def test_the_controller_is_fed_the_exact_kl_whatever_controller_estimator_says_under_a_filter():
    from klbelt.rl.update import PPOStats, Scores, observe_kl

    g = torch.Generator().manual_seed(0)
    old, ref = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    exact, mask = torch.rand(3, 4, generator=g), torch.ones(3, 4)
    ppo = PPOStats([], [(torch.tensor(1.0), torch.tensor(12.0))])
    roll = Rollout(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4), 0, mask, old)
    run = Run(TrainConfig(controller_estimator="k3"), World.current(), torch.device("cpu"), None, [], None)
    for exact_kl, k3_fed in ((exact, False), (None, True)):
        scores = Scores(rewards=torch.zeros(3), ref_logprobs=ref, old_logprobs=old, is_weights=None, mismatch={},
                        old_values=None, ref_nll=torch.zeros(3), exact_kl=exact_kl)
        kl = exact if exact_kl is not None else old - ref
        observed = observe_kl(run, Batch([], slice(0, 3), roll, []), scores, kl, ppo, "token-mean")
        d = ref - old
        k3 = float((torch.exp(d) - 1 - d).mean())
        assert observed.kl == pytest.approx(k3 if k3_fed else float(exact.mean()), rel=1e-6)

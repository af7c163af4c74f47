"""The RLHF trainer: exact optimum on a one-token task, masks, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from klbelt.rl.config import TrainConfig
from klbelt.rl.rollout import response_logprobs, sample
from klbelt.rl.trainer import TrainingError, train
from klbelt.shaping import shape_rewards
from tiny_models import tiny_gpt2, word_tokenizer

WORDS = ["a", "b", "c", "d"]
REWARD = {"a": 1.0, "b": 0.0, "c": -0.5, "d": 0.5, "": 0.0}  # "" = <eos> or <pad>


def _reward_fn(texts):
    """Sum of the words' rewards (a one-token response is scored by its token)."""
    return torch.tensor([sum(REWARD[w] for w in t.split()) for t in texts])


def _next_token_probs(model, tok, prompt="a"):
    with torch.no_grad():
        enc = tok([prompt], return_tensors="pt")
        return torch.softmax(model(**enc).logits[0, -1].double(), -1)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.mark.slow
@pytest.mark.parametrize("kl_in,estimator", [("reward", "k1"), ("loss", "k2"), ("loss", "k3")])  # k3: with kl_ratio_correction
def test_trainer_converges_to_the_closed_form_kl_regularised_optimum(tmp_path, tok, kl_in, estimator):
    # One response token: the optimum of E[r] - beta * KL(pi || ref) is pi* = ref * exp(r / beta) / Z (k3 in the loss
    # reaches it through kl_ratio_correction: its gradient is then that of KL(pi || ref), not KL(ref || pi)).
    beta = 0.5
    model = tiny_gpt2(len(tok))
    ref = _next_token_probs(model, tok)
    r = torch.tensor([REWARD[tok.decode([i], skip_special_tokens=True).strip()] for i in range(len(tok))], dtype=torch.float64)
    optimum = ref * torch.exp(r / beta)
    optimum /= optimum.sum()
    cfg = TrainConfig(
        steps=200, batch_size=64, max_new_tokens=1, controller="fixed", kl_coef=beta, kl_in=kl_in, kl_estimator=estimator,
        lr=3e-3, critic_lr=1e-2, ppo_epochs=2, minibatches=2, whiten_advantages=False, checkpoint_every=1000, out=str(tmp_path),
    )
    train(cfg, model, tok, ["a"], _reward_fn)
    final = _next_token_probs(model, tok)
    kl = lambda p, q: float((p * (p / q).log()).sum())  # noqa: E731
    assert float((final - optimum).abs().sum()) / 2 < 0.03, (final, optimum)
    assert kl(final, ref) == pytest.approx(kl(optimum, ref), rel=0.1)
    assert kl(optimum, ref) > 0.3  # the task moves the policy far from the reference


def test_sampling_logprobs_equal_a_fresh_forward_with_left_padded_prompts():
    tok = word_tokenizer(WORDS + [f"w{i}" for i in range(40)])
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=3)
    enc = tok(["a", "b c d w1 w2", "w3 w4"], return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # some prompts really are left-padded
    roll = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, temperature=0.7, generator=torch.Generator().manual_seed(0))
    fresh = response_logprobs(model, roll, temperature=0.7)
    torch.testing.assert_close(roll.logprobs, fresh, atol=1e-5, rtol=0)


def test_a_blocked_token_is_never_sampled_and_is_removed_from_every_log_prob():
    # EOS holds ~all the mass; blocked, the rest renormalises: sampled tokens are never EOS, and the
    # recorded log-probs equal a fresh forward of the same renormalised distribution (finite, <= 0),
    # so moving mass onto EOS cannot make the KL estimate negative.
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok), seed=5)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 50.0 * model.transformer.wte.weight.mean(0) / model.transformer.wte.weight.mean(0).norm() ** 2
    enc = tok(["a b", "c"], return_tensors="pt", padding=True)
    roll = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=8, eos_token_id=tok.eos_token_id,
                  blocked_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert not (roll.responses == tok.eos_token_id).any()
    assert roll.response_mask.all()
    fresh, entropy = response_logprobs(model, roll, with_entropy=True)
    torch.testing.assert_close(roll.logprobs, fresh, atol=1e-5, rtol=0)
    assert torch.isfinite(entropy).all() and torch.isfinite(fresh).all()
    # the blocked distribution is the unblocked one renormalised without EOS
    single = tok(["c"], return_tensors="pt")  # the same prompt, unpadded
    full = torch.log_softmax(model(**single).logits[0, -1], -1)
    without_eos = full.clone()
    without_eos[tok.eos_token_id] = float("-inf")
    expected = torch.log_softmax(without_eos, -1)[roll.responses[1, 0]]
    torch.testing.assert_close(roll.logprobs[1, 0], expected, atol=1e-4, rtol=0)


class _Output(dict):
    __getattr__ = dict.__getitem__  # like transformers' ModelOutput: keys and attributes


class ScriptedLM(nn.Module):
    """A causal LM stand-in whose next token is scripted per row and step: exercises EOS masking."""

    def __init__(self, script: list[list[int]], vocab: int, prompt_len: int):
        super().__init__()
        self.script, self.vocab, self.prompt_len = script, vocab, prompt_len
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, cache=None, logits_to_keep=0):
        B, L = input_ids.shape
        total = attention_mask.shape[1]
        logits = torch.full((B, L, self.vocab), -30.0)
        for pos in range(L):
            t = total - L + pos - self.prompt_len + 1  # response index this position predicts
            for b in range(B):
                if 0 <= t < len(self.script[b]):
                    logits[b, pos, self.script[b][t]] = 30.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return _Output(logits=logits + self.weight, cache=None)


def test_score_lands_on_the_last_valid_token_with_left_padding_and_early_eos():
    eos, pad = 4, 5
    prompts = torch.tensor([[pad, pad, 0], [1, 2, 3]])
    prompt_mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    model = ScriptedLM([[1, eos, 2, 2], [3, 3, 3, 3]], vocab=6, prompt_len=3)
    roll = sample(model, prompts, prompt_mask, max_new_tokens=4, eos_token_id=eos, pad_token_id=pad)
    assert roll.responses.tolist() == [[1, eos, pad, pad], [3, 3, 3, 3]]
    assert roll.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    shaped = shape_rewards(torch.tensor([2.0, -1.0]), roll.logprobs, roll.logprobs, roll.response_mask, 0.1)
    assert shaped.rewards.tolist() == [[0, 2.0, 0, 0], [0, 0, 0, -1.0]]


def _metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_resume_after_a_crash_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, tok):
    base = dict(steps=6, batch_size=8, max_new_tokens=3, kl_coef=0.2, target_kl=0.01, checkpoint_every=2, lr=1e-2)
    whole = tmp_path / "whole"
    train(TrainConfig(**base, out=str(whole)), tiny_gpt2(len(tok)), tok, ["a", "b c", "d"], _reward_fn)

    crashed = tmp_path / "crashed"

    def crash_at_step_4(record):
        if record["step"] == 4:  # metrics for step 4 are written, the checkpoint holds steps 0-3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=str(crashed)), tiny_gpt2(len(tok)), tok, ["a", "b c", "d"], _reward_fn, on_step=crash_at_step_4)
    assert len(_metrics(crashed / "metrics.jsonl")) == 5
    # a fresh process rebuilds the starting model; resuming with another reference is refused
    with pytest.raises(ValueError, match="reference model differs"):
        train(TrainConfig(**base, out=str(crashed)), tiny_gpt2(len(tok), seed=99), tok, ["a"], _reward_fn, resume=True)
    train(TrainConfig(**base, out=str(crashed)), tiny_gpt2(len(tok)), tok, ["a", "b c", "d"], _reward_fn, resume=True)
    assert _metrics(crashed / "metrics.jsonl") == _metrics(whole / "metrics.jsonl")
    assert [m["step"] for m in _metrics(crashed / "metrics.jsonl")] == list(range(6))


def test_unknown_config_key_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key 'kl_coeff'.*valid keys: .*kl_coef"):
        TrainConfig.from_dict({"kl_coeff": 0.1})


@pytest.mark.parametrize(
    "values,match",
    [({"kl_in": "both"}, "kl_in must be one of"), ({"batch_size": 0}, "batch_size must be a positive int"),
     ({"kl_in": "loss", "kl_estimator": "k1"}, "kl_in='loss' needs"), ({"advantage": "group"}, "group_size >= 2"),
     ({"kl_coef": -1.0}, "kl_coef must be a finite number >= 0")],
)
def test_bad_config_values_are_named(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize(
    "reward_fn,match",
    [(lambda texts: torch.zeros(len(texts) + 1), r"one score per text, shape \[4\]; got shape \(5,\)"),
     (lambda texts: torch.full((len(texts),), float("nan")), "NaN or infinite")],
)
def test_a_bad_reward_function_is_reported(tmp_path, tok, reward_fn, match):
    cfg = TrainConfig(steps=1, batch_size=4, max_new_tokens=2, out=str(tmp_path))
    with pytest.raises(ValueError, match=match):
        train(cfg, tiny_gpt2(len(tok)), tok, ["a"], reward_fn)


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, tok):
    model = tiny_gpt2(len(tok))
    calls = {"n": 0}

    def reward_then_poison(texts):
        calls["n"] += 1
        if calls["n"] == 3:  # poison the weights after two good steps
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return torch.zeros(len(texts))

    cfg = TrainConfig(steps=5, batch_size=4, max_new_tokens=2, checkpoint_every=1, out=str(tmp_path))
    with pytest.raises((TrainingError, ValueError), match="non-finite|NaN"):
        train(cfg, model, tok, ["a"], reward_then_poison)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["policy"].values() if v.is_floating_point())


@pytest.mark.parametrize("estimator, logged", [("k1", "kl"), ("k3", "kl_k3")])
def test_the_controller_is_fed_the_mean_of_the_estimator_the_config_names(tmp_path, tok, estimator, logged):
    from klbelt.control import PIDKLController

    cfg = TrainConfig(steps=5, batch_size=8, max_new_tokens=3, kl_coef=0.2, target_kl=0.01, lr=5e-2, controller="pid",
                      pid_gains=[0.1, 0.05, 1.0], pid_warmup=2, pid_smoothing=0.5, pid_min_kl_coef=0.05,
                      controller_estimator=estimator, out=str(tmp_path))
    records = train(cfg, tiny_gpt2(len(tok)), tok, ["a", "b c", "d"], _reward_fn, warn_alerts=False)
    # replaying the logged estimator through a fresh controller gives the run's betas exactly
    replay = PIDKLController(0.2, 0.01, kp=0.1, ki=0.05, kd=1.0, warmup=2, smoothing=0.5, min_kl_coef=0.05)
    for r in records:  # the log holds the float32 mean, the controller got the float64 one
        assert r["kl_coef"] == pytest.approx(replay.kl_coef, rel=1e-5)
        replay.update(r[logged])
    assert len({round(r["kl_coef"], 4) for r in records}) > 2  # the betas moved: the replay checked something
    other = PIDKLController(0.2, 0.01, kp=0.1, ki=0.05, kd=1.0, warmup=2, smoothing=0.5, min_kl_coef=0.05)
    for r in records[:-1]:
        other.update(r["kl_k3" if logged == "kl" else "kl"])
    assert other.kl_coef != pytest.approx(records[-1]["kl_coef"], rel=1e-3)  # the other estimator's betas differ

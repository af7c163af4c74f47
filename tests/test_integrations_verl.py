"""klbelt against the real verl package (0.9.1): estimator names, the controller protocol, its logs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import klbelt
from klbelt.integrations.verl import KL_PENALTY_NAMES, VerlKLController

DATA = Path(__file__).parent / "data"


def _verl():
    pytest.importorskip("ray")
    pytest.importorskip("tensordict")
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def _logprobs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # |log-ratio| <= 1.5: inside verl's clamps (low_var_kl to [-10, 10], log-ratio to [-20, 20])
    lp = -torch.rand(6, 10, generator=gen, dtype=torch.float64) * 1.5
    ref = -torch.rand(6, 10, generator=gen, dtype=torch.float64) * 1.5
    return lp, ref


@pytest.mark.parametrize("name", sorted(KL_PENALTY_NAMES))
def test_kl_per_token_with_verl_names_equals_verl_kl_penalty_values_and_gradients(name):
    core_algos = _verl()
    lp, ref = _logprobs()
    lp_ours, lp_verl = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    ours = klbelt.kl_per_token(lp_ours, ref, name)
    theirs = core_algos.kl_penalty(lp_verl, ref, kl_penalty=name)
    torch.testing.assert_close(ours, theirs)
    w = torch.linspace(0.1, 1.0, lp.numel(), dtype=torch.float64).reshape(lp.shape)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), lp_ours)
    (g_verl,) = torch.autograd.grad((theirs * w).sum(), lp_verl)
    torch.testing.assert_close(g_ours, g_verl)


def test_straight_through_names_take_the_gradient_of_k2_and_the_value_of_their_estimator():
    lp, ref = _logprobs(1)
    lp = lp.requires_grad_()
    out = klbelt.kl_per_token(lp, ref, "low_var_kl+")
    l = (lp - ref).detach()
    torch.testing.assert_close(out.detach(), torch.exp(-l) - 1 + l)  # k3 by its formula
    (g,) = torch.autograd.grad(out.sum(), lp)
    torch.testing.assert_close(g, l)  # d/dl (l^2 / 2) = l


def test_verl_kl_controller_fed_by_verls_apply_kl_penalty_matches_verls_adaptive_controller():
    core_algos = _verl()
    from tensordict import TensorDict
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty

    theirs = core_algos.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.02, horizon=64)
    ours = VerlKLController(klbelt.AdaptiveKLController(0.1, 0.02, horizon=64, rule="proportional"))
    for step in range(12):
        lp, ref = _logprobs(step)
        lp = ref + (lp - ref) * (0.05 + step / 12)
        mask = torch.ones(6, 10)
        mask[:, 7 - step % 5:] = 0  # ragged responses: sequences weigh equally, not tokens
        batch = {"old_log_probs": lp.float(), "ref_log_prob": ref.float(), "response_mask": mask,
                 "token_level_scores": torch.zeros(6, 10)}
        metrics = {}
        for ctrl in (theirs, ours):
            _, metrics[id(ctrl)] = apply_kl_penalty(DataProto(batch=TensorDict(batch, batch_size=[6])), ctrl, "kl")
        m_ours = metrics[id(ours)]
        assert m_ours == pytest.approx(metrics[id(theirs)], rel=1e-12)
        # the unit verl feeds the controller: klbelt's seq-mean-token-mean (nats/token)
        want = klbelt.aggregate(klbelt.kl_per_token(lp.float(), ref.float(), "k1"), mask.bool(), "seq-mean-token-mean")
        assert m_ours["actor/reward_kl_penalty"] == pytest.approx(float(want), rel=1e-5)
        assert ours.value == pytest.approx(theirs.value, rel=1e-12)
    assert ours.value != pytest.approx(0.1)  # the trajectory moved


def test_verl_controller_in_sequence_units_is_refused_naming_both_units():
    with pytest.raises(ValueError, match="'seq-sum'.*'token-mean'"):
        VerlKLController(klbelt.AdaptiveKLController(0.1, target_kl=3.0, unit="seq-sum"))
    with pytest.raises(TypeError, match="controller"):
        VerlKLController(0.1)


def test_doctor_reads_the_log_verls_file_logger_wrote(tmp_path, capsys):
    from klbelt.cli.main import main
    from klbelt.monitor import read_run

    run = read_run(DATA / "verl_file_logger.jsonl")
    assert run.format == "verl_jsonl" and [r["step"] for r in run.records] == list(range(1, 13))
    raw = [json.loads(line)["data"] for line in (DATA / "verl_file_logger.jsonl").read_text().splitlines()]
    assert [r["kl"] for r in run.records] == [d["actor/reward_kl_penalty"] for d in raw]
    assert [r["kl_coef"] for r in run.records] == [d["actor/reward_kl_penalty_coeff"] for d in raw]
    # every step of this log has KL < 0.01 nats/token: the band rule's "barely moving" is the true verdict
    assert max(d["actor/reward_kl_penalty"] for d in raw) < 0.01
    assert main(["doctor", str(DATA / "verl_file_logger.jsonl"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "warnings" and out["exit_code"] == 1
    band = next(r for r in out["rules"] if r["rule"] == "kl_band")
    assert band["status"] == "warning" and "barely moving" in band["message"]


def _verl_actor_batch(B=3, P=2, R=4):
    """Inputs of verl's own ``ppo_loss`` (padded batch, every position valid)."""
    from tensordict import TensorDict

    def rand(seed, *shape):
        return -torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    td = TensorDict({"prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, R, dtype=torch.long),
                     "attention_mask": torch.ones(B, P + R, dtype=torch.long), "response_mask": torch.ones(B, R),
                     "old_log_probs": rand(1, B, R), "advantages": rand(2, B, R) + 0.5, "ref_log_prob": rand(3, B, R)},
                    batch_size=[B])
    for key, value in {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}.items():
        td.set_non_tensor(key, value)
    return {"log_probs": rand(0, B * (P + R))}, td


def test_verl_kl_controller_drives_the_actors_kl_loss_coef_in_verls_own_loss():
    _verl()
    pytest.importorskip("verl.workers.utils.losses")
    from verl.workers.config import ActorConfig
    from verl.workers.utils.losses import ppo_loss

    actor = ActorConfig(strategy="fsdp", use_kl_loss=True, kl_loss_coef=0.001, ppo_micro_batch_size_per_gpu=1, rollout_n=1)
    ctrl = VerlKLController(klbelt.PIDKLController(0.2, target_kl=0.01), kl_in="loss")
    output, batch = _verl_actor_batch()
    no_kl, _ = ppo_loss(dataclasses.replace(actor, kl_loss_coef=0.0), output, batch)
    loss, metrics = ctrl.loss_fn(actor)(model_output=output, data=batch)  # how verl's engines call it
    kl = float(metrics["kl_loss"].aggregate())
    assert metrics["kl_coef"] == 0.2 and float(loss) == pytest.approx(float(no_kl) + 0.2 * kl, rel=1e-12)
    # the step's KL is above the target: beta rises, and the next loss function carries it
    beta = ctrl.observe({"actor/kl_loss": metrics["kl_loss"]}, n_steps=3)
    assert beta > 0.2 and ctrl.loss_fn(actor)(model_output=output, data=batch)[1]["kl_coef"] == beta
    with pytest.raises(ValueError, match="actor/kl_loss"):
        ctrl.observe({"actor/pg_loss": 0.1}, n_steps=3)
    with pytest.raises(ValueError, match="use_kl_loss is False"):
        ctrl.actor_config(dataclasses.replace(actor, use_kl_loss=False))
    with pytest.raises(ValueError, match="kl_in='loss'"):
        VerlKLController(klbelt.FixedKLController(0.1)).actor_config(actor)

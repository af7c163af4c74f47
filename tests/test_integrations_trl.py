"""klbelt.integrations.trl on a real (tiny, CPU, offline) TRL GRPOTrainer: beta control, resume, refusals."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("trl")

#: the newest TRL checked; scripts/setup.sh installs it into this venv (system site-packages + trl only)
TRL_LATEST = "1.16.0"
REPO = Path(__file__).resolve().parents[1]
LATEST_PYTHON = Path(os.environ.get("KLBELT_TRL_LATEST_PYTHON", REPO / ".venv-trl-latest" / "bin" / "python"))
#: set in the child run of this file under the newest TRL (to the version it must see)
CHILD = os.environ.get("KLBELT_TRL_CHILD")

from test_integrations import _tiny_model_dir  # noqa: E402  (same tiny GPT-2 + word tokenizer)

import klbelt  # noqa: E402


def _grpo(tmp_path, out, max_steps=4, callbacks=(), **overrides):
    from datasets import Dataset
    from transformers import TrainerCallback  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        _tiny_model_dir(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{(i * 7 + j) % 61}" for j in range(4)) for i in range(16)]})

    def reward(completions, **kwargs):
        return [float(c.count("w3")) for c in completions]

    config = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=8, beta=0.1, learning_rate=5e-2, logging_steps=1, save_strategy="steps",
                  save_steps=2, report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, seed=0)
    config.update(overrides)
    return GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=GRPOConfig(**config), train_dataset=prompts,
                       processing_class=tokenizer, callbacks=list(callbacks))


def _controller():
    # target far below the run's KL: the step rule raises beta at every log, so the trajectory moves
    return klbelt.AdaptiveKLController(0.1, target_kl=1e-6, unit="token-mean", max_kl_coef=10.0)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_attach_drives_beta_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    from transformers import TrainerCallback

    from klbelt.integrations import trl as kltrl

    # uninterrupted: 4 steps
    full = _grpo(tmp_path, tmp_path / "full")
    controller = _controller()
    beta_cb, mon_cb = kltrl.attach(full, controller=controller, report=False, warn=False)
    full.train()
    full_log = _lines(tmp_path / "full" / "klbelt" / "metrics.jsonl")
    assert [r["step"] for r in full_log] == [1, 2, 3, 4]
    # the loss of step s used the beta the controller set after step s-1: beta x 1.5 per log
    assert [r["kl_coef"] for r in full_log] == pytest.approx([0.1, 0.15, 0.225, 0.3375])
    assert full.beta == pytest.approx(0.50625) == controller.kl_coef
    saved = json.loads((tmp_path / "full" / "checkpoint-2" / kltrl.STATE_FILE).read_text())
    assert saved["kl_coef"] == pytest.approx(0.225) and saved["n_updates"] == 2

    # interrupted after step 3 (checkpoint-2 is the last one), then resumed from checkpoint-2
    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    first = _grpo(tmp_path, tmp_path / "cut", callbacks=[StopAt3()])
    kltrl.attach(first, controller=_controller(), report=False, warn=False)
    first.train()
    log_path = tmp_path / "cut" / "klbelt" / "metrics.jsonl"
    assert [r["step"] for r in _lines(log_path)] == [1, 2, 3]
    assert not (tmp_path / "cut" / "checkpoint-3").exists()

    resumed = _grpo(tmp_path, tmp_path / "cut")
    fresh = _controller()  # a new process: the controller starts from its constructor's state
    kltrl.attach(resumed, controller=fresh, report=False, warn=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    cut_log = _lines(log_path)
    # step 3 of the interrupted run was dropped and redone; steps 1-2 kept, not truncated
    assert [r["step"] for r in cut_log] == [1, 2, 3, 4]
    assert resumed.beta == pytest.approx(full.beta) and fresh.n_updates == 4
    for got, want in zip(cut_log, full_log):
        assert got.keys() == want.keys()
        for k in ("kl", "kl_coef", "reward", "loss"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), (got["step"], k)


def test_controller_in_sequence_units_is_refused_naming_both_units():
    from klbelt.integrations.trl import KLControllerCallback

    with pytest.raises(ValueError, match="'seq-sum'.*'token-mean'"):
        KLControllerCallback(klbelt.AdaptiveKLController(0.1, target_kl=5.0, unit="seq-sum"))


def test_trainer_without_beta_is_refused():
    from klbelt.integrations.trl import KLControllerCallback

    class NoBeta:
        pass

    with pytest.raises(TypeError, match="beta"):
        KLControllerCallback(_controller(), trainer=NoBeta())


def test_callback_without_a_trainer_says_how_to_attach():
    from types import SimpleNamespace

    from klbelt.integrations.trl import KLControllerCallback

    cb = KLControllerCallback(_controller())
    with pytest.raises(RuntimeError, match="attach"):
        cb.on_train_begin(None, SimpleNamespace(global_step=0), None)


@pytest.mark.slow
def test_beta_zero_and_liger_are_refused_not_silently_ignored(tmp_path):
    from klbelt.integrations import trl as kltrl

    zero = _grpo(tmp_path, tmp_path / "zero", beta=0.0)
    assert zero.ref_model is None  # the reason: TRL loads no reference at beta 0
    with pytest.raises(ValueError, match="beta is 0"):
        kltrl.attach(zero, controller=_controller())

    class LigerLike:  # building a real Liger trainer needs liger-kernel (GPU): the flag is what TRL reads
        beta = 0.1
        use_liger_kernel = True
        args = None

        def add_callback(self, cb):
            raise AssertionError("must not be reached")

    with pytest.raises(ValueError, match="use_liger_kernel"):
        kltrl.attach(LigerLike(), controller=_controller())

    # TRL 1.16 with use_liger_kernel: only the flag in args, no fused loss object, the loss reads trainer.beta
    latest_style = _grpo(tmp_path, tmp_path / "latest_style")
    latest_style.args.use_liger_kernel = True
    assert getattr(latest_style, "liger_grpo_loss", None) is None
    beta_cb, _ = kltrl.attach(latest_style, controller=_controller(), monitor=False)
    assert beta_cb.trainer is latest_style


def test_this_run_uses_the_trl_version_it_was_launched_for():
    import trl

    # the system python holds TRL 1.0.0 (the oldest supported); the child run must really import the newest
    assert trl.__version__ == (CHILD or "1.0.0"), (trl.__file__, CHILD)


@pytest.mark.slow
def test_every_test_here_passes_on_the_newest_trl_too():
    if CHILD:
        pytest.skip("already the newest-TRL run")
    if not LATEST_PYTHON.exists():
        pytest.skip(f"NOT TESTED ON TRL {TRL_LATEST}: {LATEST_PYTHON} is missing; run scripts/setup.sh "
                    f"(it creates the venv) or set KLBELT_TRL_LATEST_PYTHON")
    env = dict(os.environ, KLBELT_TRL_CHILD=TRL_LATEST, OMP_NUM_THREADS="1")
    done = subprocess.run([str(LATEST_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           str(Path(__file__).resolve())], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    # everything ran there except this launcher: no test skipped for a missing TRL feature
    assert "1 skipped" in tail and "failed" not in tail, tail


@pytest.mark.slow
def test_monitor_only_at_beta_zero_logs_the_kl_trl_itself_logs_at_a_negligible_beta(tmp_path):
    """beta = 0 (GRPO's default): klbelt scores the reference and TRL logs ``kl``; the values are TRL's own
    k3 of a run with beta = 1e-12 (the same samples and updates, TRL computing the KL itself)."""
    from transformers import AutoModelForCausalLM

    from klbelt.integrations import trl as kltrl

    runs = {}
    for name, beta in (("zero", 0.0), ("tiny", 1e-12)):
        trainer = _grpo(tmp_path, tmp_path / name, max_steps=3, beta=beta, disable_dropout=True, save_strategy="no")
        if beta == 0:
            with pytest.raises(ValueError, match="pass ref_model="):  # no PEFT, no reference given: says what to pass
                kltrl.attach(trainer, monitor_only=True)
            kltrl.attach(trainer, monitor_only=True, ref_model=AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
        else:
            kltrl.attach(trainer, monitor_only=True)  # TRL scores its own reference
        trainer.train()
        runs[name] = _lines(tmp_path / name / "klbelt" / "metrics.jsonl")
    ours, theirs = [r["kl"] for r in runs["zero"]], [r["kl"] for r in runs["tiny"]]
    assert len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-3, abs=1e-7)
    assert abs(ours[0]) < 1e-6 and ours[-1] > 1e-4  # 0 before the first update, then the policy moves

"""Configs users bring: YAML 1.2 numbers, TRL/verl names, command-line overrides, example configs, help text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from klbelt.cli.main import main
from klbelt.control import AdaptiveKLController, FixedKLController, PIDKLController
from klbelt.kl import kl_per_token
from klbelt.rl.config import TrainConfig
from klbelt.rl.fields import ALIASES, load_yaml

pytest.importorskip("yaml")
CONFIGS = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))


def test_yaml_exponent_numbers_are_floats_not_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-6\ncritic_lr: 5E-4\nkl_coef: .5\nweight_decay: 1_0e-2\n")
    cfg = TrainConfig.from_file(path)
    assert (cfg.lr, cfg.critic_lr, cfg.kl_coef, cfg.weight_decay) == (1e-6, 5e-4, 0.5, 0.1)
    # the rest of YAML is unchanged: ints, booleans, null, lists, and strings that only look numeric
    assert load_yaml("a: 3\nb: true\nc: null\nd: [0.5, 2]\ne: '1e-6'\nf: 1.2.3") == {
        "a": 3, "b": True, "c": None, "d": [0.5, 2], "e": "1e-6", "f": "1.2.3"}


def test_trl_and_verl_names_become_klbelt_fields_and_are_reported():
    notes = []
    cfg = TrainConfig.from_dict({"beta": 0.04, "num_generations": 4, "kl_penalty": "low_var_kl", "kl_in": "loss",
                                 "advantage": "group", "learning_rate": "1e-6", "output_dir": "x"}, notes)
    assert (cfg.kl_coef, cfg.group_size, cfg.kl_estimator, cfg.lr, cfg.out) == (0.04, 4, "k3", 1e-6, "x")
    assert "config key 'beta' read as klbelt's 'kl_coef'" in notes
    assert "config kl_estimator 'low_var_kl' read as klbelt's 'k3'" in notes
    assert all(target in {f.name for f in dataclasses.fields(TrainConfig)} for target in ALIASES.values())


@pytest.mark.parametrize("values, message", [
    ({"kl_cof": 0.1}, "unknown config key 'kl_cof'; did you mean 'kl_coef'?"),
    ({"beta": 0.1, "kl_coef": 0.2}, "config sets 'kl_coef' twice (as 'beta' and 'kl_coef')"),
    ({"eval_prompts": 8}, "config key 'eval_prompts' was reserved and never did anything"),
    ({"lr": "fast"}, "config lr must be a finite number > 0, got 'fast'"),
    ({"use_kl_loss": True}, "config key 'use_kl_loss' has no klbelt equivalent of the same meaning: use kl_in: loss"),
    ({"per_device_train_batch_size": 8}, "use batch_size"),
])
def test_bad_keys_get_one_message_naming_the_klbelt_key(values, message):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(values)
    assert message in str(info.value)


def test_old_run_folders_with_eval_prompts_zero_still_load():
    assert TrainConfig.from_dict({"eval_prompts": 0, "steps": 3}).steps == 3


def test_every_field_has_help_text_from_the_dataclass():
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not TrainConfig.field_help(f.name)]
    assert missing == []
    assert TrainConfig.field_help("lr") == "policy AdamW learning rate"


def _print_config(capsys, *argv) -> tuple[dict, str]:
    assert main(["train", *argv, "--print-config"]) == 0
    captured = capsys.readouterr()
    return load_yaml(captured.out), captured.err


def test_command_line_alias_and_override_merge_with_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("kl_coef: 0.2\nlr: 1e-6\nsteps: 7\n")
    merged, err = _print_config(capsys, "--config", str(path), "--beta", "0.05", "--pid_gains", "[0.1, 0.0, 1]",
                           "--log_ratio_clamp", "null", "--stop_on_eos", "false")
    assert merged == TrainConfig(kl_coef=0.05, lr=1e-6, steps=7, pid_gains=[0.1, 0.0, 1], stop_on_eos=False).to_dict()
    assert "--beta read as klbelt's 'kl_coef'" in err


def test_command_line_values_are_validated_like_the_file(capsys):
    assert main(["train", "--steps", "0", "--print-config"]) == 2
    assert "config steps must be a positive int, got 0" in capsys.readouterr().err
    assert main(["train", "--kl_cof", "0.1"]) == 2
    assert capsys.readouterr().err.strip() == "klbelt: error: unknown flag --kl_cof for klbelt train; did you mean --kl_coef?"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = TrainConfig.from_file(path)
    assert cfg.model == "demo" and cfg.steps >= 1


def test_example_configs_cover_ppo_grpo_and_a_sequence_target():
    cfgs = {p.name: TrainConfig.from_file(p) for p in CONFIGS}
    assert any(c.advantage == "gae" and c.kl_in == "reward" and c.kl_estimator == "k1" for c in cfgs.values())
    assert any(c.advantage == "group" and c.kl_in == "loss" and c.kl_estimator == "k3" for c in cfgs.values())
    assert any(c.kl_unit == "seq-sum" and c.controller != "fixed" for c in cfgs.values())
    # the TRL-vocabulary file means the same run as the klbelt-vocabulary one
    trl, grpo = cfgs["trl_vocabulary.yaml"].to_dict(), cfgs["grpo_group_k3_loss.yaml"].to_dict()
    assert {k: v for k, v in trl.items() if k != "out"} == {k: v for k, v in grpo.items() if k != "out"}


@pytest.mark.slow
def test_grpo_example_config_trains_two_steps_on_the_demo_model(tmp_path):
    out = tmp_path / "run"
    path = next(p for p in CONFIGS if p.name == "grpo_group_k3_loss.yaml")
    assert main(["train", "--config", str(path), "--steps", "2", "--batch_size", "4", "--group_size", "2",
                 "--max_new_tokens", "4", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and records[0]["kl_coef"] == 0.04


@pytest.mark.parametrize("cls, kwargs", [(FixedKLController, {}), (AdaptiveKLController, {"target_kl": 0.05}),
                                         (PIDKLController, {"target_kl": 0.05})])
def test_controllers_take_trl_and_verl_keywords_and_expose_value(cls, kwargs):
    a, b = cls(**kwargs), cls(**kwargs)
    for kl in (0.2, 0.01, 0.3):
        assert a.update(current_kl=kl, n_steps=32) == b.update(kl, 32)
        assert a.value == a.kl_coef == b.kl_coef
    with pytest.raises(TypeError, match="not both"):
        a.update(0.1, current_kl=0.1)
    with pytest.raises(TypeError, match="needs the observed KL"):
        a.update()


def test_verl_estimator_names_equal_klbelt_estimators():
    import torch

    lp, ref = -torch.rand(50) * 3, -torch.rand(50) * 3
    for alias, name in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        assert torch.equal(kl_per_token(lp, ref, alias), kl_per_token(lp, ref, name))
    assert TrainConfig(kl_in="loss", kl_estimator="low_var_kl").kl_estimator == "k3"


@pytest.mark.parametrize("command", ["demo", "sweep", "train", "pretrain", "bench", "report", "doctor", "sim", "plot"])
def test_every_command_help_reads_cleanly(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", "DESIGN", "TODO", "pragma", ">>>"):
        assert markup not in text, f"{command} --help shows {markup!r}"


class _Stream:
    def __init__(self, tty):
        self.tty, self.parts = tty, []

    def isatty(self):
        return self.tty

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("tty, env, shown", [(True, None, True), (True, "1", False), (False, None, False)])
def test_progress_bar_on_terminals_only_and_silenced_by_tqdm_disable(monkeypatch, tty, env, shown):
    pytest.importorskip("tqdm")
    from klbelt.cli.progress import Progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if env:
        monkeypatch.setenv("TQDM_DISABLE", env)
    stream = _Stream(tty)
    bar = Progress(3, stream=stream)
    for step in range(3):
        bar({"step": step, "reward": 0.5, "kl": 0.01, "kl_coef": 0.1})
    text = "".join(stream.parts)
    assert ("3/3" in text and "KL 0.0100 nats/tok" in text) == shown
    assert text == "" or shown


@pytest.mark.parametrize("values, message", [
    ({"pid_warmup": -1}, "config pid_warmup must be an int >= 0"),
    ({"pid_smoothing": 1.0}, "config pid_smoothing must be a number in [0, 1)"),
    ({"pid_min_kl_coef": -0.1}, "config pid_min_kl_coef must be a finite number >= 0"),
    ({"controller": "pid", "kl_coef": 0.01, "pid_min_kl_coef": 0.02}, "must be <= kl_coef (0.01)"),
    ({"controller_estimator": "k2"}, "config controller_estimator must be one of 'k1', 'k3'"),
])
def test_pid_start_up_settings_are_checked_by_name(values, message):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(values)
    assert message in str(info.value)


def test_a_fixed_beta_run_of_a_pid_config_ignores_the_pid_floor():
    # the sweep turns the English demo's config (pid floor 0.02) into fixed-beta runs, beta 0 included
    assert TrainConfig.from_dict({"controller": "fixed", "kl_coef": 0.0, "pid_min_kl_coef": 0.02}).kl_coef == 0.0

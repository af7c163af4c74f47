"""`klbelt sim` and `klbelt plot beta-effect` on the command line."""

import json

import numpy as np
import pytest

from klbelt.cli.main import main
from klbelt.sim import kl_coef_for_target, optimum


def test_sim_json_reports_final_kl_closed_form_kl_and_policy(capsys):
    assert main(["sim", "--ref", "0.2,0.3,0.5", "--reward", "1,0,0", "--kl-coef", "0.5", "--steps", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = optimum([0.2, 0.3, 0.5], [1, 0, 0], 0.5)
    assert out["closed_form_kl"] == pytest.approx(best.kl)
    assert out["kl"] == pytest.approx(best.kl, rel=0.01)
    assert out["policy"] == pytest.approx(best.probs, abs=1e-3)
    assert sum(out["policy"]) == pytest.approx(1.0)


def test_sim_with_an_adaptive_controller_reaches_the_target(capsys):
    argv = ["sim", "--ref", "0.2,0.3,0.5", "--reward", "1,0,0", "--controller", "adaptive", "--rule", "proportional",
            "--target-kl", "0.3", "--horizon", "100", "--steps", "200", "--inner-steps", "5", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["controller"]["type"] == "AdaptiveKLController"
    assert out["kl"] == pytest.approx(0.3, rel=0.1)
    assert out["kl_coef"] == pytest.approx(kl_coef_for_target([0.2, 0.3, 0.5], [1, 0, 0], 0.3), rel=0.1)


def test_sim_human_output_names_the_closed_form(capsys):
    assert main(["sim", "--ref", "0.5,0.5", "--reward", "1,0", "--kl-coef", "1", "--steps", "20"]) == 0
    assert "closed form" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sim", "--ref", "0.2,0.3", "--reward", "1,0"], "ref_probs must sum to 1"),
        (["sim", "--ref", "0.5,0.5", "--reward", "1,0,0"], "reward must have one entry per response"),
        (["sim", "--kl-coef", "-1"], "must be >= 0"),
        (["sim", "--controller", "adaptive"], "--target-kl is required"),
        (["sim", "--controller", "pid", "--target-kl", "0"], "target_kl must be > 0"),
        (["sim", "--steps", "0"], "steps must be >= 1"),
    ],
)
def test_sim_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_sim_unparsable_list_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sim", "--ref", "0.5,abc"])
    assert exc.value.code == 2
    assert "comma-separated numbers" in capsys.readouterr().err


def test_compare_controllers_prints_metrics_and_beta_trajectories(capsys):
    assert main(["sim", "--compare-controllers", "--steps", "60", "--every", "20"]) == 0
    out = capsys.readouterr().out
    for word in ("settling", "overshoot", "steady-state error", "step", "proportional", "pid", "beta trajectory"):
        assert word in out
    assert main(["sim", "--compare-controllers", "--steps", "20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["runs"]) == {"step", "proportional", "pid"}
    assert all(len(r["kl_coef"]) == 20 for r in data["runs"].values())


def test_plot_beta_effect_writes_a_real_png(tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "beta.png"
    assert main(["plot", "beta-effect", "--out", str(out)]) == 0
    assert "within" in capsys.readouterr().out
    image = matplotlib.image.imread(str(out))
    assert image.shape[0] >= 300 and image.shape[1] >= 900
    assert float(np.std(image[..., :3])) > 0.05  # not blank
    assert [p.name for p in tmp_path.iterdir()] == ["beta.png"]  # no temporary left behind


def test_plot_into_a_missing_directory_fails_cleanly(tmp_path, capsys):
    assert main(["plot", "beta-effect", "--out", str(tmp_path / "no" / "such" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "x.png" in err and "Traceback" not in err

"""The trainer on any device, checked without a GPU (issue 25).

A tensor the trainer creates without ``device=`` lands on the CPU, and on a CUDA run
the first operation that meets it crashes (``vf_loss = torch.zeros(())`` did, for every
run with the group baseline). CI has no GPU, so a static scan of the trainer's layers
finds every tensor factory called without a device; the few that are CPU on purpose are
listed with their reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "klbelt"
# the layers a training run executes: rl and what it imports (kl, shaping, control, monitor)
TRAINER_LAYERS = ("rl", "kl", "shaping", "control", "monitor")
FACTORIES = frozenset({"zeros", "ones", "full", "empty", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
                       "randperm", "eye", "linspace", "logspace", "normal", "empty_strided"})
# (file, enclosing function, factory): why its tensor is on the CPU on purpose
CPU_ON_PURPOSE = {
    ("rl/update.py", "prompt_indices", "randperm"): "the prompts' indices, read as Python ints",
    ("rl/reward_model.py", "call_reward", "as_tensor"): "the reward function's scores as it returns them; score_batch moves them",
    ("rl/sampling/vllm.py", "_rollout", "full"): "assembled from the vLLM worker's lists, moved in one copy",
    ("rl/sampling/vllm.py", "_rollout", "zeros"): "assembled from the vLLM worker's lists, moved in one copy",
    ("rl/sampling/vllm.py", "_rollout", "tensor"): "assembled from the vLLM worker's lists, moved in one copy",
    ("kl/fused.py", "_rows_per_block", "empty"): "an empty tensor for its dtype's element size",
}


def factory_calls_without_device(tree: ast.AST):
    """``(function, factory, line)`` of every ``torch.FACTORY(...)`` with no ``device=`` (nor ``**kwargs`` that may
    hold one) whose result is not moved at once (``torch.X(...).to(...)`` / ``.cuda()``)."""
    moved = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("to", "cuda"):
            moved.add(id(node.func.value))

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch"
                    and child.func.attr in FACTORIES and not any(k.arg in ("device", None) for k in child.keywords)
                    and id(child) not in moved):
                yield function, child.func.attr, child.lineno
            yield from visit(child, name)

    yield from visit(tree, "<module>")


def scan(root: Path = SRC) -> list[str]:
    found = []
    for layer in TRAINER_LAYERS:
        for path in sorted((root / layer).rglob("*.py")):  # sub-packages too (rl/sampling/)
            rel = path.relative_to(root).as_posix()
            for function, factory, line in factory_calls_without_device(ast.parse(path.read_text())):
                if (rel, function, factory) not in CPU_ON_PURPOSE:
                    found.append(f"{rel}:{line} torch.{factory}(...) in {function}() has no device=")
    return found


def test_trainer_makes_every_tensor_on_the_run_device():
    assert scan() == [], "tensors made on the CPU in trainer code (pass device=, or list them in CPU_ON_PURPOSE with why)"


def test_the_device_scan_finds_a_cpu_zero_stacked_with_cuda_losses(tmp_path):
    # the bug of issue 25, as it was in ppo_epochs: the scan must see it
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "update.py").write_text(
        "import torch\n\ndef ppo_epochs(device):\n    vf_loss = torch.zeros(())\n    ok = torch.zeros((), device=device)\n"
        "    moved = torch.randperm(4).to(device)\n    f32 = dict(device=device)\n    given = torch.empty(3, **f32)\n")
    assert scan(tmp_path) == ["rl/update.py:4 torch.zeros(...) in ppo_epochs() has no device="]


def test_every_cpu_on_purpose_entry_still_exists():
    # a stale allow-list entry would silently allow a new CPU tensor in that function
    seen = set()
    for layer in TRAINER_LAYERS:
        for path in sorted((SRC / layer).rglob("*.py")):
            rel = path.relative_to(SRC).as_posix()
            seen |= {(rel, f, k) for f, k, _ in factory_calls_without_device(ast.parse(path.read_text()))}
    assert set(CPU_ON_PURPOSE) <= seen, set(CPU_ON_PURPOSE) - seen


# ---------------------------------------------------------------- device: cuda on a machine without CUDA


def test_cuda_device_without_cuda_is_refused_by_name(monkeypatch):
    from klbelt.rl.device import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"config device 'cuda': CUDA is not available"):
        check_device("cuda")
    with pytest.raises(ValueError, match=r"config device must be a torch device.*'gpu0'"):
        check_device("gpu0")
    assert check_device("cpu") == torch.device("cpu")


def test_cuda_index_past_the_last_gpu_is_refused(monkeypatch):
    from klbelt.rl.device import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"config device 'cuda:3': this machine has 1 GPU"):
        check_device("cuda:3")


def test_klbelt_train_refuses_cuda_before_loading_the_model(monkeypatch, tmp_path, capsys):
    import klbelt.cli.train as cli_train
    from klbelt.cli.main import main

    def no_load(name):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli_train, "load_policy", no_load)
    code = main(["train", "--model", "demo", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "run")])
    assert code != 0
    err = capsys.readouterr().err
    assert "config device 'cuda': CUDA is not available" in err


def test_train_refuses_cuda_before_moving_the_model(monkeypatch, tmp_path):
    from klbelt.rl.config import TrainConfig
    from klbelt.rl.trainer import train

    class Untouchable(torch.nn.Module):
        def to(self, *args, **kwargs):
            raise AssertionError("the model was moved before the device was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = TrainConfig(device="cuda", steps=1, batch_size=2, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="config device 'cuda'"):
        train(cfg, Untouchable(), None, ["a"], lambda texts: torch.zeros(len(texts)))


def test_bench_trainer_on_cuda_without_cuda_says_so_by_name(monkeypatch, capsys):
    from klbelt.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "trainer", "--device", "cuda", "--runs", "1"]) == 2
    assert "config device 'cuda': CUDA is not available" in capsys.readouterr().err


# ---------------------------------------------------------------- attention "auto": the kernel each device wants


def test_auto_attention_is_klbelt_fp32_on_the_cpu_and_sdpa_on_a_gpu():
    from klbelt.rl.attention import current, resolve, set_attention
    from klbelt.rl.config import TrainConfig
    from klbelt.demo.task import ENGLISH_DEMO_CONFIG
    from tiny_models import tiny_llama

    assert resolve("auto", "cpu") == "klbelt_fp32" and resolve("auto", torch.device("cuda")) == "sdpa"
    assert resolve("eager", "cuda") == "eager"  # an explicit choice is kept on every device
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        resolve("flash", "cpu")
    assert TrainConfig(attn_implementation="auto").attn_implementation == "auto"
    assert ENGLISH_DEMO_CONFIG.attn_implementation == "auto"  # the English demo: its CPU kernel here, SDPA on a GPU
    model = tiny_llama(10)
    assert set_attention(model, "auto") == "sdpa" and current(model) == "klbelt_fp32"

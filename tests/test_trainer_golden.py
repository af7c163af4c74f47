"""The trainer computes today exactly what it computed before its refactor (issue 16).

``tests/data/trainer_golden.json`` holds every metric of nine short runs recorded
by ``tests/data/make_trainer_golden.py``, first with the code before ``train()``
was split into named steps (the refactor reproduced them bit for bit), then
again after the deliberate numeric changes listed in the file's ``history``.
Any later change that moves a metric must be deliberate: re-record, and say
why in ``HISTORY``. The same runs with the current code must give the same metrics: bit for bit where the machine matches
the recording's ``klbelt._machine.float_kernel_signature()`` (torch version, CPU
capability, bf16 support, and the CPU's vendor, model and the ISA extensions
oneDNN and MKL dispatch on: AMX, AVX512-FP16, AVX512-BF16, VNNI). Two CPUs
that both say "AVX512" round differently (an Intel Xeon with AMX moved the PID
run's entropy in the 7th digit), so elsewhere fp32 runs are compared within
rel 1e-4 (abs 1e-6) and bf16 runs, whose samples fork at the first token that
rounds the other way, are not compared.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_trainer_golden", DATA / "make_trainer_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _uses_bf16(name: str, golden_module) -> bool:
    cfg = golden_module.CONFIGS.get(name, {})
    return bool(cfg.get("bf16")) or cfg.get("sampler") == "bf16"


@pytest.mark.slow
def test_train_reproduces_the_pre_refactor_metrics_of_every_option():
    import torch

    mod = _golden_module()
    golden = json.loads((DATA / "trainer_golden.json").read_text())
    threads = torch.get_num_threads()
    try:
        now = mod.record_all()
    finally:
        torch.set_num_threads(threads)
    same_machine = now["signature"] == golden["signature"]
    assert set(now["runs"]) == set(golden["runs"])
    compared = 0
    for name, old in golden["runs"].items():
        new = now["runs"][name]
        if not same_machine and _uses_bf16(name, mod):
            continue
        assert len(new) == len(old), name
        for r_new, r_old in zip(new, old):
            assert r_new.keys() == r_old.keys(), (name, r_new.keys() ^ r_old.keys())
            for key, v_old in r_old.items():
                v_new = r_new[key]
                if same_machine or not isinstance(v_old, float):
                    assert v_new == v_old, (name, r_old["step"], key, v_new, v_old)
                else:
                    assert math.isclose(v_new, v_old, rel_tol=1e-4, abs_tol=1e-6), (name, r_old["step"], key, v_new, v_old)
        compared += 1
    assert compared >= 5
    # the recorded runs exercise what they claim: the controllers move beta, the corrections weigh tokens
    moved = [name for name, runs in golden["runs"].items() if len({r["kl_coef"] for r in runs}) > 1]
    assert len(moved) >= 6
    assert all("is_weight_mean" in golden["runs"][n][-1] for n in mod.CONFIGS if mod.CONFIGS[n].get("sampler") == "bf16")

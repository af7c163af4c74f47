"""docs/design.md's layer diagram and trainer map are true of the code.

The layer of every module comes from the diagram in docs/design.md (between
``<!-- layers -->`` markers); every import in the package, at module level or
inside a function, is read from the source with ``ast`` and must point at the
same layer or one below. No two modules import each other (at import time or
inside a function). Every name in the trainer map must be defined in the file it names.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "klbelt"
DESIGN = (ROOT / "docs" / "design.md").read_text()


def _block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->(.*?)<!-- /{marker} -->", DESIGN, re.S)
    assert match, f"docs/design.md has no {marker} block"
    return match.group(1)


def _layers() -> dict[str, int]:
    layers = {}
    for line in _block("layers").splitlines():
        m = re.match(r"^(\d)\s+(.+?)\s{2,}", line)
        if not m:
            continue
        for name in m.group(2).split(","):
            name = name.strip()
            layers["" if name == "(package root)" else name] = int(m.group(1))
    return layers


def _module(path: Path) -> tuple[str, str]:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imports(path: Path):
    """(target module, at import time?) for every klbelt import in ``path``."""
    name, package = _module(path)
    found = []

    def visit(node, lazy: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                    found.append((target, lazy, [a.name for a in child.names]))
                elif child.module and child.module.split(".")[0] == "klbelt":
                    found.append((child.module, lazy, [a.name for a in child.names]))
            elif isinstance(child, ast.Import):
                found.extend((a.name, lazy, []) for a in child.names if a.name.split(".")[0] == "klbelt")
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return name, found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# the one upward import the diagram states: best_of_n samples with the trainer's sampler, imported when called,
# so that ``import klbelt.bon`` stays torch-only
ALLOWED_LAZY = {("klbelt.bon", "klbelt.rl.sampling.policy")}


def test_no_module_imports_a_layer_above_its_own():
    layers = _layers()
    assert len(layers) >= 12, layers
    offences = []
    for path in sorted(PKG.rglob("*.py")):
        name, imports = _imports(path)
        assert _top(name) in layers, f"{name}: its package {_top(name)!r} is missing from docs/design.md's diagram"
        for target, lazy, _ in imports:
            if layers[_top(target)] > layers[_top(name)] and not (lazy and (name, target) in ALLOWED_LAZY):
                offences.append(f"{name} (layer {layers[_top(name)]}) imports {target} (layer {layers[_top(target)]})"
                                + (" inside a function" if lazy else ""))
    assert not offences, "\n".join(offences)


def test_no_module_in_rl_imports_a_private_name_from_another():
    # a name with a leading underscore is its module's own business; what another module needs is public
    offences = []
    for path in sorted((PKG / "rl").rglob("*.py")):
        name, imports = _imports(path)
        for target, _, names in imports:
            if target.startswith("klbelt.rl") and target != name:
                offences += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
            if target.rsplit(".", 1)[-1].startswith("_") and target.startswith("klbelt.rl"):
                offences.append(f"{name} imports the private module {target}")
    assert not offences, "\n".join(offences)


def test_the_private_name_rule_sees_a_private_import(tmp_path, monkeypatch):
    (tmp_path / "klbelt" / "rl").mkdir(parents=True)
    bad = tmp_path / "klbelt" / "rl" / "bad.py"
    bad.write_text("from .scoring import _fused\n\ndef f():\n    from .hf import _forward_params\n")
    monkeypatch.setitem(globals(), "PKG", tmp_path / "klbelt")  # _module() reads it
    name, imports = _imports(bad)
    privates = [n for target, _, names in imports for n in names if n.startswith("_")]
    assert name == "klbelt.rl.bad" and privates == ["_fused", "_forward_params"]


def test_no_two_modules_import_each_other():
    modules = {_module(p)[0]: p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        _, imports = _imports(path)
        targets = set()
        for target, lazy, names in imports:
            # "from . import x" imports the submodule x when there is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            targets.update(subs or [target])
        graph[name] = targets - {name}
    cycles = []
    for a, targets in graph.items():
        for b in targets:
            if a in graph.get(b, ()) and a < b and not (b.startswith(a + ".") or a.startswith(b + ".")):
                cycles.append(f"{a} <-> {b}")
    assert not cycles, cycles


def test_every_name_in_the_trainer_map_is_defined_in_the_file_it_names():
    rows = [line for line in _block("trainer-steps").splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 12
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name, file = cells[2].strip("`"), cells[3].strip("`")
        tree = ast.parse((PKG / file).read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined, f"docs/design.md says {name} is in {file}; it is not"


def test_train_calls_each_step_of_the_map_in_order():
    tree = ast.parse((PKG / "rl" / "trainer.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    loop = next(n for n in ast.walk(train) if isinstance(n, ast.For))
    calls = sorted((n for n in ast.walk(loop) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    called = [ast.unparse(n.func) for n in calls]
    steps = ["sample_batch", "score_batch", "shape_rewards_with_kl", "run.advantages", "ppo_epochs", "observe_kl",
             "step_metrics"]
    assert [c for c in called if c in steps] == steps
    # the loop reads as the algorithm: one screenful
    assert loop.end_lineno - loop.lineno + 1 <= 45


def test_every_step_function_takes_the_run_first_and_at_most_7_arguments():
    tree = ast.parse((PKG / "rl" / "update.py").read_text())
    steps = {"sample_batch", "score_batch", "shape_rewards_with_kl", "ppo_epochs", "ppo_minibatch", "observe_kl",
             "step_metrics"}
    found = {n.name: n.args for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in steps}
    assert set(found) == steps
    for name, args in found.items():
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        assert params[0] == "run" and len(params) <= 7, (name, params)

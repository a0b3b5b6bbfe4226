"""The package's import graph obeys the layering (tests/layering.py), and the checker catches breaks."""

from __future__ import annotations

import shutil
from pathlib import Path

from layering import PACKAGES, SCRIPTS, cycles, private_imports, problems

ROOT = Path(__file__).resolve().parents[1]


def _copy_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES + SCRIPTS:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("*.safetensors", "results",
                                                                                   "organisms", "__pycache__"))
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_repository_obeys_the_layering():
    found = problems(ROOT)
    assert found == [], "the import graph breaks the layering:\n" + "\n".join(found)


def test_checker_reads_every_module():
    from layering import imports, modules

    mods = modules(ROOT)
    assert {"forksight", "probe.sampling.sampler", "probe.tasks.countdown", "steering.apply", "experiments.cli",
            "experiments.study.run"} <= set(mods)
    deps = imports("steering.vectors", mods["steering.vectors"], set(mods))
    assert "steering.apply" in deps and "probe.models.hooks" in deps, deps


def test_planted_cycle_is_found(tmp_path):
    root = _copy_tree(tmp_path)
    # a lazy import inside a function still counts
    _append(root / "steering" / "apply.py", "def _f():\n    from steering.vectors import SteeringVector")
    found = problems(root)
    assert any("import cycle" in p and "steering.apply" in p and "steering.vectors" in p for p in found), found


def test_planted_layer_violations_are_found(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "probe" / "forks.py", "from steering.gates import GATES")
    _append(root / "experiments" / "training" / "sft.py", "import experiments.study.run")
    _append(root / "probe" / "models" / "pair.py", "from probe.metrics.passk import pass_at_k")
    _append(root / "probe" / "tasks" / "countdown.py", "import forksight")
    found = problems(root)
    assert any(p.startswith("probe.forks imports steering.gates") for p in found), found
    assert any(p.startswith("experiments.training.sft (layer 1) imports experiments.study.run (layer 2)")
               for p in found), found
    assert any(p.startswith("probe.models.pair (layer 1) imports probe.metrics.passk (layer 4)") for p in found), found
    assert any(p.startswith("probe.tasks.countdown imports forksight") for p in found), found


def test_cycles_oracle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_name():
    found = private_imports(ROOT)
    assert found == [], "private names imported across modules:\n" + "\n".join(found)


def test_planted_private_imports_are_found(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "experiments" / "study" / "report.py", "def _f():\n    from probe.metrics.frontier import _x")
    _append(root / "probe" / "metrics" / "compute_match.py", "from .frontier import Outcomes, _y")  # relative
    _append(root / "bench" / "sampling.py", "from probe.stats import _z as z")
    _append(root / "probe" / "stats.py", "from torch import _C\nfrom probe import __doc__")  # not ours / dunder
    found = private_imports(root)
    assert any(p.startswith("experiments.study.report (line") and "probe.metrics.frontier._x" in p for p in found), found
    assert any(p.startswith("probe.metrics.compute_match") and "probe.metrics.frontier._y" in p for p in found), found
    assert any(p.startswith("bench.sampling") and "probe.stats._z" in p for p in found), found
    assert len(found) == 3, found

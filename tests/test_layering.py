"""The package's import graph obeys the layering (tests/layering.py), and the checker catches breaks."""

from __future__ import annotations

import shutil
from pathlib import Path

from layering import PACKAGES, cycles, problems

ROOT = Path(__file__).resolve().parents[1]


def _copy_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
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
    assert {"probe.sampler", "steering.apply", "experiments.cli", "experiments.study.run"} <= set(mods)
    deps = imports("steering.vectors", mods["steering.vectors"], set(mods))
    assert "steering.apply" in deps and "probe.hooks" in deps, deps


def test_planted_cycle_is_found(tmp_path):
    root = _copy_tree(tmp_path)
    # a lazy import inside a function still counts
    _append(root / "steering" / "apply.py", "def _f():\n    from steering.vectors import SteeringVector")
    found = problems(root)
    assert any("import cycle" in p and "steering.apply" in p and "steering.vectors" in p for p in found), found


def test_planted_layer_violations_are_found(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "probe" / "forks.py", "from steering.gates import GATES")
    _append(root / "experiments" / "tasks" / "countdown.py", "import experiments.study.run")
    found = problems(root)
    assert any(p.startswith("probe.forks imports steering.gates") for p in found), found
    assert any(p.startswith("experiments.tasks.countdown (layer 1) imports experiments.study.run (layer 3)")
               for p in found), found


def test_cycles_oracle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []

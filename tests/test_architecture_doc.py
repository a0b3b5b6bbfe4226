"""docs/architecture.md names exactly the code that exists, and the checker catches drift.

The doc's convention (stated in its introduction): inside backticks (inline code or a fenced block),
- a path from the repository root under `forksight/`, `probe/`, `steering/` or `experiments/` names a
  module (`probe/models/pair.py`) or a package / folder (`probe/models/`);
- a dotted name starting with one of those packages names a module (`probe.metrics.passk`) or one
  object a module defines (`probe.metrics.passk.pass_at_k`; a method after a class is not checked).

`doc_problems(text, root)` lists, as sentences naming what to add or remove:
- every path or dotted name the doc writes that does not exist in the tree under `root`;
- every library module (each `.py` under the four packages except `__init__.py` files and the data
  folders `experiments/organisms/`, `experiments/results/`, `experiments/real/`) and every package
  (a folder with an `__init__.py`) that the doc does not name by its path;
- every name the facade exports (`forksight.__all__`) that the doc does not mention in backticks.
Empty means the doc and the tree agree.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("forksight", "probe", "steering", "experiments")
DATA_FOLDERS = ("experiments/organisms", "experiments/results", "experiments/real")

_PKG = "|".join(PACKAGES)
PATH_RE = re.compile(rf"(?<![\w./-])(?:{_PKG})/(?:[\w.-]+/)*(?:[\w-]+(?:\.[\w-]+)*)?")
DOTTED_RE = re.compile(rf"(?<![\w./-])(?:{_PKG})(?:\.[A-Za-z_]\w*)+")
FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SPAN_RE = re.compile(r"`([^`\n]+)`")


def code_text(text: str) -> list[str]:
    """The contents of every fenced block and inline code span of a Markdown text."""
    blocks = FENCE_RE.findall(text)
    return blocks + SPAN_RE.findall(FENCE_RE.sub("", text))


def named(text: str) -> tuple[set[str], set[str], set[str]]:
    """(paths, dotted names, identifiers) written in backticks in `text`."""
    paths, dotted, idents = set(), set(), set()
    for code in code_text(text):
        paths.update(m.rstrip(".") for m in PATH_RE.findall(code))
        dotted.update(DOTTED_RE.findall(code))
        idents.update(re.findall(r"[A-Za-z_]\w*", code))
    return paths, dotted, idents


def _in_data(rel: str) -> bool:
    return any(rel == d or rel.startswith(d + "/") for d in DATA_FOLDERS)


def library(root: Path) -> tuple[list[str], list[str]]:
    """(module paths, package paths with a trailing slash) of the four packages under `root`."""
    mods, pkgs = [], []
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else ():
            rel = f.relative_to(root).as_posix()
            if _in_data(rel) or "__pycache__" in f.parts:
                continue
            if f.name == "__init__.py":
                pkgs.append(f.parent.relative_to(root).as_posix() + "/")
            else:
                mods.append(rel)
    return mods, pkgs


def _defined(path: Path) -> dict[str, ast.AST]:
    """Top-level names a module binds: defs, classes, assignments, imports."""
    out: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out[(a.asname or a.name).split(".")[0]] = node
    return out


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def dotted_problem(root: Path, name: str) -> str | None:
    """Why the dotted `name` does not resolve in the tree, or None when it does."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        f = _module_file(root, ".".join(parts[:i]))
        if f is None:
            continue
        rest = parts[i:]
        if not rest:
            return None
        mod = ".".join(parts[:i])
        if rest[0] not in _defined(f):
            return f"`{name}`: module `{mod}` defines no `{rest[0]}`"
        return None
    return f"`{name}`: no such module"


def facade_exports(root: Path) -> list[str]:
    init = root / "forksight" / "__init__.py"
    if not init.is_file():
        return []
    node = _defined(init).get("__all__")
    return list(ast.literal_eval(node.value)) if isinstance(node, ast.Assign) else []


def doc_problems(text: str, root: str | Path) -> list[str]:
    """Every disagreement between the doc `text` and the tree under `root` (see the module docstring)."""
    root = Path(root)
    paths, dotted, idents = named(text)
    out = []
    for p in sorted(paths):
        if not (root / p).exists():
            out.append(f"remove or fix `{p}`: docs/architecture.md names it, but no such file or folder exists")
    for d in sorted(dotted):
        why = dotted_problem(root, d)
        if why:
            out.append(f"remove or fix {why} (docs/architecture.md names it)")
    mods, pkgs = library(root)
    for m in mods:
        if m not in paths:
            out.append(f"add `{m}`: a library module docs/architecture.md does not name (a row with its path "
                       "and a one-line purpose in its package's table)")
    for p in pkgs:
        if p not in paths:
            out.append(f"add `{p}`: a package docs/architecture.md does not name")
    for name in facade_exports(root):
        if name not in idents:
            out.append(f"add `{name}`: `forksight.__all__` exports it, but the facade table of "
                       "docs/architecture.md does not name it")
    return out


# --- tests -------------------------------------------------------------------------------------------------
def test_doc_names_exactly_the_modules_that_exist():
    found = doc_problems(DOC.read_text(), ROOT)
    assert found == [], "docs/architecture.md and the tree disagree:\n" + "\n".join(found)


def test_convention_is_parsed():
    text = ("Prose probe/nope.py outside code is ignored. `probe/models/pair.py`, `probe/sae/` and "
            "`probe.metrics.passk.pass_at_k(n, c, k)`.\n```\nsteering/apply.py ──> experiments.cli\n```\n"
            "`steering.apply`; `not/probe/x.py`; `my.probe.thing`.")
    paths, dotted, idents = named(text)
    assert paths == {"probe/models/pair.py", "probe/sae/", "steering/apply.py"}, paths
    assert dotted == {"probe.metrics.passk.pass_at_k", "experiments.cli", "steering.apply"}, dotted
    assert "pass_at_k" in idents and "nope" not in idents
    assert dotted_problem(ROOT, "probe.metrics.passk.pass_at_k") is None
    assert dotted_problem(ROOT, "probe.tasks.load_task") is None, "a name a package's __init__ defines"
    assert dotted_problem(ROOT, "steering.LearnedEdit") is None, "a name a package imports counts"
    mods, pkgs = library(ROOT)
    assert "probe/models/pair.py" in mods and "forksight/" in pkgs and "probe/sae/" in pkgs
    assert not any(m.endswith("__init__.py") or _in_data(m) for m in mods)


def test_planted_missing_and_unknown_modules_are_reported():
    text = DOC.read_text()
    assert "`probe/models/pair.py`" in text
    without = text.replace("`probe/models/pair.py`", "pair")
    found = doc_problems(without, ROOT)
    assert any(p.startswith("add `probe/models/pair.py`") for p in found), found
    planted = text + "\n| `probe/models/nope.py` | gone |\n`probe.metrics.nope`, `probe.metrics.passk.nope`, `probe/gone/`\n"
    found = doc_problems(planted, ROOT)
    assert any(p.startswith("remove or fix `probe/models/nope.py`") for p in found), found
    assert any(p.startswith("remove or fix `probe/gone/`") for p in found), found
    assert any("`probe.metrics.nope`: module `probe.metrics` defines no `nope`" in p for p in found), found
    assert any("`probe.metrics.passk.nope`: module `probe.metrics.passk` defines no `nope`" in p for p in found), found
    without_export = text.replace("`compare_to_frontier`", "compare_to_frontier")
    found = doc_problems(without_export, ROOT)
    assert any(p.startswith("add `compare_to_frontier`: `forksight.__all__` exports it") for p in found), found


def test_planted_new_module_in_the_tree_is_reported(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=lambda d, names: [
            n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir()) or n == "__pycache__"])
    before = doc_problems(DOC.read_text(), tmp_path)  # the copy has the code, not the data files the doc names
    assert not any(p.startswith("add ") for p in before), before
    (tmp_path / "probe" / "sae" / "planted.py").write_text('"""A module nobody documented."""\n')
    (tmp_path / "steering" / "plantpkg").mkdir()
    (tmp_path / "steering" / "plantpkg" / "__init__.py").write_text("")
    (tmp_path / "experiments" / "results" / "data.py").write_text("")  # data folders are not library code
    found = [p for p in doc_problems(DOC.read_text(), tmp_path) if p not in before]
    assert found == ["add `probe/sae/planted.py`: a library module docs/architecture.md does not name (a row "
                     "with its path and a one-line purpose in its package's table)",
                     "add `steering/plantpkg/`: a package docs/architecture.md does not name"], found

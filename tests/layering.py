"""The architecture's import rules, read statically from the source (ast, nothing is imported).

Rules (docs/architecture.md):
1. No import cycles between modules of `forksight`, `probe`, `steering` and `experiments` (any
   length, lazy imports inside functions included: a cycle is one concept split wrongly or a helper
   in the wrong place, whether or not Python happens to resolve it at run time).
2. `probe` imports neither `steering` nor `experiments` nor the `forksight` facade; `steering` never
   imports `experiments` or `forksight`; `experiments` never imports `forksight` (the facade sits
   on top and re-exports; nothing inside depends on it).
3. Inside `probe`, the concerns go one way: the shared pieces (`atomic`, `environment`, `stats`,
   `figures`, `tasks`) < `models` (loading, hooks, structure) < `sampling` < the probes proper
   (`entropy`, `forks`, `detector`, `law`, `plots`) < `metrics` and `sae`.
4. Inside `experiments`, the layers go one way: the shared helpers at its top (`paths`,
   `run_state`, `cli_args`, `fetch_real`) < `training` < `study` < `cli`. A module may import its
   own layer or a lower one, never a higher one.
5. No module imports another module's private (underscore) name: a helper two modules need is
   public API of one of them, or belongs lower down (`private_imports`).

`problems(root)` lists every violation of rules 1-4 as a sentence naming the modules, and
`private_imports(root)` those of rule 5; empty means the tree obeys.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("forksight", "probe", "steering", "experiments")
SCRIPTS = ("bench",)
"""Folders of scripts (not packages) that `private_imports` also reads: they use the packages' API."""
FORBIDDEN = {"probe": ("steering", "experiments", "forksight"), "steering": ("experiments", "forksight"),
             "experiments": ("forksight",)}
PROBE_LAYERS = {"probe.atomic": 0, "probe.environment": 0, "probe.stats": 0, "probe.figures": 0, "probe.tasks": 0,
                "probe.models": 1, "probe.sampling": 2, "probe.entropy": 3, "probe.forks": 3, "probe.detector": 3,
                "probe.law": 3, "probe.plots": 3, "probe.metrics": 4, "probe.sae": 4}
EXPERIMENT_LAYERS = {"experiments.paths": 0, "experiments.run_state": 0, "experiments.cli_args": 0,
                     "experiments.fetch_real": 0, "experiments.training": 1, "experiments.study": 2,
                     "experiments.cli": 3}


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` (folders) under `root`."""
    out = {}
    for pkg in packages:
        if not (root / pkg).is_dir():
            continue
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _absolute(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The dotted module a `from ... import` names, relative imports resolved against `name`."""
    base = node.module or ""
    if node.level:
        anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
        base = ".".join(anchor + ([base] if base else []))
    return base


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its source (`from pkg import mod` counts as
    `pkg.mod` when that is a module, else as `pkg`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_pkg, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import probe.sampling.sampler.x` -> the longest known prefix
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _layer(mod: str, table: dict[str, int]) -> int | None:
    for prefix, rank in table.items():
        if mod == prefix or mod.startswith(prefix + "."):
            return rank
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(root: str | Path) -> list[str]:
    """Every violation of the rules in the module docstring, as readable sentences."""
    root = Path(root)
    mods = modules(root)
    known = set(mods)
    graph = {m: imports(m, f, known) for m, f in mods.items()}
    out = []
    for comp in cycles(graph):
        edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
        out.append(f"import cycle between {comp} ({'; '.join(edges)}): move the shared piece down")
    for a, targets in sorted(graph.items()):
        top = a.split(".")[0]
        for b in sorted(targets):
            if b.split(".")[0] in FORBIDDEN.get(top, ()):
                out.append(f"{a} imports {b}: {top} must never import {b.split('.')[0]}")
            for table, order in ((EXPERIMENT_LAYERS, "experiments' layers go paths/run_state/cli_args/fetch_real "
                                                      "< training < study < cli"),
                                 (PROBE_LAYERS, "probe's concerns go atomic/environment/stats/figures/tasks < models "
                                                "< sampling < entropy/forks/detector/law/plots < metrics/sae")):
                # a package itself (its __init__) sits outside the layers
                la, lb = _layer(a, table), _layer(b, table)
                if la is not None and lb is not None and lb > la:
                    out.append(f"{a} (layer {la}) imports {b} (layer {lb}): {order}")
    return out


def private_imports(root: str | Path) -> list[str]:
    """Every `from X import _name` (anywhere in a module, lazy imports included) where X is another
    module of the packages (or `bench`) under `root` and `_name` is private (one leading underscore;
    dunders such as `__version__` are public). One sentence per import, naming both modules and the fix.
    Imports from outside the project (torch, transformers, ...) are not this rule's concern."""
    root = Path(root)
    mods = modules(root, PACKAGES + SCRIPTS)
    tops = set(PACKAGES + SCRIPTS)
    out = []
    for name, path in sorted(mods.items()):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            src = _absolute(name, path.name == "__init__.py", node)
            if src.split(".")[0] not in tops or src == name:
                continue
            for alias in node.names:
                n = alias.name
                if n.startswith("_") and not (n.startswith("__") and n.endswith("__")):
                    out.append(f"{name} (line {node.lineno}) imports {src}.{n}, a private name of another module: "
                               f"make it public in {src} (drop the underscore) or move it where both belong")
    return out

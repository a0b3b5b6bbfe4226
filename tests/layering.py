"""The architecture's import rules, read statically from the source (ast, nothing is imported).

Rules (README "Layout"):
1. No import cycles between modules of `probe`, `steering` and `experiments` (any length, lazy
   imports inside functions included: a cycle is one concept split wrongly or a helper in the
   wrong place, whether or not Python happens to resolve it at run time).
2. `probe` imports neither `steering` nor `experiments`; `steering` never imports `experiments`.
3. Inside `experiments`, the layers go one way: the shared helpers at its top (`paths`,
   `checkpointing`, `cli_args`) < `tasks` < `organism` < `study` < `cli`. A module may import its
   own layer or a lower one, never a higher one.

`problems(root)` lists every violation as a sentence naming the modules; empty means the tree obeys.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("probe", "steering", "experiments")
FORBIDDEN = {"probe": ("steering", "experiments"), "steering": ("experiments",)}
EXPERIMENT_LAYERS = {"experiments.paths": 0, "experiments.checkpointing": 0, "experiments.cli_args": 0,
                     "experiments.tasks": 1, "experiments.organism": 2, "experiments.study": 3,
                     "experiments.cli": 4}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under `root`."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


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
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import probe.sampler.x` -> the longest known prefix
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _layer(mod: str) -> int | None:
    for prefix, rank in EXPERIMENT_LAYERS.items():
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
            la, lb = _layer(a), _layer(b)
            # the `experiments` package itself (its __init__) sits outside the layers
            if la is not None and lb is not None and lb > la:
                out.append(f"{a} (layer {la}) imports {b} (layer {lb}): experiments' layers go "
                           "paths/checkpointing/cli_args < tasks < organism < study < cli")
    return out

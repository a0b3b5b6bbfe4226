"""Executing the shipped notebooks in tests (quick mode, outputs under a temporary directory)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def execute_notebook(name: str, out: Path, timeout: int = 120) -> str:
    """Run notebooks/`name` with FORKSIGHT_NOTEBOOK_QUICK=1 and FORKSIGHT_NOTEBOOK_OUT=`out` (the
    environment is restored afterwards); return every code cell's text and data outputs, joined."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    env = {"FORKSIGHT_NOTEBOOK_QUICK": "1", "FORKSIGHT_NOTEBOOK_OUT": str(out)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return "\n".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))

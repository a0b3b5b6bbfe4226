"""The sweep's cell cache: evaluated cells by id in `sweep.json`, written atomically after each new one.

A cell's id names its half, seed, family, spec and temperature (`Candidate.key`); the settings
every cell shares but its id does not name (checkpoints, n, seeds, problem count, task, precision,
sampling engine) form the
cache's fingerprint, and a sweep directory keeps one value of each: reusing cells made with other
settings would mix them silently, so that is an error naming the settings that differ. Restarting
an interrupted sweep with the same `--out` evaluates only the cells missing from the file; a cell
stopped midway resumes from its saved parts (`parts_dir`, `probe.sampling.parts`), removed once the
cell is stored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments.run_state import portable
from probe.atomic import write_text_atomic

FINGERPRINT = ("base", "rl", "task", "n", "seed", "test_seeds", "problems", "derive_problems", "batch_size", "dtype",
               "engine")


def _norm(key: str, value: Any) -> Any:
    # checkpoints compare by directory name: a clone of the repository elsewhere still reuses its cells
    if key == "dtype":
        return value or "float32"  # sweeps stored before precision was a setting ran in float32
    if key == "engine":
        return value or "hf"  # sweeps stored before the engine was a setting sampled on the HF engine
    return Path(value).name if key in ("base", "rl") and value else value


class CellCache:
    """Cells by id, read back from `out/sweep.json`; `get` evaluates the missing ones."""

    def __init__(self, out: str | Path, config: Any):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = portable(asdict(config), self.out)  # stored and compared with portable paths
        self.path = self.out / "sweep.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if "config" in old:
            was_cfg = portable(old["config"], self.out)
            changed = [k for k in FINGERPRINT if _norm(k, was_cfg.get(k)) != _norm(k, self.config.get(k))]
            if changed:
                was = ", ".join(f"{k}={was_cfg.get(k)!r}" for k in changed)
                raise ValueError(f"{self.path} holds cells made with other {changed} ({was}); reusing them would mix "
                                 "settings. Use a new --out, or the same values to extend that sweep")
        self.rows: dict[str, dict] = {r["id"]: r for r in old.get("cells", [])}
        earlier = [portable(c, self.out) for c in old.get("invocations", [])]
        self.invocations = [c for c in earlier if c != self.config] + [self.config]
        self.reused, self.evaluated = 0, 0

    def parts_dir(self, cell_id: str) -> Path:
        """Where a cell's samples are saved part by part while it runs (removed once the cell is stored)."""
        return self.out / "parts" / hashlib.sha256(cell_id.encode()).hexdigest()[:16]

    def get(self, cell_id: str, evaluate: Callable[[], dict], **fields: Any) -> dict:
        """The cached row `cell_id`, or `evaluate()` (a `protocol.evaluate_cell` dict) stored with `fields`;
        the cell's parts directory is removed either way (a stop between storing and removing leaves it)."""
        if cell_id not in self.rows:
            self.rows[cell_id] = {"id": cell_id, **fields, **evaluate()}
            self.evaluated += 1
            self.save()
        else:
            self.reused += 1
        shutil.rmtree(self.parts_dir(cell_id), ignore_errors=True)
        return self.rows[cell_id]

    def save(self) -> None:
        # compact: the cells hold per-sample outcomes (problems x samples), which indentation would bloat 10x
        write_text_atomic(self.path, json.dumps({"config": self.config, "invocations": self.invocations,
                                                 "cells": list(self.rows.values())}, separators=(",", ":")))

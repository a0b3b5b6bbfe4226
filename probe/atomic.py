"""Atomic writes of whole directories: a reader sees the old directory or the complete new one.

What it is: `replace_dir_atomic(dest, build)`, shared by the GGUF conversion cache (`probe.gguf`)
and the trainers' resumable state (`experiments.checkpointing`). What it is not: single-file writes
(`probe.checkpoint.save_safetensors_atomic`, `experiments.checkpointing.write_json_atomic`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir_atomic(dest: str | Path, build) -> Path:
    """Create directory `dest` whole: `build(tmp)` fills a temporary sibling, which then replaces
    `dest` (an existing one is removed first); on any error the temporary directory is removed and
    `dest` is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        build(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest

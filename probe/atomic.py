"""Atomic writes of whole directories: a reader sees the old directory or the complete new one.

What it is: `write_text_atomic(path, text)` for single text files (results, task files) and
`replace_dir_atomic(dest, build)` for directories, shared by the GGUF conversion cache (`probe.models.gguf`)
and the trainers' resumable state (`experiments.run_state`). What it is not: tensor files
(`probe.models.checkpoint.save_safetensors_atomic`) or JSON with run-relative paths
(`experiments.run_state.write_json_atomic`).
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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and `os.replace` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""Run state of every command that writes a run directory: atomic JSON results with portable paths
(`write_json_atomic`, `portable`: paths inside the run stored relative to it, so a run directory can
be moved or cloned), `check_writable` for `--out`, `publish_dir` for final checkpoints, and the
resumable training state of the organism trainers (SFT and RL), below.

Layout under a run directory `DIR`:

    DIR/state/step-000500/{model.safetensors, optimizer.pt, progress.json}
    DIR/state/latest.json          -> {"step": 500, "dir": "step-000500"}   (replaced atomically)

A step directory is written completely under a temporary name and renamed into place; only then
is `latest.json` replaced, so an interruption at any moment leaves the previous state intact.
Weights are fp32 safetensors; the optimizer state is a tensor-only dict saved with `torch.save`
and loaded with `weights_only=True`. Final HF checkpoints are published with `publish_dir`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from probe.atomic import replace_dir_atomic, write_text_atomic
from probe.models.adapters import AdapterError, split_adapter_spec


def as_json(obj: Any) -> Any:
    """`obj` as it reads back from JSON: dataclasses (nested too) become dicts, tuples lists, other
    non-JSON values their `str`. Use it to compare a configuration with one stored in a JSON file."""
    import dataclasses

    def default(o: Any) -> Any:
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)

    return json.loads(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, default=default))


def check_writable(out: str | Path) -> Path:
    """`out` as a Path, after proving a file can be created in it (or in its nearest existing
    ancestor, where it will be made); raises PermissionError / NotADirectoryError naming the fix."""
    import tempfile

    out = Path(out)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} cannot be created: {str(probe)!r} is a file, not a directory; "
                                 "choose another directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise PermissionError(f"--out {str(out)!r} is not writable ({str(probe)!r}: {e.strerror}); choose another "
                              "directory") from None
    return out


def write_json_atomic(path: str | Path, obj: Any, relative_to: str | Path | None = None) -> None:
    """Write JSON to `path` via a temporary file and `os.replace` (never a half-written file); with
    `relative_to` (the run directory), every path in it is made portable first (`portable`)."""
    if relative_to is not None:
        obj = portable(obj, relative_to)
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


REPO_DIR = Path(__file__).resolve().parents[1]
_ABS_IN_TEXT = re.compile(r"(?<![\w.~:/])/(?:[^\s'\"`,;:()\[\]{}<>|*?]+/)+[^\s'\"`,;:()\[\]{}<>|*?]*[^\s'\"`,;:()\[\]{}<>|*?.]")


def _exists(p: str) -> bool:
    try:
        return Path(p).exists()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL: not a path
        return False


def portable(obj: Any, run_dir: str | Path) -> Any:
    """`obj` (JSON-ready) with its file-system paths made portable, so a results file means the same
    on another machine: a path inside `run_dir` becomes relative to it ("." for itself), one elsewhere in
    the repository relative to the repository root, any other one relative to `run_dir`.

    What counts as a path: a string that is absolute, or contains a "/" and exists relative to the
    working directory, each part of a `BASE+ADAPTER` checkpoint spec, the file part of a task spec
    ("math:PATH,train=PATH"), and absolute paths
    inside longer text (e.g. a reason naming a missing file). Other strings are left alone."""
    run = Path(os.path.abspath(run_dir))

    def rel(p: str) -> str:
        q = Path(os.path.abspath(p))
        for root in (run, REPO_DIR):
            if q == root or root in q.parents:
                return q.relative_to(root).as_posix() or "."
        return Path(os.path.relpath(q, run)).as_posix()

    def conv(s: str) -> str:
        if "+" in s and not any(c.isspace() for c in s) and len(s) < 1024:  # BASE+ADAPTER
            try:
                a, b = split_adapter_spec(s)
            except AdapterError:  # "+" at an end: not a checkpoint spec
                a, b = s, None
            if b and all(os.path.isabs(x) or _exists(x) for x in (a, b)):
                return f"{conv(a)}+{rel(b)}"
        if s.startswith("math:"):
            head, *opts = s[len("math:"):].split(",")
            opts = [f"train={conv_path(o[6:])}" if o.startswith("train=") else o for o in opts]
            return ",".join([f"math:{conv_path(head)}", *opts])
        if os.path.isabs(s) and "\n" not in s and " " not in s.strip():
            return rel(s)
        if "/" in s and len(s) < 4096 and "\n" not in s and _exists(s):
            return rel(s)
        return _ABS_IN_TEXT.sub(lambda m: rel(m.group(0)), s) if "/" in s else s

    def conv_path(s: str) -> str:
        return rel(s) if os.path.isabs(s) or _exists(s) else s

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return conv(x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    return walk(obj)


def save_state(run_dir: str | Path, step: int, model, optimizer, progress: dict, keep: int = 1,
               trainable_only: bool = False) -> Path:
    """Save model + optimizer + progress for `step` and point `latest.json` at it.
    trainable_only: save only parameters with `requires_grad` (a LoRA adapter, not the frozen base)."""
    state = Path(run_dir) / "state"
    state.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    keys = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None

    def build(tmp: Path) -> None:
        sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
              if keys is None or k in keys}
        save_file(_untie(sd), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps({**progress, "step": step}, indent=2))

    final = replace_dir_atomic(state / name, build)
    write_json_atomic(state / "latest.json", {"step": step, "dir": name})
    for old in sorted(state.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(run_dir: str | Path, model, optimizer, trainable_only: bool = False) -> dict | None:
    """Restore the latest state into `model` and `optimizer`; returns its progress, or None.
    trainable_only: the state holds only the trainable parameters (see `save_state`)."""
    latest = Path(run_dir) / "state" / "latest.json"
    if not latest.is_file():
        return None
    pointer = json.loads(latest.read_text())
    d = latest.parent / pointer["dir"]
    sd = load_file(str(d / "model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = model.state_dict()
    sd = {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if trainable_only:
        missing = [k for k in missing if k in trainable]
    if unexpected or any(not _is_tied(k) for k in missing):
        raise ValueError(
            f"training state in {d} does not match this model (missing {missing}, unexpected "
            f"{unexpected}): the run directory belongs to a different config; use a new --out"
        )
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    return json.loads((d / "progress.json").read_text())


def publish_dir(build, dest: str | Path) -> None:
    """Create the files of a directory with `build(tmp_dir)`, then move each into `dest` with
    `os.replace` (each file appears whole; the directory is never left half-written)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".publish."))
    try:
        build(tmp)
        for f in tmp.iterdir():
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_tied(key: str) -> bool:
    return key == "lm_head.weight"


def _untie(sd: dict) -> dict:
    # safetensors refuses shared storage; the tied lm_head is rebuilt from the embedding on load
    return {k: v for k, v in sd.items() if not _is_tied(k)}

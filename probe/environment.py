"""The software environment a result was made in: package versions and the git commit.

What it is: `environment()`, one small JSON-ready record that every `results.json`, `metrics.json`
and safetensors header forksight writes carries under the key `"environment"`; `describe(env)`, the
one line every report prints from it; `annotated(note)`, the record for a file written before
environments were recorded (stamped after the fact, so it says so); and `recorded(path)`, the
record a file carries. Versions come from the installed distributions' metadata
(`importlib.metadata`, `None` for a package that is not installed); the commit from `git` when
forksight runs from a git checkout (`git_dirty`: tracked files differ from it, so the commit alone
does not reproduce the result). Collected once per process.

What it is not: a lock file (`requirements.lock` pins what to install) or a check. A result made
with other versions is not wrong; the record says which versions to read it with. Float results
are bit-identical only for the same seed, device and versions (see the tests' comparisons).
"""

from __future__ import annotations

import functools
import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

KEY = "environment"
"""The key of the record in a results file, a metrics file and a safetensors header."""

PACKAGES = {"torch": "torch", "transformers": "transformers", "sae_lens": "sae-lens", "nnsight": "nnsight",
            "transformer_lens": "transformer-lens", "peft": "peft", "gguf": "gguf", "forksight": "forksight"}
"""Record key -> distribution name: the packages whose versions change forksight's numbers."""

REPO_DIR = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """`git args` in the repository, or None when it is not a git checkout, git is missing or fails."""
    if not (REPO_DIR / ".git").exists():  # an installed copy: never read an enclosing, unrelated repository
        return None
    try:  # --no-optional-locks: reading the status must not rewrite the index under another process
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO_DIR), *args], capture_output=True,
                              text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


@functools.lru_cache(maxsize=1)
def _collect() -> tuple[tuple[str, Any], ...]:
    env: dict[str, Any] = {"recorded": "written", "python": platform.python_version()}
    env |= {key: _version(dist) for key, dist in PACKAGES.items()}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    env["git_commit"] = commit.strip() if commit else None
    env["git_dirty"] = None if status is None else bool(status.strip())
    env["platform"] = f"{platform.system()} {platform.machine()}"
    return tuple(env.items())


def command_line() -> str:
    """The command this process runs, shell-quoted: `forksight ARGS` for the CLI, else the argv (a
    script, pytest, a notebook kernel) with the program as its file name. Absolute paths among the
    arguments are written relative to the working directory when inside it, else as their file name,
    so that no record names a machine path."""
    argv = list(sys.argv) or [""]
    cwd = Path.cwd()

    def arg(a: str) -> str:
        if not Path(a).is_absolute():
            return a
        p = Path(a)
        return str(p.relative_to(cwd)) if p.is_relative_to(cwd) else p.name

    return shlex.join([Path(argv[0]).name, *map(arg, argv[1:])])


def environment() -> dict[str, Any]:
    """This process's record: {"recorded": "written", "python", torch, transformers, sae_lens, nnsight,
    transformer_lens, peft, gguf, forksight (versions or None), "git_commit" (None outside a git
    checkout), "git_dirty", "platform", "command" (`command_line`)}. A fresh dict each call (safe to modify)."""
    return {**dict(_collect()), "command": command_line()}


def annotated(note: str) -> dict[str, Any]:
    """The record for a file written before environments were recorded: this process's versions,
    marked `"recorded": "annotated"` with `note` (they need not be the versions that made it)."""
    if not note.strip():
        raise ValueError("annotated(note=''): say when and why the file was annotated, e.g. 'annotated after the "
                         "fact; the numbers were made before forksight recorded its environment'")
    env = environment()
    env.pop("command")  # the annotating process's command did not write the file
    return {**env, "recorded": "annotated", "note": note}


def recorded(path: str | Path) -> dict[str, Any] | None:
    """The record a `.json` results/metrics file or a `.safetensors` header carries (None when it has none)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(KEY)
        return None if raw is None else json.loads(raw)
    if path.suffix == ".json":
        obj = json.loads(path.read_text())
        return obj.get(KEY) if isinstance(obj, dict) else None
    raise ValueError(f"{str(path)!r}: only .json and .safetensors files record an environment")


def describe(env: dict[str, Any] | None) -> str:
    """One line for a report: the versions, the commit, and whether they were recorded after the fact."""
    if not env:
        return "not recorded (written before forksight recorded its environment)"
    names = ", ".join(f"{dist} {env[key]}" for key, dist in (("python", "python"), *PACKAGES.items())
                      if env.get(key) is not None)
    commit = env.get("git_commit")
    git = ("no git commit" if not commit else
           f"git {commit[:12]}" + (" with uncommitted changes" if env.get("git_dirty") else ""))
    line = f"{names}; {git}"
    if env.get("recorded") == "annotated":
        line = f"annotated after the fact (the versions installed then, not necessarily those that made it): {line}"
        if env.get("note"):
            line += f". {env['note']}"
    return line

"""Stamping result files written before forksight recorded its environment.

    python -m experiments.study.annotate [ROOT ...] [--note TEXT] [--dry-run]

What it is: every `results.json`, `metrics.json` and forksight safetensors file (a header whose
`format` starts with "forksight.") under the roots (default: `experiments/results` and
`experiments/organisms`) that carries no `environment` record gets `probe.environment.annotated(note)`:
the versions installed *now*, marked `"recorded": "annotated"`, so nobody mistakes them for the
versions that made the numbers. JSON files keep their content and key order (the record is appended);
safetensors files keep their tensors and header (the record is added to the header). Resumable
training state (`state/`, `checkpoints/`) and HF checkpoints (`model.safetensors`, format "pt") are
left alone. A file that already records an environment is never touched, so a rerun changes nothing.
The last stdout line is one JSON record (files annotated, files already recorded).

What it is not: a regeneration. Regenerate a result (`forksight run`, `forksight replicate`) to record
the environment that really produced it; annotate only what will not be regenerated.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from experiments.run_state import REPO_DIR, write_json_atomic
from probe.environment import KEY, annotated, recorded
from probe.models.checkpoint import save_safetensors_atomic

NOTE = ("annotated after the fact: these are the versions installed when the file was stamped, not necessarily "
        "those that produced its numbers (it was written before forksight recorded its environment)")
JSON_NAMES = ("results.json", "metrics.json")
SKIP_DIRS = {"state", "checkpoints"}
"""Resumable training state: not results."""


def result_files(root: str | Path) -> Iterator[Path]:
    """The results/metrics JSON and forksight safetensors files under `root`, in path order."""
    root = Path(root)
    for f in sorted(root.rglob("*")):
        if not f.is_file() or SKIP_DIRS & set(f.relative_to(root).parts):
            continue
        if f.name in JSON_NAMES or (f.suffix == ".safetensors" and _is_forksight(f)):
            yield f


def _is_forksight(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return str((f.metadata() or {}).get("format", "")).startswith("forksight.")


def annotate_file(path: str | Path, env: dict) -> bool:
    """Add `env` to one file that records no environment; returns whether the file was rewritten."""
    path = Path(path)
    if recorded(path) is not None:
        return False
    if path.suffix == ".json":
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object: it is not a results file")
        write_json_atomic(path, {**obj, KEY: env})
        return True
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    save_safetensors_atomic(path, tensors, {**header, KEY: json.dumps(env)})
    return True


def annotate(roots: list[str | Path], note: str = NOTE, dry_run: bool = False) -> dict[str, list[str]]:
    """Annotate every result file under `roots` (module docstring); {"annotated": [...], "recorded": [...]}
    with paths relative to the repository (or as given, outside it)."""
    env = annotated(note)
    out: dict[str, list[str]] = {"annotated": [], "recorded": []}
    for root in roots:
        if not Path(root).is_dir():
            raise NotADirectoryError(f"{str(root)!r} is not a directory: pass the folders that hold the results "
                                     "(e.g. experiments/results experiments/organisms)")
        for f in result_files(root):
            todo = recorded(f) is None
            if todo and not dry_run:
                annotate_file(f, env)
            out["annotated" if todo else "recorded"].append(_show(f))
    return out


def _show(path: Path) -> str:
    p = path.resolve()
    return p.relative_to(REPO_DIR).as_posix() if REPO_DIR in p.parents else str(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="*", default=[str(REPO_DIR / "experiments" / "results"),
                                                   str(REPO_DIR / "experiments" / "organisms")])
    ap.add_argument("--note", default=NOTE, help="why and when the files were annotated")
    ap.add_argument("--dry-run", action="store_true", help="list the files that would be annotated; change nothing")
    args = ap.parse_args(argv)
    done = annotate(args.roots, args.note, args.dry_run)
    for f in done["annotated"]:
        print(("would annotate " if args.dry_run else "annotated ") + f)
    line = {"annotated": len(done["annotated"]), "already_recorded": len(done["recorded"]), "dry_run": args.dry_run}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()

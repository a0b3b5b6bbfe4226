"""The math task's file format: one JSON object per line with `prompt` and `answer` (a string or a
number), optional `id`. Blank lines are skipped; a line that is not a JSON object, lacks `prompt` /
`answer`, or repeats an earlier prompt is an error naming the line and the fix (`read_jsonl`).
`write_jsonl` writes the same format atomically (the word-problem organism's shipped files).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MathRow:
    """One problem: the prompt shown to the model, its final answer, an id."""

    prompt: str
    answer: str
    id: str


def read_jsonl(path: str | Path) -> list[MathRow]:
    """The rows of a math JSONL file; raises ValueError naming the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"math task file {str(path)!r} does not exist. Fix: pass --task math:PATH with a "
                                "JSONL file of {\"prompt\": ..., \"answer\": ...} rows")
    rows: list[MathRow] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg}): {line[:80]!r}. Fix: one JSON object per line, "
                             "e.g. {\"prompt\": \"2+3=?\", \"answer\": \"5\"}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where} is a JSON {type(obj).__name__}, not an object. Fix: one object per line "
                             "with \"prompt\" and \"answer\"")
        for key in ("prompt", "answer"):
            value = obj.get(key)
            if value is None or isinstance(value, (dict, list, bool)) or not str(value).strip():
                raise ValueError(f"{where} has no usable {key!r} (got {value!r}); every row needs a non-empty "
                                 f"\"prompt\" string and an \"answer\" (string or number). Fix: add it or drop the line")
        if not isinstance(obj["prompt"], str):
            raise ValueError(f"{where}: 'prompt' is a {type(obj['prompt']).__name__}; it must be a string")
        if obj["prompt"] in seen:
            raise ValueError(f"{where} repeats the prompt of line {seen[obj['prompt']]}; prompts must be unique "
                             "(a prompt identifies its answer). Fix: drop the duplicate")
        seen[obj["prompt"]] = n
        rows.append(MathRow(obj["prompt"], str(obj["answer"]), str(obj.get("id", len(rows)))))
    if not rows:
        raise ValueError(f"{path} holds no rows (empty file). Fix: one JSON object per line with \"prompt\" and "
                         "\"answer\"")
    return rows


def write_jsonl(path: str | Path, rows: Sequence[MathRow]) -> None:
    """Write rows as a math JSONL file (`prompt`, `answer`, `id`), atomically."""
    from probe.atomic import write_text_atomic

    write_text_atomic(path, "".join(json.dumps({"id": r.id, "prompt": r.prompt, "answer": r.answer}) + "\n"
                                    for r in rows))

"""The coverage table: what `bench/coverage.py` records per model type, and what the tests hold it to.

What it is: `Row` (one type's outcome), `Table` (`bench/coverage.json`: the rows with the
transformers and torch versions they were made with), `held_to` (whether a new outcome keeps a
recorded one) and `compare` (a sweep against a table: types new to it, types gone from transformers,
outcomes changed). A table is a record of one environment, not a promise about the next: a release
of transformers that adds a type makes it "new" (listed, not failed) until the table is regenerated.

What it is not: the checks (`bench/coverage.py`) or the list of types (`bench/hf_zoo.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("coverage.json")
"""The recorded sweep the test suite holds every type to."""
REGENERATE = "python bench/coverage.py --out bench/coverage.md --json bench/coverage.json"


@dataclass
class Row:
    """One model type's outcome."""

    model_type: str
    class_name: str
    status: str
    """"passed", "failed", "refused", "not built" or "excluded"."""
    reason: str = ""
    moe: bool = False
    norm: str = ""
    sites: str = ""
    decomposes: str = ""
    cache: str = ""
    seconds: float = 0.0


@dataclass
class Table:
    """A recorded sweep (`coverage.json`): the versions it was made with and one row per type."""

    transformers: str
    torch: str
    rows: dict[str, Row]


def load_table(path: str | Path = TABLE) -> Table:
    """Read a table written by `main(["--json", path])`."""
    d = json.loads(Path(path).read_text())
    return Table(d["transformers"], d["torch"], {r["model_type"]: Row(**r) for r in d["rows"]})


def same_versions(table: Table) -> bool:
    """Whether the installed transformers and torch are the ones `table` was made with."""
    import transformers

    return (table.transformers, table.torch) == (transformers.__version__, torch.__version__)


def cause(row: Row) -> str:
    """What a type's outcome is held to across versions: "passed", or the status with the reason's
    leading fields: the stage and error class of a refusal or failure ("refused: hidden: HookSiteError"),
    the error class of a type not built, the rule of an exclusion (messages change between releases)."""
    if row.status == "passed":
        return "passed"
    n = 2 if row.status in ("refused", "failed") else 1
    return f"{row.status}: " + ": ".join(row.reason.split(": ")[:n])


def held_to(recorded: Row, got: Row, exact: bool) -> str | None:
    """Why `got` breaks its `recorded` outcome, or None when it holds: the same `cause` always, and
    with `exact` (the table's own transformers and torch: the sweep is seeded and deterministic) the
    same reason word for word where the type does not pass."""
    if cause(got) != cause(recorded):
        return (f"{got.model_type}: the table records {recorded.status} ({recorded.reason or 'every check'}); "
                f"this sweep gives {got.status}: {got.reason or 'every check'}")
    if exact and got.status != "passed" and got.reason != recorded.reason:
        return (f"{got.model_type}: {got.status} as recorded, but the reason changed under the table's own versions: "
                f"recorded {recorded.reason!r}, got {got.reason!r}")
    return None


@dataclass
class Drift:
    """A sweep against a table: types new to it, types gone from transformers, outcomes changed."""

    new: list[str]
    """Installed types the table lacks (reported, not failed: regenerate the table to hold them)."""
    gone: list[str]
    """Types of the table the installed transformers no longer has."""
    changed: dict[str, str]
    """model_type -> `held_to`'s reason, for types whose outcome broke the table's."""


def compare(table: Table, rows: list[Row], exact: bool | None = None) -> Drift:
    """`rows` (one sweep, possibly `--only` some types) against `table`; `exact` defaults to `same_versions`."""
    exact = same_versions(table) if exact is None else exact
    got = {r.model_type: r for r in rows}
    changed = {t: why for t, r in got.items() if t in table.rows and (why := held_to(table.rows[t], r, exact))}
    return Drift(new=sorted(set(got) - set(table.rows)), gone=sorted(set(table.rows) - set(_installed())),
                 changed=changed)


def _installed() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

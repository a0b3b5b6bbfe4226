"""Per-sample outcomes of one model on a problem list: which samples were correct and which solution each wrote.

What it is: `Outcomes` (per problem, one stable key per sample, None for an incorrect one, plus the
task's distinct-correct rule per problem), its compact JSON form (`to_json` / `from_json`, stored in
every sweep cell), `key_digest` (a canonical solution's stable 12-hex-digit key), `stack` (several
seeds' outcomes as one, clustered by problem) and `check_comparable`. The mixture frontier
(`probe.metrics.frontier`), row-level splicing and the compute match read them.

What it is not: a scorer (`probe.metrics.evaluate.score_branches` decides correctness and the
canonical forms turned into keys here) or a metric.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool
from torch import Tensor

if TYPE_CHECKING:
    from probe.metrics.evaluate import Scored

FORMAT = "forksight.outcomes/1"


def _stable_repr(x: Any) -> str:
    """repr with sets / dicts sorted, so the digest is the same in every process (str hashing of a
    frozenset's order is randomised per process)."""
    if isinstance(x, (set, frozenset)):
        return f"{type(x).__name__}({{{', '.join(sorted(map(_stable_repr, x)))}}})"
    if isinstance(x, dict):
        return "{" + ", ".join(sorted(f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in x.items())) + "}"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(map(_stable_repr, x)) + ("," if isinstance(x, tuple) and len(x) == 1 else "")
        return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
    return repr(x)


def key_digest(canonical: Hashable) -> str:
    """Stable 12-hex-digit key of a canonical solution: sha1 of its (set-sorted) repr."""
    return hashlib.sha1(_stable_repr(canonical).encode()).hexdigest()[:12]


@dataclass
class Outcomes:
    """Per-sample outcomes of one model on a problem list (n samples per problem)."""

    keys: list[list[str | None]]
    """[problem][sample]: stable key of the canonical solution of a correct sample, None if incorrect."""
    eligible: list[bool | None]
    """Per problem: counts toward distinct_correct_mean by the task's rule (n_solutions >= 3), or
    None where the task cannot count solutions (decided by who solved it: `probe.metrics.frontier`'s docstring)."""

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("no problems: outcomes need at least one problem with >= 1 sample")
        n = len(self.keys[0])
        bad = [i for i, row in enumerate(self.keys) if len(row) != n]
        if n < 1 or bad:
            raise ValueError(f"every problem needs the same n >= 1 samples; problem 0 has {n}"
                             + (f", problems {bad[:5]} differ" if bad else ""))
        if any(k is not None and not isinstance(k, str) for row in self.keys for k in row):
            raise TypeError("keys must be str or None; digest canonical forms with key_digest")
        if len(self.eligible) != len(self.keys):
            raise ValueError(f"eligible has {len(self.eligible)} entries for {len(self.keys)} problems")
        self.keys = [list(row) for row in self.keys]
        self.eligible = [None if e is None else bool(e) for e in self.eligible]

    @property
    def n(self) -> int:
        """Samples per problem."""
        return len(self.keys[0])

    @property
    def n_problems(self) -> int:
        return len(self.keys)

    @property
    def correct(self) -> Bool[Tensor, "problems n"]:
        return torch.tensor([[k is not None for k in row] for row in self.keys], dtype=torch.bool)

    @classmethod
    def from_scored(cls, scored: Scored, n: int, eligible: Sequence[bool | None]) -> Outcomes:
        """From `probe.metrics.evaluate.Scored` rows (prompt-major, row = problem * n + sample)."""
        rows, p = len(scored.canonical), len(eligible)
        if p == 0 or rows != p * n:
            raise ValueError(f"scored has {rows} rows; expected n={n} samples x {p} problems")
        ok = scored.correct.tolist()
        if any(ok[r] and scored.canonical[r] is None for r in range(rows)):
            raise ValueError("a correct row has canonical None; every valid completion needs a key")
        keys = [key_digest(c) if ok[r] else None for r, c in enumerate(scored.canonical)]
        return cls([keys[i * n:(i + 1) * n] for i in range(p)], list(eligible))

    def to_json(self) -> dict[str, Any]:
        """Compact JSON-able form: per problem its distinct keys and one index per sample (-1 = incorrect)."""
        table, index = [], []
        for row in self.keys:
            ids: dict[str, int] = {}
            index.append([-1 if k is None else ids.setdefault(k, len(ids)) for k in row])
            table.append(list(ids))
        return {"format": FORMAT, "n": self.n, "eligible": self.eligible, "keys": table, "index": index}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Outcomes:
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r} is not {FORMAT!r}; write it with Outcomes.to_json")
        try:
            keys = [[None if j < 0 else t[j] for j in idx] for t, idx in zip(d["keys"], d["index"], strict=True)]
        except (IndexError, ValueError) as e:
            raise ValueError(f"corrupt outcomes record: {e}") from None
        out = cls(keys, d["eligible"])
        if out.n != d["n"]:
            raise ValueError(f"record says n={d['n']} but holds {out.n} samples per problem")
        return out


def stack(runs: Sequence[Outcomes]) -> tuple[Outcomes, list[int]]:
    """Outcomes of the same problems at several sampling seeds as one table (problems repeated,
    seed-major) and the problem id of each row, for `compare_to_frontier(..., clusters=...)`.
    Means over the stacked rows are the means over seeds of the per-seed metrics."""
    if not runs:
        raise ValueError("no runs to stack; pass the outcomes of at least one seed")
    for r in runs[1:]:
        check_comparable(runs[0], r, "of two seeds")
    keys = [row for r in runs for row in r.keys]
    return Outcomes(keys, runs[0].eligible * len(runs)), list(range(runs[0].n_problems)) * len(runs)


def check_comparable(a: Outcomes, b: Outcomes, names: str = "a, b") -> None:
    """Raise unless `a` and `b` are outcomes of the same problems (count, n, eligibility), naming them."""
    if (a.n_problems, a.n) != (b.n_problems, b.n):
        raise ValueError(f"outcomes {names} differ: {a.n_problems} problems x {a.n} samples vs "
                         f"{b.n_problems} x {b.n}; evaluate both on the same problems and n")
    if a.eligible != b.eligible:
        diff = [i for i, (x, y) in enumerate(zip(a.eligible, b.eligible)) if x != y]
        raise ValueError(f"outcomes {names} disagree on eligibility at problems {diff[:5]}; "
                         "use the same eligibility rule (same problem list) for both")

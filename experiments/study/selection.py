"""Selection arithmetic of the steering sweep: judging cells against the frontier, and the choice rules.

Pure functions over cell rows (dicts from `experiments.study.cells`, each holding its `outcomes`);
no sampling. Judging a row (`judge`) compares its outcomes with the base and RL outcomes of the
same half and seeds through `probe.metrics.frontier.compare_to_frontier`: restoration of distinct-correct
and of pass@64, pass@1 change, the base/RL mixture's restoration at the row's pass@1, and the
frontier excess, each with a paired problem-bootstrap interval.

The rules (applied on the selection half only; the chosen cells are then re-measured on the test
half at unseen seeds):
- `TOLERANCE_RULE`, per family: the highest restoration_distinct among cells with pass@1 >= RL's
  minus `tolerance` (ties: higher frontier excess, then id). This is "how much breadth at a bounded
  accuracy cost".
- `GOAL_RULE`, per family: the highest frontier_excess among cells with pass@1 >= RL's minus
  `goal_tolerance`: "what the RL network gives that no mixture gives, at almost no cost".
- the matched temperature: the temperature cell whose fork_entropy_mean is nearest a given cell's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probe.metrics.frontier import compare_to_frontier, splice, summary
from probe.metrics.outcomes import Outcomes, stack

TOLERANCE_RULE = ("highest restoration_distinct with pass_at_1 >= RL - {tol} (selection half, selection seed); "
                  "ties by frontier_excess")
GOAL_RULE = "highest frontier_excess with pass_at_1 >= RL - {tol} (selection half, selection seed)"


def parse_layers(spec: str) -> list[int]:
    """"0+1+2+3" -> [0, 1, 2, 3]; "2" -> [2]."""
    try:
        out = [int(x) for x in str(spec).split("+")]
    except ValueError:
        raise ValueError(f"layer set {spec!r}: write block indices joined by '+', e.g. 2 or 0+1+2+3") from None
    if len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"layer set {spec!r}: indices must be distinct and >= 0")
    return out


def outcomes_of(rows: Sequence[dict]) -> tuple[Outcomes, list[int]]:
    """The rows' outcomes (one row per seed, same problems) stacked, and each stacked row's problem id."""
    return stack([Outcomes.from_json(r["outcomes"]) for r in rows])


def judge(cell: Sequence[dict], base: Sequence[dict], rl: Sequence[dict], n_boot: int = 1000,
          seed: int = 0) -> dict[str, Any]:
    """`compare_to_frontier` of a cell evaluated at one or more seeds (rows in seed order, the same
    seeds for base and RL), problems resampled together with all their seeds."""
    c, clusters = outcomes_of(cell)
    b, _ = outcomes_of(base)
    r, _ = outcomes_of(rl)
    out = compare_to_frontier(c, b, r, n_boot=n_boot, seed=seed, clusters=clusters)
    s = summary(c)
    out.update(pass_at_64=s["pass_at_64"], pass_at_k=s["pass_at_k"], seeds=[x.get("seed") for x in cell])
    return out


def spliced(cell: dict, rl: dict, fraction: float) -> dict:
    """Row-level application at `fraction`: samples 0..m-1 from `cell`, the rest from `rl`
    (m = round(fraction * n)), as a row with the outcome metrics (entropies are not defined; the
    share of samples cut at the token budget is the two cells' weighted by m and n - m: its
    expectation, since a cell's samples are exchangeable across sample indices)."""
    from probe.metrics.frontier import m_of_q

    c, r = Outcomes.from_json(cell["outcomes"]), Outcomes.from_json(rl["outcomes"])
    m = m_of_q(fraction, c.n)
    o = splice(c, r, m)
    shares = (cell.get("truncated_share"), rl.get("truncated_share"))
    return {**{k: cell.get(k) for k in ("half", "seed", "n_problems", "n_samples", "temperature", "params")},
            **summary(o), "outcomes": o.to_json(), "fork_entropy_mean": None, "planning_entropy_mean": None,
            "execution_entropy_mean": None,
            "truncated_share": None if None in shares else (m * shares[0] + (c.n - m) * shares[1]) / c.n}


def within_tolerance(row: dict, tol: float) -> bool:
    """pass@1 at or above RL - `tol` (float slack 1e-12): the accuracy bar of every choice rule."""
    return row["pass_at_1_change"] is not None and row["pass_at_1_change"] >= -tol - 1e-12


def choose(rows: Sequence[dict], tol: float) -> dict | None:
    """TOLERANCE_RULE over judged rows (each with restoration_distinct, frontier_excess, pass_at_1_change)."""
    ok = [r for r in rows if r.get("restoration_distinct") is not None and within_tolerance(r, tol)]
    return max(ok, key=lambda r: (r["restoration_distinct"], r.get("frontier_excess") or 0.0, r["id"]), default=None)


def choose_goal(rows: Sequence[dict], tol: float) -> dict | None:
    """GOAL_RULE over judged rows."""
    ok = [r for r in rows if r.get("frontier_excess") is not None and within_tolerance(r, tol)]
    return max(ok, key=lambda r: (r["frontier_excess"], r["id"]), default=None)


def matched_temperature(temps: Sequence[dict], anchor: dict) -> dict | None:
    """The temperature row whose fork_entropy_mean is nearest `anchor`'s (None without entropies)."""
    h = anchor.get("fork_entropy_mean")
    usable = [t for t in temps if t.get("fork_entropy_mean") is not None]
    if h is None or not usable:
        return None
    return min(usable, key=lambda t: (abs(t["fork_entropy_mean"] - h), t["id"]))

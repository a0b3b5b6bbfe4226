"""Selection arithmetic of the steering sweep: layer sets, seed pooling, restoration, the `best` rule.

Pure functions over sweep rows (dicts with `experiments.steer_sweep.COLUMNS` keys); no sampling.
Restoration of a metric m: (m(cell) - m(RL)) / (m(base) - m(RL)). `select_best` is SELECTION in
`experiments.study.sweep`: the highest restoration_distinct among RL-alone steering cells whose
pass@1 is at least RL's minus the tolerance.
"""

from __future__ import annotations


def full_stage(i: int) -> str:
    """Stage name of the full split at sampling seed offset i ("full", "full-s1", ...)."""
    return "full" if i == 0 else f"full-s{i}"


POOLED = ("pass_at_1", "pass_at_64", "distinct_correct_mean", "fork_entropy_mean", "planning_entropy_mean")


def pool(rows: list[dict]) -> dict:
    """One row from the same cell at several seeds: metric means (pass@k per k, per-problem arrays
    elementwise), the per-seed values under `per_seed`, and stage "full" (id of the first seed's row)."""
    first = rows[0]
    if len(rows) == 1:
        return {**first, "seeds": 1}
    mean = lambda xs: None if any(x is None for x in xs) else sum(xs) / len(xs)  # noqa: E731
    out = {**first, **{k: mean([r.get(k) for r in rows]) for k in POOLED}, "seeds": len(rows),
           "pass_at_k": {k: mean([r["pass_at_k"][k] for r in rows]) for k in first["pass_at_k"]},
           "pass_at_k_ci": None, "per_seed": [{k: r.get(k) for k in ("id", *POOLED)} for r in rows]}
    if all(r.get("per_problem") for r in rows):
        pp = [r["per_problem"] for r in rows]
        out["per_problem"] = {"n_correct": [mean(list(v)) for v in zip(*(p["n_correct"] for p in pp))],
                              "distinct_correct": [mean(list(v)) for v in zip(*(p["distinct_correct"] for p in pp))],
                              "distinct_eligible": pp[0]["distinct_eligible"]}
    return out


def parse_layers(spec: str) -> list[int]:
    """"0+1+2+3" -> [0, 1, 2, 3]; "2" -> [2]."""
    try:
        out = [int(x) for x in str(spec).split("+")]
    except ValueError:
        raise ValueError(f"layer set {spec!r}: write block indices joined by '+', e.g. 2 or 0+1+2+3") from None
    if len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"layer set {spec!r}: indices must be distinct and >= 0")
    return out


def restoration(cell: float | None, rl: float | None, base: float | None) -> float | None:
    """(cell - rl) / (base - rl); None when undefined (a missing value or base == rl)."""
    if cell is None or rl is None or base is None or base == rl:
        return None
    return (cell - rl) / (base - rl)


def with_restoration(row: dict, base: dict, rl: dict) -> dict:
    return {**row, "restoration_pass_at_64": restoration(row.get("pass_at_64"), rl.get("pass_at_64"), base.get("pass_at_64")),
            "restoration_distinct": restoration(row.get("distinct_correct_mean"), rl.get("distinct_correct_mean"),
                                                base.get("distinct_correct_mean"))}


def select_best(rows: list[dict], rl: dict, tol: float) -> dict | None:
    """SELECTION applied to `rows` (already carrying restoration)."""
    ok = [r for r in rows if r["kind"] == "steer" and r["rl_alone"] and r["restoration_distinct"] is not None
          and r["pass_at_1"] >= rl["pass_at_1"] - tol]
    return max(ok, key=lambda r: (r["restoration_distinct"], r["id"]), default=None)


def score(r: dict) -> tuple[float, str]:
    """Sort key: restoration_distinct (None lowest), ties broken by id so a resumed run picks the same cells."""
    return (-float("inf") if r.get("restoration_distinct") is None else r["restoration_distinct"], r["id"])


def beats_temperature(d_restoration: float | None, d_pass_at_1: float | None, tol: float) -> bool:
    """Steering minus temperature baseline: better on one axis, no worse on the other (pass@1 within `tol`)."""
    if d_restoration is None or d_pass_at_1 is None:
        return False
    return (d_restoration > 0 and d_pass_at_1 >= -tol) or (d_restoration >= 0 and d_pass_at_1 > 0)

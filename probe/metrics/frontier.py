"""The base/RL mixture frontier: how much breadth sampling the base model part of the time buys.

What it is: pure arithmetic on per-sample outcomes already drawn (no sampling, no model). For each
problem the base and the RL model drew n samples with the same sampler seed (common random
numbers). The *mixture at fraction q* takes, per problem, samples 0..m-1 from the base and m..n-1
from RL, m = round(q * n) rounded half up (`splice(base, rl, m)`). Over a grid of m (default every
m in 0..n) its pass@1, pass@k and distinct_correct_mean trace a polyline in the
(pass@1, restoration_distinct) plane from RL (q=0: restoration 0) to the base (q=1: restoration 1).
A steered cell is then compared with that polyline: does it buy breadth a mixture cannot?

Definitions (issue #12):
- restoration of a metric: (cell - RL) / (base - RL); None unless base > RL (or when a value is
  missing): where RL lost none of the metric there is nothing to restore, and dividing by a
  negative gap would score a cell that adds breadth below one that removes it. `distinct_minus_rl`
  (cell - RL, distinct-correct solutions per problem) is defined either way.
- `frontier(p)`: the highest restoration_distinct on the polyline at pass@1 >= p. The polyline
  joins the grid points in order of m by straight segments; its part with pass@1 >= p is every
  vertex with pass@1 >= p plus, on each segment whose ends straddle p, the point at pass@1 == p
  (linear interpolation). frontier(p) is the max of restoration over that part. Hence p at or
  below every vertex's pass@1 gives the max over the whole curve, and p above every vertex gives
  the restoration of the vertex (max over ties) with the highest pass@1 (~0: the q=0 end).
  It is non-increasing in p and continuous.
- `frontier_excess` of a cell: its restoration_distinct minus frontier(its pass@1). ~0: the method
  does what sampling the base part of the time does; > 0: breadth a mixture cannot give.
- Row-level steering at fraction q equals `splice(steered, rl, m)`: each row's randomness depends
  only on (seed, prompt, sample index, step) (`probe.sampling.sampler`).

Which problems distinct-correct is averaged over (issue #23): `Outcomes.eligible` holds the task's
rule per problem (True / False: n_solutions >= 3 or not) or None where the task cannot count
solutions. A None problem counts, in a comparison (`mixture_curve`, `compare_to_frontier`), where
both the base and the RL model solved it at least once (over all rows of its cluster: all its
seeds), the same problems for base, RL, every mixture point and the cell (a cell that misses one
of them counts 0 there: it is measured on the reference pair's problems, so it cannot shrink its
own average by failing problems; the matched measure below sets its rows differently); alone
(`summary`), where that model solved it. Countdown has a rule for every problem, so nothing changes
there.

Matched breadth where solutions cannot be counted (`breadth_measure`): where the task has no rule
on any problem (a math file), nearly every correct completion is worded differently, so
distinct-correct tracks how many samples are correct and a model that solves more looks broader for
that alone. There every comparison's distinct-correct is *matched* instead (`matched_columns`): per
row, m = the fewest correct samples of the models sampled on their own (base, RL and, in
`compare_to_frontier`, the cell); rows with m >= 2 count (the same rows for every column); each
column (base, RL, every mixture point, the cell) scores the expected distinct solutions among
min(m, its correct samples) of its correct samples drawn without replacement
(`probe.metrics.passk.rarefied_distinct`; 0 with none correct). A mixture point (base's and RL's own
samples spliced) with fewer than m correct samples can show at most that many solutions. The cell sets
m and the rows like base and RL because the rows are chosen on base's and RL's *drawn* counts: a row
where RL happened to get 2 correct counts, and a second draw of RL itself would often get fewer there,
so capping the cell instead would score a second draw of RL below RL (`tests/test_frontier_matched.py`
measures that bias). A cell that
solves a row fewer than twice leaves that row out of its comparison (its pass@1 says what it lost);
one that never does has no matched breadth (None). Restoration, frontier and excess then ask "more
different solutions among the same number of correct ones". One bias is left, against the cell: a
row-level cell (steered samples spliced with RL's own) carries part of RL's conditioned draw, and a
mixture point's base samples come from the base's conditioned draw, so a row-level cell that behaves
exactly like a mixture scores slightly below the frontier (tested; conservative for any claim of
excess).
`distinct_measure` in every output says which measure was used.

Intervals: paired percentile bootstrap over problems (same resampled indices for base, RL, cell
and every mixture point), vectorised as `probe.stats.bootstrap_weights` (a [replicates, problems]
count matrix, clusters of rows moving together) times per-problem columns. Sums of integer
columns (correct counts, distinct counts) are exact in float64, so a cell that *is* a mixture
point lands exactly on its vertex in every replicate. A replicate enters the interval of a
restoration (and of the frontier and the excess) only if its base - RL gap is positive, like the
full-sample gap, and it holds an eligible problem; `n_boot_used` counts them.

What it is not: a sampler, a scorer or a selection rule; `probe.metrics.evaluate` produces the `Scored`
rows that `probe.metrics.outcomes.Outcomes.from_scored` turns into the outcomes read here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.metrics.outcomes import Outcomes, check_comparable
from probe.metrics.passk import (
    default_ks,
    distinct_correct,
    distinct_eligible,
    paired_eligible,
    pass_at_k_per_problem,
    rarefied_distinct,
    solution_counts,
    subset_label,
)
from probe.stats import bootstrap_weights, cluster_ids, percentile_interval


def _check_m(m: int, n: int) -> int:
    if isinstance(m, bool) or not hasattr(m, "__index__") or not 0 <= m.__index__() <= n:
        raise ValueError(f"m={m!r} base samples is outside 0..n={n}; pass an int in that range")
    return m.__index__()


def m_of_q(q: float, n: int) -> int:
    """Base samples per problem at fraction q: round(q * n), halves rounded up."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"fraction q={q} is outside [0, 1]; pass the share of base samples")
    return math.floor(q * n + 0.5)


def splice(a: Outcomes, b: Outcomes, m: int) -> Outcomes:
    """Samples 0..m-1 of each problem from a, m..n-1 from b (mixture = splice(base, rl, m))."""
    check_comparable(a, b)
    _check_m(m, a.n)
    return Outcomes([ra[:m] + rb[m:] for ra, rb in zip(a.keys, b.keys)], a.eligible)


def per_problem(o: Outcomes) -> tuple[Int[Tensor, " problems"], Int[Tensor, " problems"]]:
    """(correct samples, distinct correct keys) per problem, int64."""
    return o.correct.sum(1), distinct_correct(o.keys)


def resolved_eligible(
    models: Sequence[Outcomes], clusters: Sequence[int] | None = None
) -> Bool[Tensor, " problems"]:
    """Per row: does it count toward distinct_correct_mean when `models` are compared (one model:
    its own subset). The rule where `eligible` has one; else every model solved the problem in some
    row of its cluster (`probe.metrics.passk.distinct_eligible`, `paired_eligible`)."""
    if not models:
        raise ValueError("no outcomes; pass at least one model's")
    for o in models[1:]:
        check_comparable(models[0], o, "of the compared models")
    unit = cluster_ids(models[0].n_problems, clusters)  # (P,)
    n_units = int(unit.max()) + 1
    solved = torch.stack([torch.zeros(n_units, dtype=torch.long).index_add_(0, unit, o.correct.any(1).long())[unit] > 0
                          for o in models])  # (models, P): solved somewhere in the row's unit
    return paired_eligible(distinct_eligible(models[0].eligible, solved))


MATCHED_MIN = 2
"""A row counts toward the matched measure when base, RL (and the cell compared) each have at least this
many correct samples."""

MATCHED_SUBSET = (f"rows where base, RL and the cell each have >= {MATCHED_MIN} correct samples (n_solutions unknown: "
                  "distinct solutions among the same number of correct samples, the fewest of theirs)")


def breadth_measure(eligible: Sequence[bool | None]) -> str:
    """"matched" where the task counts no problem's solutions (every `eligible` None), else "paired"."""
    return "matched" if all(e is None for e in eligible) else "paired"


def matched_columns(
    columns: Sequence[Outcomes], base: Outcomes, rl: Outcomes, drawn: Sequence[Outcomes] = ()
) -> tuple[Float[Tensor, "problems columns"], Bool[Tensor, " problems"]]:
    """Matched distinct-correct of each column, per row, and the rows that count (module docstring).

    columns: outcomes of the same problems as base and RL (e.g. RL, base, mixtures, a cell). drawn:
    the columns sampled on their own besides base and RL (a cell; not a mixture of their samples),
    whose correct samples also set m and the rows. Returns (values [P, len(columns)] float64: expected
    distinct among min(m, C) correct samples, C the column's correct samples on the row, m = the
    fewest of base's, RL's and each drawn column's; eligible [P]: m >= `MATCHED_MIN`).
    """
    for c in (*columns, *drawn):
        check_comparable(c, base, "column, base")
    check_comparable(base, rl, "base, rl")
    m = torch.stack([o.correct.sum(1) for o in (base, rl, *drawn)]).amin(0)  # (P,)
    values = torch.zeros(base.n_problems, len(columns), dtype=torch.float64)
    for j, col in enumerate(columns):
        for p, keys in enumerate(col.keys):
            counts = solution_counts(keys)
            if counts and m[p] >= MATCHED_MIN:
                values[p, j] = rarefied_distinct(counts, min(int(m[p]), sum(counts)))
    return values, m >= MATCHED_MIN


def summary(o: Outcomes, clusters: Sequence[int] | None = None) -> dict[str, Any]:
    """pass_at_1, pass_at_64 (n >= 64), pass_at_k {str(k)} for k = 1, 2, 4, ..., n, and
    distinct_correct_mean (over this model's eligible problems, `resolved_eligible([o], clusters)`;
    None when none is eligible) with `distinct_correct_subset` naming them."""
    out = _summaries(*(x[:, None] for x in per_problem(o)), resolved_eligible([o], clusters), o.n)[0]
    return {**out, "distinct_correct_subset": subset_label(o.eligible, paired=False)}


def _summaries(counts: Tensor, distinct: Tensor, eligible: Bool[Tensor, " problems"], n: int) -> list[dict]:
    """Metrics of each column of per-problem (counts, distinct) [P, M]; distinct over `eligible` rows."""
    p, cols = counts.shape
    per_k = {k: pass_at_k_per_problem(counts.flatten(), n, k).view(p, cols).mean(0) for k in default_ks(n)}
    p64 = pass_at_k_per_problem(counts.flatten(), n, 64).view(p, cols).mean(0) if n >= 64 else None
    el = torch.as_tensor(eligible, dtype=torch.bool)
    dmean = distinct[el].double().mean(0) if el.any() else None
    return [{"pass_at_1": counts[:, j].sum().item() / (n * p),  # exact sum, as in the bootstrap
             "pass_at_64": None if p64 is None else p64[j].item(),
             "pass_at_k": {str(k): v[j].item() for k, v in per_k.items()},
             "distinct_correct_mean": None if dmean is None else dmean[j].item()} for j in range(cols)]


def mixture_per_problem(
    base: Outcomes, rl: Outcomes, ms: Sequence[int]
) -> tuple[Int[Tensor, "problems grid"], Int[Tensor, "problems grid"]]:
    """Per problem and grid m: (correct samples, distinct correct keys) of splice(base, rl, m).

    Vectorised: a key is in the mixture at m iff its first base index is < m or its last RL
    index is >= m; correct counts are a base prefix sum plus an RL suffix sum.
    """
    check_comparable(base, rl, "base, rl")
    n = base.n
    grid = torch.tensor([_check_m(m, n) for m in ms], dtype=torch.long)  # (M,)
    first, last = [], []
    for rb, rr in zip(base.keys, rl.keys):
        f: dict[str, int] = {}
        lst: dict[str, int] = {}
        for j, k in enumerate(rb):
            if k is not None:
                f.setdefault(k, j)
        for j, k in enumerate(rr):
            if k is not None:
                lst[k] = j
        union = list(f.keys() | lst.keys())
        first.append([f.get(k, n + 1) for k in union])  # n + 1: never < m
        last.append([lst.get(k, -1) for k in union])  # -1: never >= m
    width = max(1, max(map(len, first)))
    fb = torch.tensor([r + [n + 1] * (width - len(r)) for r in first])  # (P, K)
    lr = torch.tensor([r + [-1] * (width - len(r)) for r in last])  # (P, K)
    g = grid[None, :, None]  # (1, M, 1)
    distinct = ((fb[:, None, :] < g) | (lr[:, None, :] >= g)).sum(-1)  # (P, M)
    zero = torch.zeros(base.n_problems, 1, dtype=torch.long)
    cb = torch.cat([zero, base.correct.long().cumsum(1)], 1)  # (P, n+1): base correct in [0, m)
    cr = torch.cat([zero, rl.correct.long().cumsum(1)], 1)  # (P, n+1): RL correct in [0, m)
    counts = cb[:, grid] + cr[:, -1:] - cr[:, grid]  # (P, M)
    return counts, distinct


def restoration(cell: float | None, *, base: float | None, rl: float | None) -> float | None:
    """(cell - rl) / (base - rl); None when a value is missing / NaN or base <= rl (nothing lost)."""
    vals = (cell, base, rl)
    if any(v is None or math.isnan(v) for v in vals) or base <= rl:
        return None
    return (cell - rl) / (base - rl)


def _grid(n: int, ms: Sequence[int] | None, qs: Sequence[float] | None) -> list[int]:
    if ms is not None and qs is not None:
        raise ValueError("pass either ms (base samples per problem) or qs (fractions), not both")
    if qs is not None:
        ms = [m_of_q(float(q), n) for q in qs]
    grid = sorted({_check_m(m, n) for m in (range(n + 1) if ms is None else ms)})
    if not grid:
        raise ValueError("empty grid; pass at least one m (or q)")
    return grid


def _distinct_columns(
    base: Outcomes, rl: Outcomes, grid: Sequence[int], paired: Tensor, cells: Sequence[Outcomes],
    clusters: Sequence[int] | None,
) -> tuple[Tensor, Bool[Tensor, " problems"], str]:
    """Per-problem distinct-correct of the columns [RL, base, each grid mixture, *cells] in the
    task's measure, the rows that count, and the measure's name: `paired` (those columns' distinct
    counts) over `resolved_eligible`, or `matched_columns` (the cells setting m and the rows with base
    and RL) where `breadth_measure` says so."""
    measure = breadth_measure(base.eligible)
    if measure == "matched":
        return (*matched_columns([rl, base, *(splice(base, rl, m) for m in grid), *cells], base, rl, drawn=cells),
                measure)
    return paired, resolved_eligible([base, rl], clusters), measure


def mixture_curve(
    base: Outcomes, rl: Outcomes, ms: Sequence[int] | None = None, qs: Sequence[float] | None = None,
    clusters: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """The mixture's metrics at each grid point, in increasing m (duplicates after rounding merged).

    ms: base samples per problem (default every m in 0..n); or qs: fractions in [0, 1]. Each dict:
    q (= m / n, the fraction realised), m, pass_at_1, pass_at_64 (None if n < 64), pass_at_k,
    distinct_correct_mean (over the problems paired for base and RL, `resolved_eligible`; matched
    where `breadth_measure` says so: `matched_columns`), distinct_measure,
    restoration_distinct, restoration_pass_at_64 (vs base and RL). clusters: as in
    `compare_to_frontier` (the problem id of each row of `stack`ed seeds).
    """
    grid = _grid(base.n, ms, qs)
    counts, distinct = mixture_per_problem(base, rl, [0, base.n, *grid])
    distinct, eligible, measure = _distinct_columns(base, rl, grid, distinct, (), clusters)
    rows = _summaries(counts, distinct, eligible, base.n)
    r, b = rows[0], rows[1]
    return [{"q": m / base.n, "m": m, **row, "distinct_measure": measure,
             "restoration_distinct": restoration(row["distinct_correct_mean"], base=b["distinct_correct_mean"],
                                                 rl=r["distinct_correct_mean"]),
             "restoration_pass_at_64": restoration(row["pass_at_64"], base=b["pass_at_64"], rl=r["pass_at_64"])}
            for m, row in zip(grid, rows[2:])]


def frontier_value(
    x: Float[Tensor, "*batch grid"], y: Float[Tensor, "*batch grid"], p: Float[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """frontier(p) of the polyline (x, y) in grid order, batched (rule in the module docstring).

    x: pass@1 (fraction), y: restoration, p: the pass@1 floor. NaN anywhere in a row -> NaN.
    """
    x, y, p = x.double(), y.double(), torch.as_tensor(p, dtype=torch.float64)
    pc = p.unsqueeze(-1)  # (*batch, 1)
    ninf = torch.tensor(-math.inf, dtype=torch.float64)
    best = torch.where(x >= pc, y, ninf).amax(-1)  # vertices at or above the floor
    if x.shape[-1] > 1:
        x0, x1, y0, y1 = x[..., :-1], x[..., 1:], y[..., :-1], y[..., 1:]
        cross = (x0 - pc) * (x1 - pc) < 0  # segment straddles p strictly
        t = (pc - x0) / torch.where(cross, x1 - x0, 1.0)
        best = torch.maximum(best, torch.where(cross, y0 + t * (y1 - y0), ninf).amax(-1))
    top = torch.where(x == x.amax(-1, keepdim=True), y, ninf).amax(-1)  # p above every vertex
    out = torch.where(best == -math.inf, top, best)
    nan = x.isnan().any(-1) | y.isnan().any(-1) | p.isnan()
    return out.masked_fill(nan, math.nan)


def frontier_at(curve: Sequence[Mapping[str, Any]], pass_at_1: float,
                key: str = "restoration_distinct") -> float | None:
    """frontier(pass_at_1) of a `mixture_curve` (None when the curve's restoration is undefined)."""
    if not curve:
        raise ValueError("empty curve; build one with mixture_curve(base, rl)")
    if any(c[key] is None for c in curve):
        return None
    xy = torch.tensor([[c["pass_at_1"], c[key]] for c in curve], dtype=torch.float64)
    v = frontier_value(xy[:, 0], xy[:, 1], torch.tensor(float(pass_at_1), dtype=torch.float64)).item()
    return None if math.isnan(v) else v


def compare_to_frontier(
    cell: Outcomes, base: Outcomes, rl: Outcomes, *, ms: Sequence[int] | None = None,
    qs: Sequence[float] | None = None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
    clusters: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A cell against the base/RL mixture frontier, with paired problem-bootstrap intervals.

    Returns restoration_distinct, restoration_pass_at_64 (None if n < 64; each None unless base > RL
    in it), pass_at_1_change (cell minus RL, fraction), distinct_minus_rl (cell minus RL, distinct-correct
    solutions per problem in the measure: defined whatever the gap's sign), frontier_restoration (frontier at the cell's pass@1), frontier_excess
    (restoration_distinct - frontier_restoration), each with `*_ci` [lo, hi] ((1 - alpha)
    percentile; None when undefined), plus pass_at_1, distinct_correct_mean, distinct_measure
    ("paired" or "matched": `breadth_measure`), distinct_gap (base minus RL distinct-correct in that
    measure, the denominator of every restoration) with distinct_gap_ci, n_boot_used, and
    `distinct_correct_subset` / `distinct_correct_n_problems` (units): the problems every
    distinct-correct mean here is over, the same for base, RL, mixture and cell (module docstring; on the
    matched measure, rows where this cell too has >= 2 correct samples).
    clusters: the unit each row belongs to, resampled together (e.g. the problem id of each row of
    `stack`ed seeds, so a problem's seeds stay together); default: every row its own unit.
    """
    check_comparable(cell, base, "cell, base")
    check_comparable(base, rl, "base, rl")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1 and alpha={alpha} in (0, 1)")
    n, p_count = base.n, base.n_problems
    grid = _grid(n, ms, qs)
    mc, md = mixture_per_problem(base, rl, [0, n, *grid])  # (P, 2 + M): RL, base, grid
    cc, cd = per_problem(cell)
    counts = torch.cat([mc, cc[:, None]], 1).double()  # (P, 3 + M): RL, base, grid..., cell
    unit = cluster_ids(p_count, clusters)  # (P,) ids 0..U-1
    dist, eligible, measure = _distinct_columns(base, rl, grid, torch.cat([md, cd[:, None]], 1), (cell,), clusters)
    dist = dist.double()  # (P, 3 + M)
    w = bootstrap_weights(p_count, n_boot, seed, clusters)  # (B+1, P): row 0 the full sample
    we = w * eligible.double()  # (B+1, P)
    p1 = (w @ counts) / (n * p_count)  # (B+1, 3+M): pass@1, exact integer sums
    dm = (we @ dist) / we.sum(1, keepdim=True)  # NaN where no eligible problem was drawn
    gap = dm[:, 1] - dm[:, 0]
    r_all = (dm - dm[:, :1]) / gap[:, None]  # restoration of every column
    r_cell = r_all[:, -1]
    fr = frontier_value(p1[:, 2:-1], r_all[:, 2:-1], p1[:, -1])
    stats = {"restoration_distinct": r_cell, "restoration_pass_at_64": None,
             "pass_at_1_change": p1[:, -1] - p1[:, 0], "frontier_restoration": fr, "frontier_excess": r_cell - fr,
             "distinct_minus_rl": dm[:, -1] - dm[:, 0]}
    ok = {k: (gap > 0) & (gap[0] > 0) & v.isfinite() for k, v in stats.items() if v is not None}
    ok["pass_at_1_change"] = torch.ones(n_boot + 1, dtype=torch.bool)
    ok["distinct_minus_rl"] = stats["distinct_minus_rl"].isfinite()
    if n >= 64:
        p64 = torch.cat([pass_at_k_per_problem(c, n, 64)[:, None] for c in (mc[:, 0], mc[:, 1], cc)], 1)
        s = (w @ p64) / p_count  # (B+1, 3): RL, base, cell
        gap64 = s[:, 1] - s[:, 0]
        stats["restoration_pass_at_64"] = (s[:, 2] - s[:, 0]) / gap64
        ok["restoration_pass_at_64"] = (gap64 > 0) & (gap64[0] > 0)
    out: dict[str, Any] = {}
    for name, v in stats.items():
        if v is None:  # n < 64
            out[name] = out[f"{name}_ci"] = None
            continue
        good = v[1:][ok[name][1:]]
        defined = bool(ok[name][0])
        out[name] = v[0].item() if defined else None
        out[f"{name}_ci"] = list(percentile_interval(good, alpha)) if defined and good.numel() else None
    g_ok = gap[1:][gap[1:].isfinite()]
    out["distinct_gap"] = None if gap[0].isnan() else gap[0].item()  # base minus RL: what restoration divides by
    out["distinct_gap_ci"] = list(percentile_interval(g_ok, alpha)) if out["distinct_gap"] is not None and g_ok.numel() else None
    out.update(pass_at_1=p1[0, -1].item(), distinct_correct_mean=None if dm[0, -1].isnan() else dm[0, -1].item(),
               n_boot_used=int(ok["frontier_excess"][1:].sum()), n_boot=n_boot,  # the excess interval's replicates
               distinct_measure=measure, distinct_correct_subset=(
                   MATCHED_SUBSET if measure == "matched" else subset_label(base.eligible, paired=True)),
               distinct_correct_n_problems=int(unit[eligible].unique().numel()))
    return out

"""Statistics every report shares: the one bootstrap resampler, the intervals built on it, exact
Student-t quantiles, and the one way a number or an interval is printed.

What it is:
- Resampling. `resample_indices` is the only place bootstrap draws are made (a seeded torch
  generator, indices drawn with replacement). Everything else is built on it: `bootstrap_ci`
  (plain: rows of one table), `paired_ci` (paired: one row per problem, one column per model,
  rows resampled together so the comparison stays paired), `bootstrap_weights` (clustered: rows
  that share a cluster id, e.g. one problem's seeds, move together; as a replicates x rows weight
  matrix, so any number of per-row columns are resampled with the same draws by one matmul), and
  `strata=` of `resample_indices` (independent draws within windows, e.g. the first and last
  steps of a training log).
- Intervals. `percentile_interval` turns replicates into a (1 - alpha) percentile interval;
  `mean_ci` is the Student-t interval of a mean over a handful of values (training seeds), with the
  exact quantile `t_quantile` (scipy), not a table.
- Printing. `format_number` and `format_interval` render values and intervals for every report
  (markdown reports, claims' reasons, the README's tables, the notebooks), so the same interval
  reads the same everywhere.

What it is not: the metrics themselves (`probe.metrics`), or the claims' rules
(`experiments.study.claims`). It imports nothing of the project (layer 0 of `probe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


# --- resampling ----------------------------------------------------------------------------------
def resample_indices(n: int, n_boot: int, seed: int = 0, *, strata: int = 1) -> Int[Tensor, "strata boot n"]:
    """Bootstrap draws: for each of `strata` independent groups of `n` units, `n_boot` rows of `n`
    indices into 0..n-1 drawn uniformly with replacement (int64).

    One torch generator seeded by `seed` draws the strata in order, so stratum 0 is the same for
    any `strata`, and the same seed gives the same draws on every machine.
    """
    if n < 1:
        raise ValueError(f"n={n} units to resample; need at least one (a problem, a step, a cluster)")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1 (1000 is usual)")
    if strata < 1:
        raise ValueError(f"strata={strata} must be >= 1 (one per independently resampled window)")
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(n, (n_boot, n), generator=g) for _ in range(strata)])


def cluster_ids(rows: int, clusters: Sequence[int] | None = None) -> Int[Tensor, " rows"]:
    """Cluster id 0..U-1 of each row (ids renumbered in sorted order; default: every row its own)."""
    unit = torch.arange(rows) if clusters is None else torch.as_tensor(list(clusters), dtype=torch.long)
    if unit.shape != (rows,):
        raise ValueError(f"clusters has {unit.numel()} entries for {rows} rows; give one unit id per row")
    return torch.unique(unit, return_inverse=True)[1]


def bootstrap_weights(
    rows: int, n_boot: int, seed: int = 0, clusters: Sequence[int] | None = None
) -> Float[Tensor, "replicates rows"]:
    """Cluster-bootstrap weights, float64, shape (1 + n_boot, rows): row 0 is the full sample (all
    ones), row b how often each row's cluster was drawn in replicate b (clusters resampled with
    replacement, `resample_indices` over the clusters). `w @ column / w.sum(1)` is then the mean of
    a per-row column in every replicate; columns of several models weighed by the same `w` are
    paired. Integer columns give exact sums in float64."""
    unit = cluster_ids(rows, clusters)  # (rows,)
    n_units = int(unit.max()) + 1
    idx = resample_indices(n_units, n_boot, seed)[0]  # (n_boot, units)
    wu = torch.ones(n_boot + 1, n_units, dtype=torch.float64)
    wu[1:] = torch.zeros(n_boot, n_units, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(wu[1:]))
    return wu[:, unit]


def percentile_interval(
    replicates: Float[Tensor, " boot"], alpha: float = 0.05, *, order_statistics: bool = False
) -> tuple[float, float]:
    """The (1 - alpha) percentile interval of bootstrap `replicates` (alpha / 2 and 1 - alpha / 2
    quantiles, linearly interpolated; `order_statistics=True`: the order statistics just below and
    just above, for replicates that may be infinite, e.g. censored)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1); 0.05 gives a 95% interval")
    x = torch.as_tensor(replicates)
    if x.numel() == 0:
        raise ValueError("no replicates to take an interval of; check that some resample was defined")
    if order_statistics:
        return (torch.quantile(x, alpha / 2, interpolation="lower").item(),
                torch.quantile(x, 1 - alpha / 2, interpolation="higher").item())
    lo, hi = torch.quantile(x, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=x.dtype)).tolist()
    return lo, hi


def bootstrap_ci(
    per_problem: Float[Tensor, "problems ..."],
    statistic: Callable[[Tensor], Tensor | float] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of `statistic` over problems.

    per_problem: one row per problem (any trailing shape). Each replicate resamples rows with
    replacement (`resample_indices`, seeded by `seed`) and applies `statistic` (a tensor -> scalar;
    default: the mean of all entries, vectorised). Returns (lo, hi) in the statistic's units.
    """
    x = torch.as_tensor(per_problem).double()
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"need at least one problem; got shape {tuple(x.shape)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1); 0.05 gives a 95% interval")
    idx = resample_indices(x.shape[0], n_boot, seed)[0]  # (n_boot, problems)
    if statistic is None:
        stats = x[idx].flatten(1).mean(1)  # (n_boot,)
    else:
        stats = torch.tensor([float(statistic(x[row])) for row in idx], dtype=torch.float64)
    return percentile_interval(stats, alpha)


def paired_ci(
    columns: Sequence[Sequence[float]], statistic: Callable[[Tensor], Tensor | float], seed: int = 0,
    n_boot: int = 1000, alpha: float = 0.05,
) -> tuple[float, float]:
    """`bootstrap_ci` of `statistic` over problems, one column per model and one entry per problem:
    the rows of the stacked (problems, models) table are resampled together, so the comparison
    stays paired. E.g. `paired_ci((base, rl), lambda x: (x[:, 1] - x[:, 0]).mean())`."""
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"columns have {sorted(lengths)} entries; give every model one value per problem, "
                         "the same problems in the same order")
    x = torch.tensor(list(zip(*columns)), dtype=torch.float64)
    return bootstrap_ci(x, statistic, n_boot=n_boot, alpha=alpha, seed=seed)


# --- Student-t -------------------------------------------------------------------------------------
def t_quantile(df: float, p: float = 0.975) -> float:
    """The exact p-quantile of Student's t with `df` degrees of freedom (scipy.stats.t.ppf)."""
    if not df > 0:
        raise ValueError(f"df={df} degrees of freedom must be > 0 (n values give n - 1)")
    if not 0 < p < 1:
        raise ValueError(f"p={p} must be in (0, 1); 0.975 gives the bound of a two-sided 95% interval")
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of `values` and the half-width of its two-sided `level` Student-t interval,
    t_quantile(n - 1) * sd / sqrt(n) (0 for a single value)."""
    if not values:
        raise ValueError("no values to average; pass at least one")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, t_quantile(n - 1, 1 - (1 - level) / 2) * sd / math.sqrt(n)


# --- printing --------------------------------------------------------------------------------------
def format_number(x: Any, nd: int = 3, *, signed: bool = False) -> str:
    """A value for reports: floats with `nd` decimals (`signed`: always with a sign, "+0.012"),
    None and NaN as "n/a", lists and tuples as "[a, b, ...]", anything else as str(x)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(format_number(v, nd, signed=signed) for v in x) + "]"
    if isinstance(x, float):
        return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"
    return str(x)


def format_interval(
    ci: Sequence[float | None] | None, nd: int = 3, *, signed: bool = False, prefix: str = "",
    missing: str = "n/a", open_bound: str = "n/a",
) -> str:
    """An interval for reports: "[lo, hi]", each bound by `format_number(bound, nd, signed=signed)`
    after `prefix` (e.g. "x" for a multiplier: "[x2.00, x6.00]").

    ci: [lo, hi], or None / empty when there is no interval (printed as `missing`). A None bound is
    an open one (a censored multiplier's "more than n / k"): printed as `open_bound`. NaN: "n/a".
    """
    if not ci:
        return missing
    if len(ci) != 2:
        raise ValueError(f"an interval has two bounds [lo, hi]; got {list(ci)!r}. Pass the *_ci pair")

    def bound(v: float | None) -> str:
        if v is None:
            return open_bound
        text = format_number(v, nd, signed=signed)
        return text if text == "n/a" else prefix + text

    return f"[{bound(ci[0])}, {bound(ci[1])}]"

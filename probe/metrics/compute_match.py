"""Compute-matched pass@k: how many samples one model needs to match another's pass@k.

What it is: pure arithmetic on per-sample outcomes already drawn (`probe.metrics.outcomes.Outcomes`), no
sampling. For a reference model A (e.g. an entropy-preserving RL model) and a model B (e.g. the
collapsed one) evaluated on the same problems with n samples each, and a budget k:

- pass_A(k) is A's unbiased pass@k (Chen et al. 2021), averaged over problems;
- `samples_needed(k)` = the smallest k' in 1..n with pass_B(k') >= pass_A(k), B's pass@k' by the
  same estimator at every integer k' (not only powers of two); None ("more than n") when B never
  reaches it within its n samples;
- the *compute multiplier* at k = samples_needed(k) / k: how many times more samples B needs to do
  what A does with k. Below 1: B needs fewer. "More than n / k" when censored.

Intervals: percentile bootstrap over problems (units: a problem with all its stacked seeds, as in
`probe.metrics.frontier.compare_to_frontier`), both models' curves from the same resampled problems
(paired). A censored replicate counts as +infinity, so the upper bound can be "more than n / k";
the percentiles are order statistics (no interpolation across the censoring).

What it is not: a sampler or a claim; `experiments.study` turns it into claim C6.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probe.metrics.outcomes import Outcomes, check_comparable
from probe.metrics.passk import default_ks, pass_at_k_per_problem
from probe.stats import bootstrap_weights, format_interval, percentile_interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pass_at_k_table(counts: Int[Tensor, " rows"], n: int) -> Float[Tensor, "rows n"]:
    """Unbiased pass@k' per row for every k' = 1..n (column k' - 1), float64."""
    return torch.stack([pass_at_k_per_problem(counts, n, k) for k in range(1, n + 1)], 1)


def _first_reach(curve: Float[Tensor, "boot n"], target: Float[Tensor, " boot"]) -> Float[Tensor, " boot"]:
    """Smallest k' (1-based) with curve[:, k' - 1] >= target (1e-12 tolerance); +inf when none."""
    hit = curve >= target[:, None] - 1e-12  # (B, n)
    first = hit.double().argmax(1) + 1.0  # first True (argmax of 0/1 returns the first max)
    return torch.where(hit.any(1), first, torch.full_like(first, math.inf))


def compute_multiplier(
    reference: Outcomes, other: Outcomes, *, ks: Sequence[int] | None = None, clusters: Sequence[int] | None = None,
    n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
) -> dict[str, Any]:
    """How many samples `other` needs to match `reference`'s pass@k, per k (module docstring).

    Returns {"n", "pass_at_k_reference" {k}, "pass_at_k_other" {k' = 1..n}, "rows": per k of `ks`
    (default 1, 2, 4, ..., n) {"k", "pass_at_k_reference", "samples_needed" (None = more than n),
    "multiplier" (None when censored), "more_than" (n / k when censored, else None), "n_over_k",
    "multiplier_ci" [lo, hi] (hi None = more than n / k; lo None = censored in every replicate),
    "censored_fraction" (share of bootstrap replicates in which `other` never matched)}}.
    """
    check_comparable(reference, other, "reference, other")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1 and alpha={alpha} in (0, 1)")
    n = reference.n
    ks = default_ks(n) if ks is None else list(ks)
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"ks {bad} are outside 1..n={n}; pass budgets a model with n samples can estimate")
    w = bootstrap_weights(reference.n_problems, n_boot, seed, clusters)  # (B+1, P): row 0 the full sample
    tot = w.sum(1, keepdim=True)
    t_ref = pass_at_k_table(reference.correct.sum(1), n)  # (P, n)
    t_oth = pass_at_k_table(other.correct.sum(1), n)
    c_ref, c_oth = (w @ t_ref) / tot, (w @ t_oth) / tot  # (B+1, n): curves per replicate
    rows = []
    for k in ks:
        need = _first_reach(c_oth, c_ref[:, k - 1])  # (B+1,)
        mult = need / k
        boot = mult[1:]
        lo, hi = percentile_interval(boot, alpha, order_statistics=True)
        full = need[0].item()
        rows.append({
            "k": k, "pass_at_k_reference": c_ref[0, k - 1].item(),
            "samples_needed": None if math.isinf(full) else int(full),
            "multiplier": None if math.isinf(full) else full / k,
            "more_than": n / k if math.isinf(full) else None, "n_over_k": n / k,
            "multiplier_ci": [None if math.isinf(lo) else lo, None if math.isinf(hi) else hi],
            "censored_fraction": boot.isinf().double().mean().item(),
        })
    return {"n": n, "n_boot": n_boot,
            "pass_at_k_reference": {str(k): c_ref[0, k - 1].item() for k in default_ks(n)},
            "pass_at_k_other": {str(k): c_oth[0, k - 1].item() for k in range(1, n + 1)},
            "rows": rows}


def multiplier_text(row: Mapping[str, Any], nd: int = 2) -> str:
    """"x3.50 [x2.00, x6.00]", or with censoring "more than x8 [x4.00, more than x8]", for a
    `compute_multiplier` row."""
    above = f"more than x{row['n_over_k']:g}"
    value = above if row["multiplier"] is None else f"x{row['multiplier']:.{nd}f}"
    return f"{value} {format_interval(row['multiplier_ci'], nd, prefix='x', open_bound=above)}"


def plot_compute_match(curves: Mapping[str, Mapping[str, float]], matches: Mapping[str, Mapping[str, Any]],
                       path: Any, collapsed: str) -> Figure:
    """Left: pass@k' against samples k' (log2) for each model (`curves`: name -> {str(k'): value},
    every k' or a subset), with each match drawn as an arrow from (k, pass_A(k)) to the samples the
    collapsed model needs. Right: the compute multiplier against k per reference model (`matches`:
    name -> `compute_multiplier` dict against the collapsed model), censored points as up-triangles
    at n / k. PNG written atomically; returns the figure."""
    from probe.figures import new_figure, save_figure_atomic

    fig = new_figure(10, 4)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = {name: f"C{i}" for i, name in enumerate(curves)}
    for name, c in curves.items():
        ks = sorted(int(k) for k in c)
        ax.plot(ks, [c[str(k)] for k in ks], color=colors[name], lw=1.3, label=name)
    for name, m in matches.items():
        col = colors.get(name, "k")
        for r in m["rows"]:
            if r["k"] in (1,) or r["samples_needed"] == r["k"]:
                continue
            x1 = r["samples_needed"] or m["n"]
            ax.annotate("", (x1, r["pass_at_k_reference"]), (r["k"], r["pass_at_k_reference"]),
                        arrowprops={"arrowstyle": "->" if r["samples_needed"] else "-[", "color": col, "lw": 0.6,
                                    "alpha": 0.7})
        ks = [r["k"] for r in m["rows"]]
        y = [r["multiplier"] if r["multiplier"] is not None else r["more_than"] for r in m["rows"]]
        lo = [r["multiplier_ci"][0] if r["multiplier_ci"][0] is not None else yy for r, yy in zip(m["rows"], y)]
        hi = [r["multiplier_ci"][1] if r["multiplier_ci"][1] is not None else m["n"] / r["k"] for r in m["rows"]]
        bx.errorbar(ks, y, yerr=[[max(0.0, a - b) for a, b in zip(y, lo)], [max(0.0, b - a) for a, b in zip(y, hi)]],
                    color=col, marker="o", ms=3, lw=1, capsize=2, label=f"{name} vs {collapsed}")
        cens = [(k, v) for k, v, r in zip(ks, y, m["rows"]) if r["multiplier"] is None]
        if cens:
            bx.scatter(*zip(*cens), marker="^", s=40, color=col, zorder=3, label=f"{name}: {collapsed} never matches (> n/k)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples k")
    ax.set_ylabel("pass@k")
    ax.set_title(f"pass@k; arrows: samples {collapsed} needs to match", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.axhline(1.0, color="gray", ls=":", lw=1)
    bx.set_xscale("log", base=2)
    bx.set_yscale("log", base=2)
    bx.set_xlabel("budget k of the reference model")
    bx.set_ylabel(f"compute multiplier ({collapsed} samples / k)")
    bx.set_title("samples needed to match, relative to k (95% CI)", fontsize=8)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return fig

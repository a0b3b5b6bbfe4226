"""Figures of `forksight steer sweep`: cells against the mixture frontier, the restoration curves, pass@k.

Reads the sweep's judged rows and metrics dicts; writes PNGs atomically
(`probe.figures.save_figure_atomic`). Not the place for any selection logic.
"""

from __future__ import annotations

from pathlib import Path

from probe.figures import new_figure, save_figure_atomic
from probe.metrics.evaluate import plot_pass_at_k
from probe.metrics.frontier import mixture_curve
from probe.metrics.frontier_plots import plot_frontier

COLORS = {"temperature": "tab:orange", "vector": "tab:blue", "learned": "tab:green", "sae_edit": "tab:brown",
          "repulsion": "tab:pink", "variant": "tab:purple", "patching": "tab:gray", "layer_restore": "tab:olive"}


def _label(r: dict) -> str:
    spec = ",".join(f"{v}" for v in r["spec"].values())
    return f"{r['family']} {spec}" + (f" f={r['fraction']:g}" if (r.get("fraction") or 1) < 1 else "")


def _frontier(ax, curve: list[dict]) -> None:
    """The mixture frontier, or a note where it is undefined (the base is not broader than RL)."""
    if any(c["restoration_distinct"] is not None for c in curve):
        plot_frontier(ax, curve)
    else:
        ax.text(0.5, 0.5, "restoration undefined: the base finds no more distinct solutions than RL",
                transform=ax.transAxes, ha="center", fontsize=8)


def plot_test(curve: list[dict], metrics: dict, path: str | Path) -> None:
    """Test half: the mixture frontier, each family's picks, the matched temperature and the variants,
    with restoration intervals (x: pass@1, y: restoration of distinct-correct)."""
    fig = new_figure(7.5, 5)
    ax = fig.add_subplot()
    _frontier(ax, curve)
    cells = [p["test"] for fam in metrics["picks"].values() for p in fam.values() if p.get("test")]
    cells += [v for v in [metrics["temperature_baseline"], *metrics["variants"].values()] if v]
    seen = set()
    for r in cells:
        if r["id"] in seen or r.get("restoration_distinct") is None:
            continue
        seen.add(r["id"])
        lo, hi = r.get("restoration_distinct_ci") or [r["restoration_distinct"]] * 2
        ax.errorbar([r["pass_at_1"]], [r["restoration_distinct"]], yerr=[[r["restoration_distinct"] - lo],
                    [hi - r["restoration_distinct"]]], fmt="o", ms=4, color=COLORS.get(r["family"], "k"),
                    label=f"{_label(r)}" + ("" if r.get("frontier_excess") is None else
                                             f" (excess {r['frontier_excess']:+.2f})"))
    ax.set_xlabel("pass@1 (test half, pooled seeds)")
    ax.set_ylabel("restoration of distinct-correct (RL = 0, base = 1)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty sweep (e.g. --quick with no cell in tolerance) has none
        ax.legend(fontsize=6, loc="best")
    save_figure_atomic(fig, path)


def plot_selection(sel: dict, path: str | Path) -> None:
    """Selection half: every judged cell (row-level fractions included) against its frontier."""
    from experiments.study.selection import outcomes_of

    b, _ = outcomes_of([sel["base"]])
    r, _ = outcomes_of([sel["rl"]])
    fig = new_figure(7.5, 5)
    ax = fig.add_subplot()
    _frontier(ax, mixture_curve(b, r))
    for fam, color in COLORS.items():
        pts = [(x["pass_at_1"], x["restoration_distinct"]) for x in sel["rows"]
               if x["family"] == fam and x.get("restoration_distinct") is not None]
        if pts:
            ax.scatter(*zip(*pts), s=12, color=color, alpha=0.7, label=fam)
    ax.set_xlabel("pass@1 (selection half)")
    ax.set_ylabel("restoration of distinct-correct")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure_atomic(fig, path)


def plot_restoration_curves(patching: list[dict | None], restore: list[dict | None], path: str | Path) -> None:
    """Restoration of distinct-correct against layer: cross-model patching and layer restoration, on
    the half the rows were measured on (their "half", else the test half)."""
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for rows, name, mk in ((patching, "cross-model patching (alpha max)", "o"), (restore, "layer restoration", "s")):
        pts = sorted((x["spec"]["layer"], x["restoration_distinct"], *(x.get("restoration_distinct_ci") or [None, None]))
                     for x in rows if x and x.get("restoration_distinct") is not None)
        if pts:
            ls, ys, lo, hi = zip(*pts)
            ax.plot(ls, ys, marker=mk, label=name)
            if None not in lo:
                ax.fill_between(ls, lo, hi, alpha=0.15)
    ax.axhline(0, c="gray", lw=0.8)
    ax.axhline(1, c="gray", lw=0.8, ls=":")
    ax.set_xlabel("layer L (patched residual / restored block)")
    ax.set_ylabel("restoration of distinct-correct")
    half = next((x.get("half", "test") for x in (*patching, *restore) if x), "test")
    ax.set_title(f"measured on the {half} half", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure_atomic(fig, path)


def plot_pass_at_k_best(curves: dict[str, dict | None], path: str | Path) -> None:
    """pass@k of base, RL, the best steered cell and the temperature baseline (test half)."""
    plot_pass_at_k({k: v for k, v in curves.items() if v is not None}, path)

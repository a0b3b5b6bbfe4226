"""Drawing the base/RL mixture frontier (`probe.metrics.frontier`) on a Pareto axis, and one figure of cells against it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from probe.metrics.frontier import frontier_at

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_frontier(ax: Axes, curve: Sequence[Mapping[str, Any]], *, label: str = "base/RL mixture",
                  color: str = "gray", envelope: bool = True) -> None:
    """Draw the mixture polyline (x = pass@1, y = restoration_distinct) on an existing Pareto axis,
    RL (q=0) and base (q=1) ends labelled; `envelope` adds frontier(p) dashed (what the excess is
    measured against, differs from the polyline only where the curve is not monotone)."""
    pts = [(c["pass_at_1"], c["restoration_distinct"], c["q"]) for c in curve if c["restoration_distinct"] is not None]
    if not pts:
        raise ValueError("no point of the curve has a restoration (the base is not broader than RL); nothing to draw")
    x, y, _ = zip(*pts)
    ax.plot(x, y, color=color, lw=1.2, marker=".", ms=3, label=label)
    for xi, yi, qi in (pts[0], pts[-1]):
        ax.annotate({0: "RL (q=0)", 1: "base (q=1)"}.get(qi, f"q={qi:g}"), (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=7, color=color)
    if envelope:
        grid = torch.linspace(min(x), max(x), 200, dtype=torch.float64)
        fy = [frontier_at(curve, float(p)) for p in grid]
        ax.plot(grid.numpy(), fy, color=color, ls="--", lw=0.8, label=f"{label}: frontier")


def plot_frontier_figure(curve: Sequence[Mapping[str, Any]], cells: Mapping[str, Mapping[str, Any]],
                         path: Any) -> Figure:
    """Frontier plus each cell's (pass@1, restoration_distinct) with its restoration interval
    (cells: name -> `compare_to_frontier` dict). PNG written atomically; returns the figure."""
    from probe.figures import new_figure, save_figure_atomic

    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    plot_frontier(ax, curve)
    for i, (name, c) in enumerate(cells.items()):
        if c.get("restoration_distinct") is None or c.get("frontier_excess") is None:
            continue
        ci = c.get("restoration_distinct_ci") or [c["restoration_distinct"]] * 2
        err = [[c["restoration_distinct"] - ci[0]], [ci[1] - c["restoration_distinct"]]]
        ax.errorbar([c["pass_at_1"]], [c["restoration_distinct"]], yerr=err, fmt="o", ms=4, color=f"C{i}",
                    label=f"{name} (excess {c['frontier_excess']:+.2f})")
    ax.set_xlabel("pass@1")
    ax.set_ylabel("restoration of distinct-correct")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure_atomic(fig, path)
    return fig

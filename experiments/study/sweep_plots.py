"""Figures of `forksight steer sweep`: Pareto fronts, the patching curve, pass@k of the best cell.

Reads the sweep's rows (dicts with the `experiments.steer_sweep.COLUMNS` keys); writes PNGs
atomically (`probe.plots.save_figure_atomic`). Not the place for any selection logic.
"""

from __future__ import annotations

from pathlib import Path

from probe.evaluate import plot_pass_at_k
from probe.plots import new_figure, save_figure_atomic

STYLE = {"steer": ("tab:blue", "o", 12), "temperature": ("tab:orange", "s", 30), "patch": ("tab:green", "^", 30),
         "base": ("black", "*", 120), "rl": ("tab:red", "*", 120), "entropy_rl": ("tab:purple", "D", 40)}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both coordinates (higher is better), sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_pareto(rows: list[dict], path: str | Path) -> None:
    """pass@1 against pass@64 and against distinct-correct, screening stage, one colour per kind."""
    rows = [r for r in rows if r["stage"] == "screen"]
    fig = new_figure(11, 4.2)
    for i, (key, label) in enumerate((("pass_at_64", "pass@64"), ("distinct_correct_mean", "distinct correct"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for kind, (c, mk, s) in STYLE.items():
            pts = [(r["pass_at_1"], r[key]) for r in rows if r["kind"] == kind and r.get(key) is not None]
            if pts:
                ax.scatter(*zip(*pts), c=c, marker=mk, s=s, alpha=0.7, label=kind, zorder=3 if s > 12 else 2)
        front = pareto_front([(r["pass_at_1"], r[key]) for r in rows if r["kind"] == "steer" and r.get(key) is not None])
        if front:
            ax.plot(*zip(*front), c="tab:blue", lw=1, label="steering Pareto front")
        ax.set_xlabel("pass@1")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    n = rows[0]["n_problems"] if rows else 0
    fig.suptitle(f"steering sweep, screening split ({n} held-out problems x 64 samples)", fontsize=9)
    save_figure_atomic(fig, path)


def plot_patching(rows: list[dict], path: str | Path) -> None:
    """Restoration (distinct-correct and pass@64) of cross-model patching against layer, per alpha."""
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for alpha in sorted({r["coef"] for r in rows}):
        sel = sorted((r for r in rows if r["coef"] == alpha), key=lambda r: r["layer"])
        ls = [r["layer"] for r in sel]
        ax.plot(ls, [r["restoration_distinct"] for r in sel], marker="o", label=f"distinct, alpha={alpha}")
        ax.plot(ls, [r["restoration_pass_at_64"] for r in sel], marker="x", ls="--", label=f"pass@64, alpha={alpha}")
    ax.axhline(0, c="gray", lw=0.8)
    ax.axhline(1, c="gray", lw=0.8, ls=":")
    ax.set_xlabel("patched layer (blocks.L.hook_resid_post)")
    ax.set_ylabel("restoration (RL = 0, base = 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure_atomic(fig, path)


def plot_pass_at_k_best(curves: dict[str, dict | None], path: str | Path) -> None:
    """pass@k of base, RL, the best steered cell and the temperature baseline (full split)."""
    plot_pass_at_k({k: v for k, v in curves.items() if v is not None}, path)

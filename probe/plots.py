"""Figures of the probe: entropy histograms, per-token entropy heat-map, entropy-law fit.

What it is: matplotlib (Agg, no pyplot global state) drawings of numbers computed elsewhere
(`probe.entropy`, `probe.forks`, `probe.law`), written as PNG atomically (`save_figure_atomic`:
temporary file in the same directory, then `os.replace`). What it is not: any computation that a
metric depends on. Each function returns the figure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.figures import new_figure, save_figure_atomic
from probe.forks import ROLE_CODES
from probe.law import LawFit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROLE_MARK = {ROLE_CODES["planning"]: "P", ROLE_CODES["execution"]: "E"}


def plot_entropy_histograms(
    entropy: Mapping[str, Float[Tensor, " n"]],
    path: str | os.PathLike,
    thresholds: Mapping[str, float] | None = None,
    bins: int = 40,
) -> Figure:
    """Histogram of answer-token entropies per model (log count axis), fork thresholds dashed."""
    if not entropy:
        raise ValueError("no entropies to plot; pass {model name: 1-D tensor of token entropies}")
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    hi = max(float(h.max()) for h in entropy.values() if h.numel()) if any(h.numel() for h in entropy.values()) else 1.0
    edges = torch.linspace(0, max(hi, 1e-3), bins + 1).tolist()
    for name, h in entropy.items():
        _, _, patches = ax.hist(h.double().cpu().numpy(), bins=edges, alpha=0.5, label=f"{name} (n={h.numel()})")
        if thresholds and name in thresholds:
            ax.axvline(thresholds[name], color=patches[0].get_facecolor(), ls="--", lw=1.2,
                       label=f"{name} fork threshold {thresholds[name]:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("token entropy (nats)")
    ax.set_ylabel("answer tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure_atomic(fig, path)
    return fig


def plot_entropy_heatmap(
    labels: Sequence[Sequence[str]],
    entropy: Mapping[str, Float[Tensor, "rows pos"]],
    forks: Mapping[str, Bool[Tensor, "rows pos"]],
    mask: Bool[Tensor, "rows pos"],
    roles: Int[Tensor, "rows pos"],
    path: str | os.PathLike,
) -> Figure:
    """Per-token entropy of example trajectories, one strip per (trajectory, model).

    labels: token text of each answer position (rows x pos, left-aligned); entropy / forks: per
    model, same layout; mask: True on real tokens. Cells show the token and its role mark
    (P = planning, E = execution); forks of that model are outlined in black.
    """
    from matplotlib.patches import Rectangle

    names = list(entropy)
    rows, pos = mask.shape
    grid = torch.full((rows * len(names), pos), float("nan"))
    for r in range(rows):
        for k, name in enumerate(names):
            grid[r * len(names) + k] = torch.where(mask[r], entropy[name][r].float(), float("nan"))
    fig = new_figure(max(4.0, 0.32 * pos + 2), max(2.0, 0.3 * len(grid) + 1))
    ax = fig.add_subplot()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="entropy (nats)")
    for r in range(rows):
        for k, name in enumerate(names):
            y = r * len(names) + k
            for t in range(pos):
                if not mask[r, t]:
                    continue
                mark = ROLE_MARK.get(int(roles[r, t]), "")
                ax.text(t, y, f"{labels[r][t]}{mark and chr(10) + mark}", ha="center", va="center",
                        fontsize=5, color="white")
                if forks[name][r, t]:
                    ax.add_patch(Rectangle((t - 0.5, y - 0.5), 1, 1, fill=False, ec="black", lw=1.2))
        if r:
            ax.axhline(r * len(names) - 0.5, color="white", lw=2)
    ax.set_yticks(range(len(grid)), [f"#{r} {n}" for r in range(rows) for n in names], fontsize=6)
    ax.set_xlabel("answer token (P planning, E execution; black box = fork of that model)")
    save_figure_atomic(fig, path)
    return fig


def plot_law_fit(
    entropy: Float[Tensor, " n"],
    reward: Float[Tensor, " n"],
    fit: LawFit,
    path: str | os.PathLike,
    n_fit: int | None = None,
    early_fit: LawFit | None = None,
) -> Figure:
    """(entropy, reward) per training step with R = -a exp(H) + b; points after `n_fit` (the
    extrapolation test set) drawn hollow, and `early_fit` (fit on the first n_fit) dashed."""
    h, r = torch.as_tensor(entropy).double(), torch.as_tensor(reward).double()
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    n_fit = len(h) if n_fit is None else n_fit
    ax.scatter(h[:n_fit].numpy(), r[:n_fit].numpy(), s=10, c=range(n_fit), cmap="viridis", label="logged steps (fit)")
    if n_fit < len(h):
        ax.scatter(h[n_fit:].numpy(), r[n_fit:].numpy(), s=12, facecolors="none", edgecolors="gray",
                   label="later steps (held out)")
    grid = torch.linspace(0, float(h.max()) * 1.05 + 1e-6, 100, dtype=torch.float64)
    r2 = f"{fit.r2:.3f}" if fit.r2 is not None else "n/a"
    ax.plot(grid.numpy(), fit.predict(grid).numpy(), color="C3",
            label=f"all: a={fit.a:.3g}, b={fit.b:.3g}, R²={r2}, ceiling={fit.ceiling:.3f}")
    if early_fit is not None:
        ax.plot(grid.numpy(), early_fit.predict(grid).numpy(), color="C1", ls="--",
                label=f"first {n_fit}: ceiling={early_fit.ceiling:.3f}")
    ax.set_xlabel("policy entropy H (nats)")
    ax.set_ylabel("reward R")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure_atomic(fig, path)
    return fig


def plot_role_entropy(series: dict[str, Float[Tensor, " n"]], path: str | os.PathLike) -> Figure:
    """Mean entropy per training step for each token role (name -> one value per logged step, nats),
    one panel per role on its own y scale (execution entropy is orders of magnitude smaller)."""
    if not series:
        raise ValueError("no series to plot; pass {role name: per-step entropies}")
    fig = new_figure(4 * len(series), 3.4)
    for i, (name, v) in enumerate(series.items()):
        ax = fig.add_subplot(1, len(series), i + 1)
        y = torch.as_tensor(v).double()
        ax.plot(range(len(y)), y.numpy(), lw=1, color=f"C{i}")
        ax.set_title(f"{name} tokens", fontsize=9)
        ax.set_xlabel("RL step")
        ax.set_ylabel("mean entropy (nats)")
        ax.grid(alpha=0.3)
    save_figure_atomic(fig, path)
    return fig

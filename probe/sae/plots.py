"""Figures of SAE training and of feature diffs at forks (numbers computed in `probe.sae.dictionary`,
`probe.sae.features`). Same conventions as `probe.plots`: Agg figures without pyplot, PNG written
atomically, each function returns the figure. What it is not: any computation a metric uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from probe.figures import new_figure, save_figure_atomic
from probe.sae.features import FeatureDiff

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_sae_training(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> Figure:
    """Batch FVU (log axis) and L0 against the training step."""
    if not history:
        raise ValueError("empty training history; train_sae records it every ~1% of the steps")
    steps = [h["step"] for h in history]
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    ax.plot(steps, [h["fvu"] for h in history], color="C0", label="FVU (training batch)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("FVU", color="C0")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["l0"] for h in history], color="C1", label="L0")
    ax2.set_ylabel("L0 (active features / token)", color="C1")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return fig


def plot_feature_density(freqs: Mapping[str, Float[Tensor, " d_sae"]], path: str | os.PathLike,
                         n_tokens: Mapping[str, int] | None = None) -> Figure:
    """Histogram of log10 firing frequency per feature; dead features (never fired) in the left bin."""
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    floor = min(1.0 / max(n, 1) for n in (n_tokens or {"": 10**7}).values()) / 10
    for name, f in freqs.items():
        lf = torch.log10(f.double().clamp_min(floor)).numpy()
        dead = int((f == 0).sum())
        ax.hist(lf, bins=50, alpha=0.5, label=f"{name} ({dead} dead)")
    ax.set_xlabel("log10 firing frequency (dead features at the left edge)")
    ax.set_ylabel("features")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return fig


def plot_fork_frequencies(diff: FeatureDiff, pruned: Sequence[int], amplified: Sequence[int],
                          path: str | os.PathLike) -> Figure:
    """Each feature's activation frequency at base forks: base (x) vs RL (y), log axes."""
    eps = 0.5 / max(diff.n_tokens, 1)
    x, y = diff.freq_base.clamp_min(eps).numpy(), diff.freq_rl.clamp_min(eps).numpy()
    fig = new_figure(5, 5)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=4, color="grey", alpha=0.4, label="features")
    for idx, color, name in ((pruned, "C3", "top pruned"), (amplified, "C0", "top amplified")):
        if idx:
            ax.scatter(x[list(idx)], y[list(idx)], s=16, color=color, label=name)
            for i in idx[:5]:
                ax.annotate(str(i), (x[i], y[i]), fontsize=6)
    ax.plot([eps, 1], [eps, 1], ls="--", color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("frequency at base forks, base model")
    ax.set_ylabel("frequency at base forks, RL model")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return fig


def plot_top_features(diff: FeatureDiff, pruned: Sequence[int], amplified: Sequence[int],
                      path: str | os.PathLike) -> Figure:
    """Mean activation at base forks, base vs RL, for the top pruned and amplified features."""
    feats = [("pruned", i) for i in pruned] + [("amplified", i) for i in amplified]
    if not feats:
        raise ValueError("no features to plot: both lists are empty (lower min_freq?)")
    fig = new_figure(6, 0.6 + 0.28 * len(feats))
    ax = fig.add_subplot()
    pos = torch.arange(len(feats)).float()
    mb = [diff.mean_base[i].item() for _, i in feats]
    mr = [diff.mean_rl[i].item() for _, i in feats]
    ax.barh((pos - 0.2).numpy(), mb, height=0.4, color="C2", label="base")
    ax.barh((pos + 0.2).numpy(), mr, height=0.4, color="C1", label="RL")
    ax.set_yticks(pos.numpy(), [f"{kind} #{i}" for kind, i in feats], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean activation at base forks")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return fig

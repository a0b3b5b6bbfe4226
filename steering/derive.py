"""Deriving steering directions: base-minus-RL differences at fork tokens, PCA, SAE decoder rows.

What it is: (1) `collect`, both models' residuals at the answer tokens of the *same* trajectories
(teacher-forced, `probe.entropy.pair_stats` for the RL side and its entropies, the same
predicting-position convention for the base side), with each token's role, answer position and
trajectory; (2) the math on plain tensors (`mean_difference`, `pca_of_differences`,
`sae_decoder_direction`, `kmeans`, `normalise`); (3) builders returning a `SteeringVector` with
its provenance filled in.

Methods:
- difference of means: mean over the selected tokens (e.g. `fork_tokens`: the base model's forks)
  of h_base - h_rl, global or conditioned: one direction per token role (of the token being
  predicted), per answer position (the last bucket pools all later positions), or per k-means
  cluster of the RL residuals at those tokens (a global mean over all forks can cancel out).
  A condition with no selected token gets a zero direction (its count, 0, is in `config`).
- PCA of the per-token differences h_base - h_rl at the selected tokens (centred); component i,
  its sign chosen to agree with the mean difference; explained-variance ratios go to `config`.
- SAE decoder directions: sum_i w_i * W_dec[f_i] for pruned features f_i. Takes the decoder
  matrix `[d_sae, d_model]` as a plain tensor, so any SAE implementation (sae-lens's `W_dec`) works.

Normalisation: "none" (difference of means: coef 1 moves the RL mean onto the base mean; PCA: the
mean difference's projection on the component; SAE: the raw weighted sum), "unit" (L2 norm 1),
"resid_norm" (unit times the mean RL residual norm at the selected tokens, so coef is a fraction
of a typical residual). Sign: base minus RL throughout (+coef moves RL toward base).

What it is not: sampling, fork thresholds (`probe.forks`) or SAE training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.entropy import PairStats, Trajectories, pair_stats
from probe.forks import ROLE_CODES, fork_mask
from probe.models.pair import RESID_POST, Pair
from steering.vectors import NORMALISATIONS, SteeringVector


@dataclass
class ForkResiduals:
    """Residuals of both models at every answer token (row-major order of `stats.mask`)."""

    base: dict[int, Float[Tensor, "n d_model"]]
    rl: dict[int, Float[Tensor, "n d_model"]]
    stats: PairStats
    """Teacher-forced entropies etc. of both models on the same trajectories (for fork selection)."""
    roles: Int[Tensor, " n"]
    """Role code (`probe.forks.ROLE_CODES`) of the token being predicted; -1 when unlabelled."""
    positions: Int[Tensor, " n"]
    """Answer position of the token being predicted (0 = the first generated token)."""
    rows: Int[Tensor, " n"]
    """Trajectory row of each token."""
    site: str
    """Hook-site template the residuals were read at."""


def collect(pair: Pair, traj: Trajectories, layers: Sequence[int], site: str = RESID_POST,
            batch_size: int = 32) -> ForkResiduals:
    """Both models' residuals at `layers` (site template `site`) plus the pair's stats on `traj`."""
    layers = [int(x) for x in layers]
    stats = pair_stats(pair, traj, batch_size, resid_layers=layers, resid_site=site, base_resid=True)
    m = stats.mask
    return ForkResiduals(stats.resid_base, stats.resid, stats, traj.roles[m], (m.long().cumsum(1) - 1)[m],
                         torch.arange(m.shape[0])[:, None].expand_as(m)[m], site)


def fork_tokens(stats: PairStats, rho: float = 0.2, which: str = "base") -> Bool[Tensor, " n"]:
    """Per answer token (order of `stats.mask`): is it a fork of `which` model ("base", "rl",
    "either", "both", or "pruned": a base fork where the RL model does not fork, a branch point RL
    collapsed), forks taken per batch by `probe.forks.fork_mask`."""
    f = {k: fork_mask(h, stats.mask, rho)[stats.mask] for k, h in (("base", stats.h_base), ("rl", stats.h_rl))}
    choices = {"base": f["base"], "rl": f["rl"], "either": f["base"] | f["rl"], "both": f["base"] & f["rl"],
               "pruned": f["base"] & ~f["rl"]}
    if which not in choices:
        raise ValueError(f"which={which!r}: allowed {sorted(choices)}")
    return choices[which]


def mean_difference(
    base: Float[Tensor, "n d_model"], rl: Float[Tensor, "n d_model"],
    labels: Int[Tensor, " n"] | None = None, n_labels: int = 1,
) -> tuple[Float[Tensor, "n_labels d_model"], Int[Tensor, " n_labels"]]:
    """Mean of base - rl per label (labels in [0, n_labels); others ignored) and the counts."""
    if base.shape != rl.shape or base.ndim != 2:
        raise ValueError(f"base {tuple(base.shape)} and rl {tuple(rl.shape)} must both be [n, d_model]")
    labels = torch.zeros(base.shape[0], dtype=torch.long) if labels is None else labels.long().cpu()
    keep = (labels >= 0) & (labels < n_labels)
    d = (base.double() - rl.double())[keep]
    sums = torch.zeros(n_labels, base.shape[1], dtype=torch.float64).index_add_(0, labels[keep], d)
    counts = torch.bincount(labels[keep], minlength=n_labels)
    return (sums / counts.clamp_min(1)[:, None]).float(), counts


def pca_of_differences(
    base: Float[Tensor, "n d_model"], rl: Float[Tensor, "n d_model"], k: int = 1
) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
    """Top-k principal axes of the centred per-token differences base - rl (unit rows, sign agreeing
    with the mean difference) and their explained-variance ratios."""
    d = base.double() - rl.double()
    if d.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 selected tokens; got {d.shape[0]}. Fix: select more forks (rho).")
    mean = d.mean(0)
    _, s, vh = torch.linalg.svd(d - mean, full_matrices=False)
    comps = vh[:k]
    comps = comps * torch.where(comps @ mean < 0, -1.0, 1.0).double()[:, None]
    var = s.pow(2)
    return comps.float(), (var[:k] / var.sum().clamp_min(1e-30)).float()


def sae_decoder_direction(
    W_dec: Float[Tensor, "d_sae d_model"], features: Sequence[int], weights: Sequence[float] | None = None
) -> Float[Tensor, " d_model"]:
    """sum_i weights[i] * W_dec[features[i]] (weights default to 1)."""
    feats = torch.as_tensor(list(features), dtype=torch.long)
    if feats.numel() == 0 or feats.min() < 0 or feats.max() >= W_dec.shape[0]:
        raise ValueError(f"features {feats.tolist()} must be non-empty ids in [0, {W_dec.shape[0]})")
    w = torch.ones(len(feats)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if w.shape != feats.shape:
        raise ValueError(f"{len(w)} weights for {len(feats)} features; give one weight per feature")
    return (w.double() @ W_dec.detach().double().cpu()[feats]).float()


def kmeans(x: Float[Tensor, "n d"], k: int, seed: int = 0, iters: int = 100
           ) -> tuple[Int[Tensor, " n"], Float[Tensor, "k d"]]:
    """Lloyd's k-means (k-means++ seeding, seeded generator): labels and centroids."""
    x = x.double().cpu()
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k={k} clusters for {x.shape[0]} points: need 1 <= k <= n")
    g = torch.Generator().manual_seed(seed)
    cents = x[torch.randint(x.shape[0], (1,), generator=g)]
    while cents.shape[0] < k:  # k-means++: next centre with probability ~ squared distance
        d2 = torch.cdist(x, cents).min(1).values.pow(2)
        cents = torch.cat([cents, x[torch.multinomial(d2 + 1e-12, 1, generator=g)]])
    for _ in range(iters):
        labels = torch.cdist(x, cents).argmin(1)
        new = torch.stack([x[labels == c].mean(0) if (labels == c).any() else cents[c] for c in range(k)])
        if torch.equal(new, cents):
            break
        cents = new
    return torch.cdist(x, cents).argmin(1), cents.float()


def normalise(v: Float[Tensor, "*rows d_model"], how: str, ref_norm: float | None = None) -> Float[Tensor, "*rows d_model"]:
    """Apply a normalisation of `steering.vectors.NORMALISATIONS` row-wise (zero rows stay zero)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"normalisation={how!r}: allowed {NORMALISATIONS}")
    if how == "none":
        return v
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if how == "unit":
        return unit
    if ref_norm is None:
        raise ValueError("normalisation='resid_norm' needs the reference residual norm (ref_norm=)")
    return unit * ref_norm


def _labels(res: ForkResiduals, conditioning: str, n_positions: int) -> tuple[Tensor | None, list[str] | None]:
    if conditioning == "global":
        return None, None
    if conditioning == "role":
        return res.roles, list(ROLE_CODES)
    if conditioning == "position":
        if n_positions < 1:
            raise ValueError(f"n_positions={n_positions} must be >= 1")
        return res.positions.clamp_max(n_positions - 1), [f"pos{i}" for i in range(n_positions - 1)] + [f"pos{n_positions - 1}+"]
    raise ValueError(f"conditioning={conditioning!r}: allowed 'global', 'role', 'position', 'cluster'")


def diff_of_means_vector(
    res: ForkResiduals, select: Bool[Tensor, " n"], *, conditioning: str = "global", n_positions: int = 8,
    n_clusters: int = 4, normalisation: str = "none", seed: int = 0, source_models: dict[str, str] | None = None,
    positions: str = "", config: dict[str, Any] | None = None,
) -> SteeringVector:
    """Difference of means (base - RL) over the `select`ed tokens, at every layer of `res`."""
    sel = select.bool().cpu()
    if not sel.any():
        raise ValueError("no token is selected: select at least one fork (e.g. fork_tokens(res.stats, rho=0.2))")
    dirs, cents, counts = {}, {}, {}
    for layer in res.base:
        b, r = res.base[layer][sel].float(), res.rl[layer][sel].float()  # exact: stored in the model's dtype
        if conditioning == "cluster":
            labels, cents[layer] = kmeans(r, n_clusters, seed)
            conds = [f"cluster{i}" for i in range(n_clusters)]
        else:
            labels, conds = _labels(res, conditioning, n_positions)
            labels = None if labels is None else labels[sel]
        mean, count = mean_difference(b, r, labels, len(conds or [0]))
        ref = r.norm(dim=-1).mean().item()
        dirs[layer] = normalise(mean if conds else mean[0], normalisation, ref)
        counts[str(layer)] = count.tolist()
    cfg = {"n_selected": int(sel.sum()), "counts": counts, "seed": seed, "n_positions": n_positions,
           "n_clusters": n_clusters, **(config or {})}
    return SteeringVector(dirs, res.site, "diff_of_means", dict(source_models or {}), positions, normalisation,
                          cfg, conditioning, conds, cents or None)


def pca_vector(
    res: ForkResiduals, select: Bool[Tensor, " n"], *, component: int = 0, normalisation: str = "unit",
    source_models: dict[str, str] | None = None, positions: str = "", config: dict[str, Any] | None = None,
) -> SteeringVector:
    """Principal axis `component` of the per-token differences at the selected tokens, every layer."""
    sel = select.bool().cpu()
    dirs, explained = {}, {}
    for layer in res.base:
        b, r = res.base[layer][sel].float(), res.rl[layer][sel].float()  # exact: stored in the model's dtype
        comps, ratio = pca_of_differences(b, r, component + 1)
        if comps.shape[0] <= component:
            raise ValueError(f"component {component} does not exist: only {comps.shape[0]} components at layer {layer}")
        c = comps[component]
        raw = c * (c.double() @ (b.double() - r.double()).mean(0)).float()
        dirs[layer] = normalise(raw if normalisation == "none" else c, normalisation, r.norm(dim=-1).mean().item())
        explained[str(layer)] = ratio.tolist()
    cfg = {"n_selected": int(sel.sum()), "component": component, "explained_variance_ratio": explained, **(config or {})}
    return SteeringVector(dirs, res.site, "pca", dict(source_models or {}), positions, normalisation, cfg)


def sae_vector(
    W_dec: Float[Tensor, "d_sae d_model"], features: Sequence[int], layer: int, *,
    weights: Sequence[float] | None = None, hook_site: str = RESID_POST, normalisation: str = "unit",
    ref_norm: float | None = None, source_models: dict[str, str] | None = None, positions: str = "",
    config: dict[str, Any] | None = None,
) -> SteeringVector:
    """A one-layer vector from SAE decoder rows (`sae_decoder_direction`) at `hook_site`, `layer`."""
    v = normalise(sae_decoder_direction(W_dec, features, weights), normalisation, ref_norm)
    cfg = {"features": [int(f) for f in features], "weights": None if weights is None else [float(w) for w in weights],
           "d_sae": int(W_dec.shape[0]), **(config or {})}
    return SteeringVector({int(layer): v}, hook_site, "sae_decoder", dict(source_models or {}), positions,
                          normalisation, cfg)

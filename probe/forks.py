"""Forks: the high-entropy minority of answer tokens where a sampled branch really chooses.

What it is: the per-batch selection of the top-rho fraction of generated tokens by token entropy
(rho = 0.2 by default, the "20% of tokens" of Wang et al. 2025, "Beyond the 80/20 rule").

Cross-model comparison (same tokens, two models' entropies): `fork_overlap` (Jaccard and the
fraction of one model's forks that are forks of the other), `entropy_change_share_on_forks` (how
much of the total |H_rl - H_base| falls on forks; also signed), and `role_split` (planning /
execution breakdown when the task labels tokens; role codes as `probe.metrics.evaluate.ROLE_CODE`).

What it is not: an entropy computation (entropies come in, already in nats).

Where it departs from the paper: the paper keeps every token with entropy >= the batch's
(1 - rho) quantile, so ties at the threshold can select more than rho of the tokens. Here exactly
m = ceil(rho * N) of the N masked tokens are forks (at least one when N > 0): tokens are ranked by
entropy, highest first, and ties are broken by position in row-major order (earlier row, then
earlier token, wins). The threshold is the entropy of the m-th ranked token, so every fork has
entropy >= threshold and every non-fork has entropy <= threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.stats import bootstrap_ci
from probe.tasks.protocol import ROLES

ROLE_CODES: dict[str, int] = {r: i for i, r in enumerate(ROLES)}  # = probe.metrics.evaluate.ROLE_CODE


def n_forks(n_tokens: int, rho: float = 0.2) -> int:
    """How many of `n_tokens` answer tokens are forks: ceil(rho * n_tokens), rounded first at 1e-9."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho={rho} must be in (0, 1]; 0.2 selects the top 20% of tokens")
    return math.ceil(round(rho * n_tokens, 9))  # round: 0.2 * 15 is 3.0000000000000004


def _ranked(entropy: Tensor, mask: Tensor) -> Tensor:
    """Flat indices of the masked tokens, highest entropy first, ties by row-major position."""
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} differ")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True on real tokens); got {mask.dtype}")
    flat_idx = mask.flatten().nonzero().squeeze(1)  # (N,) ascending = row-major order
    values = entropy.flatten()[flat_idx]  # (N,)
    if values.isnan().any():
        raise ValueError("entropy is NaN at a masked position; forks need finite entropies")
    order = torch.sort(values, descending=True, stable=True).indices  # stable keeps position order
    return flat_idx[order]


def fork_mask(
    entropy: Float[Tensor, "*shape"], mask: Bool[Tensor, "*shape"], rho: float = 0.2
) -> Bool[Tensor, "*shape"]:
    """True on the forks of the batch: the top ceil(rho * N) of the N masked tokens by entropy.

    entropy: token entropy in nats, any shape (typically (rows, new)); mask: True on real
    generated tokens. Masked-out positions are never forks. All False when nothing is masked in.
    """
    ranked = _ranked(entropy, mask)
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[ranked[: n_forks(ranked.numel(), rho)]] = True
    return out.view(mask.shape)


def fork_threshold(
    entropy: Float[Tensor, "*shape"], mask: Bool[Tensor, "*shape"], rho: float = 0.2
) -> float:
    """Entropy (nats) of the lowest-ranked fork: the batch's (1 - rho) cut, as `fork_mask` applies it."""
    ranked = _ranked(entropy, mask)
    if ranked.numel() == 0:
        raise ValueError("no masked tokens: the fork threshold of an empty batch is undefined")
    return entropy.flatten()[ranked[n_forks(ranked.numel(), rho) - 1]].item()


def _same_shape(**tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}; pass tensors over the same tokens")


def fork_overlap(forks_a: Bool[Tensor, "*shape"], forks_b: Bool[Tensor, "*shape"]) -> dict[str, float | int | None]:
    """Overlap of two fork sets on the same tokens (e.g. base vs RL forks).

    jaccard = |A & B| / |A | B|; a_in_b = |A & B| / |A| (the fraction of A's forks that are also
    B's forks); b_in_a likewise. None where a denominator is 0.
    """
    _same_shape(forks_a=forks_a, forks_b=forks_b)
    a, b = forks_a.bool(), forks_b.bool()
    n_a, n_b, both, union = (int(x.sum()) for x in (a, b, a & b, a | b))
    div = lambda x, y: x / y if y else None  # noqa: E731
    return {"jaccard": div(both, union), "a_in_b": div(both, n_a), "b_in_a": div(both, n_b),
            "n_a": n_a, "n_b": n_b, "n_both": both}


def entropy_change_share_on_forks(
    h_base: Float[Tensor, "*shape"],
    h_rl: Float[Tensor, "*shape"],
    mask: Bool[Tensor, "*shape"],
    forks: Bool[Tensor, "*shape"],
    signed: bool = False,
) -> float | None:
    """Share of the entropy change that falls on forks.

    Unsigned: sum over forks of |dH| / sum over masked tokens of |dH|, dH = h_rl - h_base, in
    [0, 1]. Signed: sum over forks of dH / sum over masked tokens of dH (can leave [0, 1] when
    changes of both signs cancel). Forks outside `mask` are ignored. None when the denominator is 0.
    """
    _same_shape(h_base=h_base, h_rl=h_rl, mask=mask, forks=forks)
    dh = (h_rl.double() - h_base.double()) * mask  # (*shape)
    if not signed:
        dh = dh.abs()
    total = dh.sum().item()
    return (dh * (forks & mask)).sum().item() / total if total != 0 else None


def entropy_change_share_ci(
    h_base: Float[Tensor, "rows pos"],
    h_rl: Float[Tensor, "rows pos"],
    mask: Bool[Tensor, "rows pos"],
    forks: Bool[Tensor, "rows pos"],
    groups: Int[Tensor, " rows"],
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the unsigned `entropy_change_share_on_forks`, resampling
    groups of rows (e.g. the problem each trajectory answers) with the forks held fixed. None when
    no entropy changed."""
    _same_shape(h_base=h_base, h_rl=h_rl, mask=mask, forks=forks)
    dh = ((h_rl.double() - h_base.double()) * mask).abs()  # (rows, pos)
    per_row = torch.stack([(dh * (forks & mask)).sum(1), dh.sum(1)], 1)  # (rows, 2): on forks, all
    g = torch.as_tensor(groups).long().cpu()
    per_group = torch.zeros(int(g.max()) + 1, 2, dtype=torch.float64).index_add_(0, g, per_row.cpu())
    per_group = per_group[per_group[:, 1] > 0]
    if per_group.shape[0] == 0:
        return None
    return bootstrap_ci(per_group, lambda x: x[:, 0].sum() / x[:, 1].sum(), n_boot=n_boot, seed=seed)


def role_split(
    entropy: Float[Tensor, "*shape"],
    mask: Bool[Tensor, "*shape"],
    roles: Int[Tensor, "*shape"],
    forks: Bool[Tensor, "*shape"],
    codes: Mapping[str, int] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Per role ("planning", "execution", ...): token count, mean entropy, fork count, fork rate
    (fraction of that role's tokens that are forks) and fork share (fraction of all forks that
    have that role). Means over no tokens are None."""
    _same_shape(entropy=entropy, mask=mask, roles=roles, forks=forks)
    codes = dict(ROLE_CODES if codes is None else codes)
    m, f = mask.bool(), forks.bool() & mask.bool()
    n_forks_all = int(f.sum())
    out: dict[str, dict[str, float | int | None]] = {}
    for role, code in codes.items():
        where = m & (roles == code)
        n, k = int(where.sum()), int((where & f).sum())
        out[role] = {
            "n_tokens": n,
            "entropy_mean": entropy[where].double().mean().item() if n else None,
            "n_forks": k,
            "fork_rate": k / n if n else None,
            "fork_share": k / n_forks_all if n_forks_all else None,
        }
    return out

"""Forks: the high-entropy minority of answer tokens where a sampled branch really chooses.

What it is: the per-batch selection of the top-rho fraction of generated tokens by token entropy
(rho = 0.2 by default, the "20% of tokens" of Wang et al. 2025, "Beyond the 80/20 rule").

What it is not: an entropy computation (entropies come in, already in nats) or a cross-model
comparison (overlap between models and the share of the entropy change carried by forks come
later).

Where it departs from the paper: the paper keeps every token with entropy >= the batch's
(1 - rho) quantile, so ties at the threshold can select more than rho of the tokens. Here exactly
m = ceil(rho * N) of the N masked tokens are forks (at least one when N > 0): tokens are ranked by
entropy, highest first, and ties are broken by position in row-major order (earlier row, then
earlier token, wins). The threshold is the entropy of the m-th ranked token, so every fork has
entropy >= threshold and every non-fork has entropy <= threshold.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor


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

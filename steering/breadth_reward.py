"""The breadth rewards a learned edit is trained on (`steering.learn`, objective "breadth").

What it is: per-sample rewards over prompt-major groups of `group_size` samples, and the
group-relative advantages the policy gradient uses. `reward="unique"`: a correct sample earns 1 /
(how many samples of its group share its canonical solution), so a group's total is its number of
distinct correct solutions; `"novel"`: the same among the steered samples, paid only for solutions
no unsteered sample of the group found; `"pass_at_k"`: the pass@k advantage of arXiv:2508.10751
(Chen et al., "Pass@k Training"): a correct sample's advantage is the group's pass@k,
1 - C(n_wrong, k) / C(n, k), minus the mean, a wrong one's the pass@k it costs. "unique" and
"pass_at_k" are `probe.metrics.passk`'s (the GRPO trainer's); "novel" is built here on
`distinct_solution_shares`.

What it is not: the training loop (`steering.learn`) or a metric (`probe.metrics.passk`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from probe.metrics.passk import distinct_solution_shares, pass_at_k_advantages

REWARDS = ("unique", "novel", "pass_at_k")

unique_reward = distinct_solution_shares
"""The "unique" breadth reward: `probe.metrics.passk.distinct_solution_shares` (1 / multiplicity of a
correct sample's solution in its group, 0 if wrong; a group's rewards sum to its distinct correct count)."""


def pass_at_k_advantage(correct: Bool[Tensor, " rows"], group_size: int, k: int) -> Float[Tensor, " rows"]:
    """The "pass_at_k" breadth reward's advantage: `probe.metrics.passk.pass_at_k_advantages` divided
    by the group's sigma = sqrt(R (1 - R)) (no epsilon; 1 where sigma = 0), float32."""
    return pass_at_k_advantages(correct, group_size, k, std_normalize=True, eps=0.0)


def novel_reward(keys: Sequence[Any], group_size: int, m: int) -> Float[Tensor, " rows"]:
    """Per row of prompt-major groups whose first `m` samples were steered: a steered correct sample
    earns 1 / (its multiplicity among the steered samples) if no unsteered sample of its group found
    its solution, else 0; unsteered rows get 0. A group's total = the solutions only steering found."""
    out = torch.zeros(len(keys), dtype=torch.float32)
    for g0 in range(0, len(keys), group_size):
        ref = {k for k in keys[g0 + m:g0 + group_size] if k is not None}
        new = [k if k is not None and k not in ref else None for k in keys[g0:g0 + m]]
        out[g0:g0 + m] = unique_reward(new, m)
    return out


def breadth_advantages(reward: str, correct: Bool[Tensor, " rows"], keys: Sequence[Any], group_size: int, m: int,
                       k: int = 8, std_normalize: bool = True) -> tuple[Float[Tensor, " rows"], float | None]:
    """(per-row advantage of `reward` over prompt-major groups whose first `m` samples were steered,
    the mean reward per group (None for "pass_at_k")). "unique" and "novel": centred over each
    group's steered rows (divided by their std when `std_normalize` and m > 1), 0 on unsteered rows;
    "pass_at_k": `pass_at_k_advantage` at `k` over every row of the group (m and std_normalize
    unused; the learning loop's loss reads the steered rows only). keys: canonical solutions (None:
    wrong)."""
    if reward not in REWARDS:
        raise ValueError(f"reward={reward!r} is not one of {REWARDS}")
    if reward == "pass_at_k":
        return pass_at_k_advantage(correct, group_size, k), None
    r = unique_reward(keys, group_size) if reward == "unique" else novel_reward(keys, group_size, m)
    rs = r.view(-1, group_size)[:, :m]  # [groups, m] the steered rows' rewards
    a = rs - rs.mean(1, keepdim=True)
    if std_normalize and m > 1:
        a = a / (rs.std(1, keepdim=True) + 1e-6)
    adv = torch.zeros(r.numel() // group_size, group_size)
    adv[:, :m] = a
    return adv.view(-1), rs.sum().item() / rs.shape[0]

"""Per-token record of a steered sampling run: was each decision steered, by how much, and what it did.

What it is: `SteeringTrace`, filled by `steering.apply.Steering(trace=True)` while
`probe.sampling.sampler.sample_branches` runs: one record per forward pass with the batch items' ids, the
steered flag of each decision position, the coefficient applied (0 where not steered), and the
next-token entropy (nats, temperature 1, full vocabulary) before (the probe pass: this position
unsteered, the actual steered prefix in the cache) and after (the steered forward's distribution).
`dense` lays it out like `Branches.tokens`. Inactive (finished) rows get NaN entropies.

What it is not: a metric; entropies here ignore the sampler's temperature / top-k / top-p, so
`entropy_after` equals `Branches.entropy` only at temperature 1 without filtering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class SteeringTrace:
    """Per-decision records of one `sample_branches` call (reset each time the steering is bound)."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def dense(self, n: int, max_new_tokens: int) -> dict[str, Tensor]:
        """`steered`, `coef`, `entropy_before`, `entropy_after` as `[rows, max_new_tokens]` tensors,
        aligned with `Branches.tokens` (column j: the decision that sampled token j; the prompt's
        decision is column 0 of each of its n rows). False / 0 / NaN where nothing was decided."""
        rows = max([(int(r["ids"].max()) + 1) * (n if r["prompt"] else 1) for r in self.records] or [0])
        out = {"steered": torch.zeros(rows, max_new_tokens, dtype=torch.bool),
               "coef": torch.zeros(rows, max_new_tokens),
               "entropy_before": torch.full((rows, max_new_tokens), float("nan")),
               "entropy_after": torch.full((rows, max_new_tokens), float("nan"))}
        for r in self.records:
            ids, col = r["ids"], r["step"] + 1
            if r["prompt"]:  # one item per prompt: its n rows share the decision
                ids = (ids[:, None] * n + torch.arange(n)).flatten()
            for k, v in out.items():
                v[ids, col] = r[k].repeat_interleave(n) if r["prompt"] else r[k]
        return out

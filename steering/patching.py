"""Cross-model patching: the upper bound and the localiser of what a steering vector can restore.

What it is (docs/architecture.md's definition): while the RL model samples, its activation at layer L (site
`blocks.{L}.hook_resid_post` by default) is pulled toward the base model's on the *same prefix*:
h <- h + alpha * (h_base - h), computed as `torch.lerp(h, h_base, alpha)` so that alpha = 0 is
exactly h and alpha = 1 exactly h_base. The base model runs as a `steering.shadow.Shadow`: one base
forward per RL forward, with its own KV cache kept in step with the sampler's rows. Sweeping L
and alpha (the study does that) shows where the collapse lives: the layer whose patch restores
the base's breadth.

"At forks only": a gate of `steering.gates` decides which decision positions are patched. The
natural ones here are `base_entropy` (the base model's own forks, free since the base runs anyway)
and `entropy` (the RL model's, probe pass: 2x RL forwards); `always` with `where="all"` patches
every token, prompt included. The `trace` records alpha as the coefficient.

Departures: none from docs/architecture.md. Note what a patch at layer L does not undo: the RL model's later
layers still process the patched residual, and earlier positions' keys / values come from the RL
model's own (patched) forward, so alpha = 1 at every token equals the base residual at layer L only,
not the base's outputs (unless L is the last layer and the heads agree).

What it is not: a deliverable (it needs both models at inference), or teacher-forced activation
patching of a fixed input (use it outside the sampler on full sequences for that: every position
is then a decision position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from probe.models.hooks import site_name
from probe.models.pair import RESID_POST
from steering.apply import Steering, SteeringError
from steering.shadow import hf_of


class Patching(Steering):
    """Interpolates the steered model's activation at `layers` toward the base model's (alpha)."""

    def __init__(self, model: Any, base: Any, layers: int | Sequence[int], alpha: float, *,
                 site: str = RESID_POST, **kwargs: Any):
        layers = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
        if not layers:
            raise ValueError("layers is empty: pass the layer (or layers) to patch, e.g. layers=2")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha={alpha!r} is invalid: allowed a float in [0, 1] (0 = RL, 1 = base). "
                             "Fix: sweep e.g. alpha in (0.25, 0.5, 1.0).")
        rl, b = hf_of(model), hf_of(base)
        for what, va, vb in (("hidden_size", rl.config.hidden_size, b.config.hidden_size),
                             ("num_hidden_layers", rl.config.num_hidden_layers, b.config.num_hidden_layers),
                             ("vocabulary", rl.get_output_embeddings().weight.shape[0],
                              b.get_output_embeddings().weight.shape[0])):
            if va != vb:
                raise SteeringError(f"cannot patch across models whose {what} differ ({va} vs {vb}). Fix: patch an "
                                    "RL checkpoint with the base it was trained from.")
        sites = [site_name(site, x) for x in layers]
        super().__init__(model, sites, base=base, shadow_sites=sites, **kwargs)
        self.alpha, self.trace_coef = float(alpha), float(alpha)

    def edit(self, name, x, mask):
        hb = self.shadow.acts.get(name)
        if hb is None or hb.shape != x.shape:
            raise SteeringError(f"no base activation at {name} matching {tuple(x.shape)} (got "
                                f"{None if hb is None else tuple(hb.shape)}): the base did not run on this input")
        return torch.where(mask[..., None], torch.lerp(x, hb.to(x), self.alpha), x)


def patch(model: Any, base: Any, layers: int | Sequence[int], alpha: float, **kwargs: Any) -> Patching:
    """`Patching(model, base, layers, alpha, ...)`: a context manager and `sample_branches` intervention.

    kwargs: `site` (template, default resid_post), `gate` (default "always"), `where`, `threshold`,
    `detector`, `planning`, `trace`; see `steering.apply.Steering` and `steering.gates`.
    """
    return Patching(model, base, layers, alpha, **kwargs)


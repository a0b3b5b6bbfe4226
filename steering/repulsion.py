"""Batch-diversity steering: push the concurrent samples of one prompt apart in the residual stream.

What it is: an RL-alone baseline in the spirit of STARS (arXiv:2601.22010) and SPREAD
(arXiv:2511.08305). While `probe.sampling.sampler.sample_branches` decodes, at every generated token and
each layer in `layers` (site `blocks.{L}.hook_resid_post` by default), each row's residual h_i is
pushed away from the centroid of its prompt's concurrent samples (itself included). Exactly, at
every decision position the gate selects, with G = the *active* rows of the same prompt in this
forward batch (finished rows riding along until the sampler drops them are excluded):

    m   = mean_{j in G} h_j                       (the group's centroid, float32)
    s   = mean_{j in G} ||h_j||                   (the group's mean residual norm)
    d_i = h_i - m
    h_i <- h_i + strength * s * d_i / (||d_i|| + eps * s)

So `strength` is a fraction of the residual norm (the same meaning at every layer), the push
points away from the centroid, and its size saturates at `strength * s` once a row is more than
a few `eps * s` from it. Rows alone in their group (n = 1, or the last active sample of a prompt)
have d_i = 0 and get no push; so do rows whose state equals the centroid (samples that have read
the same tokens so far: no deterministic edit can separate identical states, only the sampler's
randomness can). The `eps` softening keeps the edit continuous at d_i = 0: a hard unit vector
would turn float noise between rows that should be identical into a full-size push in a random
direction. The gate decides which rows are pushed; the centroid is over all active rows of the
group, gated or not. The trace records `strength` as the coefficient, and `steered` only where a
push was applied (never the first token, never a row without an active sibling).

Coupling and exactness: the edit *intends* to couple the rows of one prompt, so a row's sample
depends on its siblings; rows of different prompts never influence each other (per-prompt sums
in a fixed order), so a prompt sampled alone with its `prompt_keys` equals its rows of a batch,
provided the sampler never splits a prompt's samples across row batches: keep
`SamplerConfig.batch_size` a multiple of `n` (otherwise each part is repelled within itself).
`strength = 0` is bit-identical to no intervention.

Departures from the papers: STARS / SPREAD solve for per-sample steering vectors of fixed norm that
maximise the volume (log-det of the Gram matrix) of the steered activations, by Riemannian
gradient steps (STARS: one closed-form step per token on the Stiefel manifold; SPREAD: block
coordinate descent on a product of spheres, at synchronisation anchors). Here: no optimisation
and no volume objective; one closed-form push per token along the direction away from the
group's centroid, of size `strength * s` (the analogue of their fixed steering norm); no
orthogonality between the pushes. The prompt's prefill is shared by its samples, so the first
generated token is never pushed (all samples have the same state there).

What it is not: usable outside the sampler (it needs `SamplingState.prompt_index` / `active` to
know the groups; a plain forward raises `SteeringError`), or a cross-model diagnostic (it runs the
RL model alone, one forward per token; gates that need the base or a probe pass cost what they
cost for any `Steering`, see `steering.gates`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.models.hooks import site_name
from probe.models.pair import RESID_POST
from steering.apply import Steering, SteeringError


def repel(x: Float[Tensor, "batch seq d_model"], groups: Sequence[Int[Tensor, " k"]], strength: float,
          eps: float) -> Float[Tensor, "batch seq d_model"]:
    """The push of every row of `x` (zero outside `groups`): the module docstring's formula, per
    group of row indices (in a fixed order, so a group's result does not depend on other rows)."""
    push = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [b, s, d]
    for idx in groups:
        if idx.numel() < 2:
            continue
        h = x[idx].float()  # [k, s, d]
        d = h - h.mean(0)  # [k, s, d]
        s = h.norm(dim=-1).mean(0)  # [s]
        denom = (d.norm(dim=-1, keepdim=True) + eps * s[None, :, None]).clamp_min(torch.finfo(torch.float32).tiny)
        push[idx] = strength * s[None, :, None] * d / denom
    return push


class Repulsion(Steering):
    """Pushes each row's residual at `layers` away from its prompt's concurrent samples (`strength`)."""

    def __init__(self, model: Any, layers: int | Sequence[int], strength: float, *, eps: float = 0.01,
                 site: str = RESID_POST, **kwargs: Any):
        layers = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
        if not layers:
            raise ValueError("layers is empty: pass the layer (or layers) to steer, e.g. layers=2")
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not num(strength) or not 0 <= strength < float("inf"):
            raise ValueError(f"strength={strength!r} is invalid: allowed a finite float >= 0 (a fraction of the "
                             "residual norm; 0 = no push). Fix: sweep e.g. strength in (0.05, 0.1, 0.2).")
        if not num(eps) or not 0 < eps < float("inf"):
            raise ValueError(f"eps={eps!r} is invalid: allowed a finite float > 0 (softening, as a fraction of the "
                             "residual norm). Fix: keep the default 0.01.")
        if kwargs.get("where", "generated") != "generated":
            raise ValueError(f"where={kwargs['where']!r} is invalid for Repulsion: a prompt position is shared by "
                             "all samples of its prompt, so there is nothing to push apart. Fix: where='generated'.")
        super().__init__(model, [site_name(site, x) for x in layers], **kwargs)
        if not any(kind == "hf" for kind, _ in self.targets):
            raise SteeringError("Repulsion needs a Hugging Face model run by probe.sampling.sampler.sample_branches (it reads "
                                "the sampler's prompt groups). Fix: steer the HF model (HookedModel.hf).")
        self.strength, self.eps, self.trace_coef = float(strength), float(eps), float(strength)

    def _groups(self) -> list[Int[Tensor, " k"]]:
        """Row indices of the forward batch per prompt (active rows only); once per forward pass."""
        if "groups" not in self._fwd:
            st = self.state
            live = st.active.nonzero().squeeze(-1)  # [a] ascending: rows stay prompt-major
            _, counts = torch.unique_consecutive(st.prompt_index[live], return_counts=True)
            self._fwd["groups"] = list(live.split(counts.tolist()))
        return self._fwd["groups"]

    def condition(self, b: int, s: int, device) -> Int[Tensor, "batch seq"] | None:
        """-1 (not steered) for the prefill and for rows with no active sibling, so that the mask (and
        the trace's `steered`) marks exactly the positions that can be pushed."""
        st = self.state
        if st is None:
            return None
        cond = torch.full((b, s), -1, dtype=torch.long, device=device)
        if st.phase != "prompt":
            for idx in self._groups():
                if idx.numel() > 1:
                    cond[idx.to(device)] = 0
        return cond

    def edit(self, name: str, x: Float[Tensor, "batch seq d_model"],
             mask: Bool[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d_model"]:
        st = self.state
        if st is None:
            raise SteeringError("Repulsion couples the samples of one prompt and needs the sampler's state to know "
                                "them: run it as the intervention= of probe.sampling.sampler.sample_branches, not around a "
                                "plain forward pass.")
        if not mask.any():  # the prefill, a gate that did not fire, or no row with a sibling
            return x
        push = repel(x, self._groups(), self.strength, self.eps)  # [b, s, d] float32
        return torch.where(mask[..., None] & (push != 0), (x.float() + push).to(x.dtype), x)  # exact where no push


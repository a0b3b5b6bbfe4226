"""Attention sinks: the positions an SAE is neither trained on, scored on, nor allowed to edit.

Pretrained LMs park a vector of huge norm on their first token (SmolLM2-135M at layer 15: ~145x the
median norm, the same vector for every prompt; every other token within 1.4x of the median). Left
in, that one row per sequence carries ~97% of the activations' variance: an SAE's loss is then
about reconstructing it, and an FVU over all tokens measures that (0.001 on SmolLM2) while the loss
with the SAE spliced in rises by 0.36 nats per answer token. `sink_mask` finds them by norm, so SAE
training (`experiments.study.sae_stage`), the scores and the splice (`probe.sae.quality`) and the
SAE-based edits (`steering.sae_edit`, `steering.learned` kind "sae") leave them out or as they are.
The organisms have none (max / median norm 1.6). Torch only: no sae-lens import.
"""

from __future__ import annotations

from jaxtyping import Bool, Float
from torch import Tensor

SINK_NORM_RATIO = 10.0
"""Activations with a norm above this many times the median are attention sinks (`sink_mask`). On
SmolLM2-135M the first token's is ~145x the median and every other token's is within 1.4x of it."""


def sink_threshold(norms: Float[Tensor, "*positions"]) -> float:
    """The norm above which an activation is an attention sink: `SINK_NORM_RATIO` x the median of
    `norms` (the activations' L2 norms over the positions one rule should hold for)."""
    return SINK_NORM_RATIO * float(norms.float().median())


def sink_mask(x: Float[Tensor, "*rows d_model"], threshold: float | None = None) -> tuple[Bool[Tensor, "*rows"], float]:
    """(positions of `x` that are attention sinks, the norm threshold): norm > `threshold`, by
    default `sink_threshold` over all of `x`'s positions."""
    norms = x.float().norm(dim=-1)
    thr = sink_threshold(norms) if threshold is None else float(threshold)
    return norms > thr, thr


def find_sinks(x: Float[Tensor, "n d_model"]) -> tuple[Bool[Tensor, " n"], dict]:
    """(`sink_mask(x)`, what leaving those sinks out removes: their count, the threshold, the largest
    norm over the median, and the share of the activations' variance (around their mean) they carry)."""
    sink, threshold = sink_mask(x)
    x64 = x.double()
    sq = (x64 * x64).sum(-1)  # ||x_i||^2
    norms = sq.sqrt()
    mu, n, ns = x64.mean(0), x.shape[0], int(sink.sum())
    total = float(sq.sum() - n * (mu @ mu))
    on_sinks = float(sq[sink].sum() - 2 * (mu @ x64[sink].sum(0)) + ns * (mu @ mu)) if ns else 0.0
    return sink, {"n_sinks": ns, "sink_threshold": threshold, "max_to_median_norm": float(norms.max() / norms.median()),
                  "sink_variance_share": on_sinks / total if total > 0 else 0.0}

"""Final-norm conventions: how a norm module scales its normalised input, told from its output.

What it is: `NORM_CONVENTIONS` (RMS or layer normalisation, times `weight`, `1 + weight` (Gemma,
Qwen3-Next, Nemotron's LayerNorm1P, ...) or nothing, plus `bias` when the module has one);
`norm_convention(norm)`, which finds the convention that reproduces a module on a probe input
(or raises `NormConventionError` naming the module); `normalized`, which recovers TransformerLens's
`ln_final.hook_normalized` (the normalised input before gain and bias) from the module's output;
and `norm_gain`, the per-feature gain itself.

What it is not: a norm implementation, or where the final norm is (`probe.models.structure`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn


class NormConventionError(ValueError):
    """A norm module whose output none of `NORM_CONVENTIONS` reproduces."""


NORM_CONVENTIONS: dict[str, tuple[str, str]] = {
    "rms": ("rms", "weight"),
    "rms_offset": ("rms", "1+weight"),
    "rms_plain": ("rms", "none"),
    "layer": ("layer", "weight"),
    "layer_offset": ("layer", "1+weight"),
    "layer_plain": ("layer", "none"),
}
"""Final-norm conventions: name -> (normalisation, gain); a `bias` is added when the module has one."""


def _gain(norm: nn.Module, kind: str) -> Tensor | None:
    w = getattr(norm, "weight", None)
    if kind == "none" or not isinstance(w, Tensor):
        return None
    return (1 + w.float()) if kind == "1+weight" else w.float()


def norm_convention(norm: nn.Module, width: int | None = None) -> str:
    """The `NORM_CONVENTIONS` key that reproduces `norm` on a probe input of `width` features
    (default: the weight's width); raises `NormConventionError`."""
    p = next(norm.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    w = getattr(norm, "weight", None)
    d = width or (w.shape[-1] if isinstance(w, Tensor) else None)
    if d is None:
        raise NormConventionError(f"cannot tell the width of the final norm {type(norm).__name__} (no weight); "
                             "pass width=")
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(0)).mul(3).to(dev)
    try:
        with torch.no_grad():
            y = norm(x.to(p.dtype) if p is not None else x).float()
    except Exception as e:
        raise NormConventionError(f"the final norm {type(norm).__name__} does not run on a [2, 3, {d}] probe input "
                             f"({type(e).__name__}: {e}), so its convention is unknown") from e
    bias = getattr(norm, "bias", None)
    b = bias.float() if isinstance(bias, Tensor) else 0.0
    tol = 1e-3 if p is None or p.dtype == torch.float32 else 3e-2
    for key, (kind, gain) in NORM_CONVENTIONS.items():
        if gain != "none" and not isinstance(getattr(norm, "weight", None), Tensor):
            continue
        n = (x - x.mean(-1, keepdim=True)) if kind == "layer" else x
        n = n / n.pow(2).mean(-1, keepdim=True).sqrt()
        g = _gain(norm, gain)
        pred = n * (g if g is not None else 1.0) + b
        if (pred - y).norm() <= tol * y.norm():
            return key
    raise NormConventionError(
        f"unknown norm convention of the final norm {type(norm).__name__}: its output is none of "
        f"{list(NORM_CONVENTIONS)} (RMS or layer norm times weight, 1 + weight or nothing, plus bias), so "
        "ln_final.hook_normalized cannot be recovered from it exactly")


def normalized(norm: nn.Module, out: Float[Tensor, "*batch d_model"], convention: str) -> Float[Tensor, "*batch d_model"]:
    """TransformerLens's `ln_final.hook_normalized` from the norm's output: (out - bias) / gain.
    Exact up to rounding; undefined where the gain is 0."""
    _, gain = NORM_CONVENTIONS[convention]
    bias = getattr(norm, "bias", None)
    x = out - bias if isinstance(bias, Tensor) else out
    g = _gain(norm, gain)
    return x if g is None else x / g.to(x.dtype)


def norm_gain(norm: nn.Module, convention: str) -> Tensor | None:
    """The per-feature factor the norm applies after normalising (None: no affine gain)."""
    return _gain(norm, NORM_CONVENTIONS[convention][1])

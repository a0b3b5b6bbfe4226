"""The hook-site names: TransformerLens activation names, resolved to a module of any HF model.

What it is: one naming scheme for activations (TransformerLens's: `blocks.{L}.hook_resid_post`,
...) and `resolve_hook`, which maps a name to the Hugging Face module (and port) that holds it, for
the nnsight backend and for plain torch hooks (steering). Where each component lives comes from the
model's structure (`probe.models.structure.structure_of`: the decoder-layer list, each layer's attention
and MLP / mixture-of-experts block, the final norm), for any decoder-only `*ForCausalLM`; the
architecture facts the structure leaves ambiguous are data in `probe.models.structure.OVERRIDES`, never an
`if arch == ...` branch.

`hook_module` is the one torch hook every reader and editor of a resolved HF site registers
(`probe.models.pair`'s activations, `steering`'s sites and shadow, the SAE splice of
`probe.sae.quality`): it reads the module's input or output and may replace it, or raise
`StopForward` to end a forward whose rest nobody needs.

What it is not: running models (see `probe.models.pair`); the set of names is deliberately small
(`SITES`), the activations every backend can give identically.

Semantics, matched to TransformerLens (`fold_ln=False`, no weight processing):
- `blocks.{L}.hook_resid_pre`: input of block L (embeddings, plus positions for GPT-2, at L=0).
- `blocks.{L}.hook_resid_post`: output of block L (before the final norm, also for the last block).
- `blocks.{L}.hook_attn_out` / `blocks.{L}.hook_mlp_out`: what the attention / MLP sub-block adds
  to the residual stream (the module's output, first element when it returns a tuple; the
  post-norm's output where the layer normalises the sub-block's output before adding it, as
  Gemma 2/3 and OLMo 2 do; a mixture-of-experts block's combined output). In hybrid layers the
  token mixer may be linear attention or a state-space mixer: `hook_attn_out` is its output.
  Scaled residuals (Granite's `residual_multiplier`) add `scale * attn_out`.
- `ln_final.hook_normalized`: the final norm's normalised input *before* its affine weight (and
  bias), as TransformerLens defines it. HF modules only expose the norm's output, so for nnsight
  the affine map is undone: (out - bias) / gain, with gain = weight, 1 + weight (Gemma, ...), or
  none, by the norm's convention (`probe.models.norms.NORM_CONVENTIONS`). Exact up to float rounding;
  undefined where the gain is 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from probe.models.structure import StructureError, structure_of

# site template -> (component of the structure, "input" | "output", post-processing or None).
SITES: dict[str, tuple[str, str, str | None]] = {
    "blocks.{L}.hook_resid_pre": ("layer", "input", None),
    "blocks.{L}.hook_attn_out": ("attn", "output", None),
    "blocks.{L}.hook_mlp_out": ("mlp", "output", None),
    "blocks.{L}.hook_resid_post": ("layer", "output", None),
    "ln_final.hook_normalized": ("final_norm", "output", "undo_affine"),
}
"""Execution order within a block is the dict order (nnsight must read activations in order)."""

_PATTERNS = {t: re.compile("^" + re.escape(t).replace(r"\{L\}", r"(\d+)") + "$") for t in SITES}


class HookSiteError(ValueError):
    """An activation name that is not in the table (or not in this model)."""


@dataclass(frozen=True)
class ResolvedHook:
    """Where one named activation lives in one model."""

    name: str
    """The TransformerLens name, e.g. "blocks.3.hook_resid_post"."""
    template: str
    """Its entry in `SITES`, e.g. "blocks.{L}.hook_resid_post"."""
    layer: int | None
    """Block index, or None for sites outside the blocks (ln_final)."""
    module_path: str
    """HF module path (`model.get_submodule(path)`), e.g. "model.layers.3"."""
    port: str
    """"input" (first positional argument, or the `hidden_states` keyword) or "output" (first
    element if a tuple or list)."""
    post: str | None
    """Post-processing the HF value needs to equal the TransformerLens one: "undo_affine:<convention>"
    (a key of `probe.models.norms.NORM_CONVENTIONS`) for ln_final, else None."""

    @property
    def order(self) -> tuple[int, int]:
        """Forward-execution order: (layer, position in SITES); ln_final comes last."""
        layer = self.layer if self.layer is not None else 1 << 30
        return (layer, list(SITES).index(self.template))


def valid_sites(n_layers: int) -> str:
    """Human-readable list of the valid names for a model with `n_layers` blocks."""
    per_layer = [t for t in SITES if "{L}" in t]
    other = [t for t in SITES if "{L}" not in t]
    return f"{', '.join(per_layer)} (L in 0..{n_layers - 1}), {', '.join(other)}"


def _hf_of(model: Any):
    for obj in (model, getattr(model, "hf", None), getattr(model, "_module", None)):
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "model_type") and hasattr(obj, "named_modules"):
            return obj
    raise TypeError(
        f"cannot find a Hugging Face model on {type(model).__name__}; pass a HookedModel, an HF "
        "causal LM or an nnsight TransformersModel"
    )


def resolve_hook(name: str, model: Any) -> ResolvedHook:
    """Resolve a TransformerLens activation name for `model` (a `HookedModel`, an HF causal LM
    or an nnsight `TransformersModel`). Raises `HookSiteError` listing the valid names, or naming
    the piece of the model's structure that is missing and how to add an override."""
    hf = _hf_of(model)
    try:
        struct = structure_of(hf)
    except StructureError as e:
        raise HookSiteError(f"cannot resolve {name!r} in {type(hf).__name__}: {e}") from e
    n_layers = struct.n_layers
    for template, pattern in _PATTERNS.items():
        m = pattern.match(name)
        if m is None:
            continue
        layer = int(m.group(1)) if m.groups() else None
        if layer is not None and not 0 <= layer < n_layers:
            raise HookSiteError(
                f"hook site {name!r}: layer {layer} is out of range for a {n_layers}-layer model; "
                f"valid sites: {valid_sites(n_layers)}"
            )
        component, port, post = SITES[template]
        site = struct.site(component, layer)
        if site.path is None:
            raise HookSiteError(f"hook site {name!r} is not available in this {struct.model_type} model: {site.reason}")
        if post == "undo_affine":
            post = f"undo_affine:{struct.norm_convention}"
        return ResolvedHook(name, template, layer, site.path, port, post)
    raise HookSiteError(
        f"unknown hook site {name!r}; valid sites: {valid_sites(n_layers)}. Fix: use a "
        "TransformerLens name from that list, e.g. 'blocks.0.hook_resid_post'."
    )


def site_name(template: str, layer: int) -> str:
    """`site_name("blocks.{L}.hook_resid_post", 3)` -> "blocks.3.hook_resid_post"."""
    if template not in SITES:
        raise HookSiteError(f"unknown hook site template {template!r}; valid: {list(SITES)}")
    return template.replace("{L}", str(layer))


class StopForward(Exception):
    """Raised by a hook once its caller holds everything it needs from a forward pass: the rest of
    it (later blocks, the unembedding) is skipped. The caller that ran the forward catches it."""


def hook_module(hf: nn.Module, site: ResolvedHook, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """Register `fn(activation) -> replacement or None` on `site`'s module of the HF model `hf`.

    The activation is the module's input (first positional argument, or the `hidden_states`
    keyword) for an "input" port, its output (first element of a tuple or list) for an "output"
    port; (batch, pos, d_model) in every decoder. A returned tensor replaces it in the forward;
    None leaves it. `fn` may raise `StopForward`. Returns the handle; the caller removes it."""
    module = hf.get_submodule(site.module_path)
    if site.port == "input":
        def pre(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            x = args[0] if args else kwargs["hidden_states"]
            y = fn(x)
            if y is None:
                return None
            return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m: nn.Module, args: tuple, out: Any) -> Any:
        seq = isinstance(out, (tuple, list))  # (hidden, extras...) as a tuple, or a list (GPT-1 blocks)
        y = fn(out[0] if seq else out)
        if y is None or not seq:
            return y
        return [y, *out[1:]] if isinstance(out, list) else (y, *out[1:])

    return module.register_forward_hook(post)

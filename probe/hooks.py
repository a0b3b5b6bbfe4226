"""The hook-site table: TransformerLens activation names, resolved for every backend by lookup.

What it is: one naming scheme for activations (TransformerLens's: `blocks.{L}.hook_resid_post`,
...) and the data that maps each name to a Hugging Face module for the nnsight backend (and for
plain torch hooks, e.g. steering). Architecture differences live in two dicts, `FAMILIES`
(module paths of one layout) and `MODEL_TYPES` (`config.model_type` -> family); supporting a new
architecture is one entry, never an `if arch == ...` branch.

What it is not: running models or registering hooks (see `probe.pair`); the set of names is
deliberately small (`SITES`), the activations every backend can give identically.

Semantics, matched to TransformerLens (`fold_ln=False`, no weight processing):
- `blocks.{L}.hook_resid_pre`: input of block L (embeddings, plus positions for GPT-2, at L=0).
- `blocks.{L}.hook_resid_post`: output of block L (before the final norm, also for the last block).
- `blocks.{L}.hook_attn_out` / `blocks.{L}.hook_mlp_out`: what the attention / MLP sub-block adds
  to the residual stream (the module's output, first element when it returns a tuple).
- `ln_final.hook_normalized`: the final norm's normalised input *before* its affine weight (and
  bias), as TransformerLens defines it. HF modules only expose the norm's output, so for nnsight
  the affine map is undone: (out - bias) / weight. Exact up to float rounding; undefined where a
  weight is 0, and wrong for norms that scale by (1 + weight) (Gemma; not in the table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# site template -> (component of the family, "input" | "output", post-processing or None).
SITES: dict[str, tuple[str, str, str | None]] = {
    "blocks.{L}.hook_resid_pre": ("layer", "input", None),
    "blocks.{L}.hook_attn_out": ("attn", "output", None),
    "blocks.{L}.hook_mlp_out": ("mlp", "output", None),
    "blocks.{L}.hook_resid_post": ("layer", "output", None),
    "ln_final.hook_normalized": ("final_norm", "output", "undo_affine"),
}
"""Execution order within a block is the dict order (nnsight must read activations in order)."""

FAMILIES: dict[str, dict[str, str]] = {
    "llama": {  # pre-norm decoder layers under `model.layers`
        "layer": "model.layers.{L}",
        "attn": "model.layers.{L}.self_attn",
        "mlp": "model.layers.{L}.mlp",
        "final_norm": "model.norm",
    },
    "gpt2": {
        "layer": "transformer.h.{L}",
        "attn": "transformer.h.{L}.attn",
        "mlp": "transformer.h.{L}.mlp",
        "final_norm": "transformer.ln_f",
    },
    "gpt_neox": {
        "layer": "gpt_neox.layers.{L}",
        "attn": "gpt_neox.layers.{L}.attention",
        "mlp": "gpt_neox.layers.{L}.mlp",
        "final_norm": "gpt_neox.final_layer_norm",
    },
}
"""Module paths (relative to the `*ForCausalLM` model) of each layout's components."""

MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}
"""HF `config.model_type` -> family in `FAMILIES`."""

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
    """"input" (first positional argument) or "output" (first element if a tuple)."""
    post: str | None
    """Post-processing the HF value needs to equal the TransformerLens one (e.g. "undo_affine")."""

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


def family_of(model_type: str) -> dict[str, str]:
    """The module-path family for a HF `config.model_type`; raises naming supported types."""
    if model_type not in MODEL_TYPES:
        raise HookSiteError(
            f"no hook-site table entry for model_type={model_type!r}; supported: "
            f"{sorted(MODEL_TYPES)}. Fix: add it to probe.hooks.MODEL_TYPES (pointing at a layout "
            "in FAMILIES, or a new layout)."
        )
    return FAMILIES[MODEL_TYPES[model_type]]


def _config_of(model: Any):
    for obj in (model, getattr(model, "hf", None), getattr(model, "_module", None)):
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            return cfg
    raise TypeError(
        f"cannot find a Hugging Face config on {type(model).__name__}; pass a HookedModel, an HF "
        "causal LM or an nnsight TransformersModel"
    )


def resolve_hook(name: str, model: Any) -> ResolvedHook:
    """Resolve a TransformerLens activation name for `model` (a `HookedModel`, an HF causal LM
    or an nnsight `TransformersModel`). Raises `HookSiteError` listing the valid names."""
    cfg = _config_of(model)
    n_layers = int(cfg.num_hidden_layers)
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
        path = family_of(cfg.model_type)[component].replace("{L}", str(layer))
        return ResolvedHook(name, template, layer, path, port, post)
    raise HookSiteError(
        f"unknown hook site {name!r}; valid sites: {valid_sites(n_layers)}. Fix: use a "
        "TransformerLens name from that list, e.g. 'blocks.0.hook_resid_post'."
    )


def site_name(template: str, layer: int) -> str:
    """`site_name("blocks.{L}.hook_resid_post", 3)` -> "blocks.3.hook_resid_post"."""
    if template not in SITES:
        raise HookSiteError(f"unknown hook site template {template!r}; valid: {list(SITES)}")
    return template.replace("{L}", str(layer))

"""Where interventions attach: hook sites on every supported model object.

What it is: `targets(model)` lists the module trees a model object runs on (a HF causal LM, a
`probe.models.pair.HookedModel` (its HF model, plus its TransformerLens model for that backend), an
nnsight `TransformersModel` (its HF module), a TransformerLens `HookedTransformer`), and
`on_site` registers a read-or-replace hook at a `probe.models.hooks` name on one of them: the resolved HF
module's input / output (`probe.models.hooks.hook_module`) or the TransformerLens hook point.
`site_order` gives the forward-execution order of a name without a model.

What it is not: the name table itself (`probe.models.hooks`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from probe.models.hooks import SITES, HookSiteError, hook_module, resolve_hook
from probe.models.pair import HookedModel


def site_order(name: str) -> tuple[int, int]:
    """Forward-execution order (layer, position in `probe.models.hooks.SITES`) of an activation name."""
    for i, t in enumerate(SITES):
        m = re.fullmatch(re.escape(t).replace(r"\{L\}", r"(\d+)"), name)
        if m:
            return (int(m.group(1)) if m.groups() else 1 << 30, i)
    raise HookSiteError(f"unknown hook site {name!r}; valid templates: {list(SITES)}")


def targets(model: Any) -> list[tuple[str, Any]]:
    """[("hf", hf_model) | ("tl", hooked_transformer)]: every module tree `model` runs on."""
    if isinstance(model, HookedModel):
        return [("hf", model.hf)] + ([("tl", model.model)] if model.backend == "transformer_lens" else [])
    if isinstance(model, torch.nn.Module) and hasattr(getattr(model, "config", None), "model_type"):
        return [("hf", model)]
    if hasattr(model, "hook_dict") and hasattr(model, "cfg"):
        return [("tl", model)]
    inner = getattr(model, "_module", None)  # nnsight TransformersModel
    if isinstance(inner, torch.nn.Module) and hasattr(getattr(inner, "config", None), "model_type"):
        return [("hf", inner)]
    raise TypeError(f"cannot steer a {type(model).__name__}: pass a HF causal LM, a probe.models.pair.HookedModel, "
                    "an nnsight TransformersModel or a TransformerLens HookedTransformer")


def on_site(kind: str, model: Any, name: str, fn: Callable[[Tensor], Tensor | None]):
    """Register `fn(activation) -> replacement or None` at site `name`; returns the handle."""
    if kind == "tl":
        if name not in model.hook_dict:
            raise HookSiteError(f"TransformerLens model has no hook point {name!r}")
        return model.hook_dict[name].register_forward_hook(lambda m, a, out: fn(out))
    return hook_module(model, resolve_hook(name, model), fn)

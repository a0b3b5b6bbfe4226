"""Interventions inside the vLLM engine: a fixed residual-stream edit, as hooks in its worker model.

What it is: `StreamEdit`, the one intervention form `probe.sampling.vllm_engine` runs (a vector
added to the residual stream after given decoder layers, at the decision positions or at every
token, for all or the first `fraction` of each prompt's samples); `stream_edit`, which turns a
steering intervention's settings into one or refuses them with the reason; and the worker-side
functions the engine sends through `vllm.LLM.apply_model` (`install_hooks`, `remove_hooks`),
module-level so that vLLM's worker processes can import them by name.

The fused residual. vLLM's decoder layers (Llama, Qwen2, Mistral, ...) return
`(hidden_states, residual)` and leave the add to the next layer's (or the final) norm, which
computes `residual = hidden_states + residual` before normalising: the residual stream after layer
L (TransformerLens `blocks.{L}.hook_resid_post`) is the *sum* of the two. So the hook adds
`coef * v` to `hidden_states` only: the sum, and with it everything downstream, gains exactly
`coef * v` (adding to both would add it twice; reading one alone reads half the stream). Layers
that return one tensor (GPT-2 style) return the whole stream, which gets `coef * v` directly.
`blocks.{L}.hook_resid_pre` is the stream after layer L - 1; `blocks.{L}.hook_mlp_out` is what
layer L adds last, so adding to it equals adding to the stream after layer L.

Decision positions (`where="generated"`, the built-in sampler's default): the positions whose
next-token distribution is sampled: the last prompt token and every generated token fed back.
vLLM flattens a step's tokens of all requests into one batch; the last token of each request's
segment (`query_start_loc[1:] - 1` of the step's attention metadata) is a decision position as
long as no prompt is split over steps, so the engine runs with chunked prefill off. With
`where="all"` every token is edited (prompt tokens too).

Refused, never run unsteered (`VLLMInterventionError`, naming the setting and the HF-engine fix):
any gate but `always` (they need the sampler's per-step state: a probe pass over the unsteered
next-token distribution, a base model in step, a detector read or the tokens so far), traces,
conditioned directions (per-position, per-cluster or per-role rows), `where="prompt"` (the flat
batch does not say which tokens are prompt tokens), `hook_attn_out` (mid-block) and
`hook_resid_pre` of layer 0 (the embeddings).

What it is not: gates, traces, learned edits other than a plain vector (`LearnedEdit` kind
`vector`), LoRA (the engine's own `BASE+ADAPTER` path), or CUDA graphs (hooks need
`enforce_eager=True`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

WHERE = ("generated", "all")


class VLLMInterventionError(ValueError):
    """An intervention the vLLM engine cannot apply; it is refused, never sampled unsteered."""


HF_FIX = ("Fix: sample it with the HF engine (probe.sampling.sampler.sample_branches, or --engine hf), which "
          "runs every intervention")


@dataclass(frozen=True)
class StreamEdit:
    """Add `deltas[L]` to the residual stream after decoder layer L; see the module docstring."""

    deltas: dict[int, Float[Tensor, " d_model"]]
    """Decoder layer L -> the vector (coefficient included) added to the stream after layer L."""
    where: str = "generated"
    """"generated": decision positions (last prompt token, generated tokens); "all": every token."""
    fraction: float | None = None
    """Share of each prompt's samples that are edited (sample indices 0..round(fraction * n) - 1);
    None: all. The engine samples the edited and the unedited ones as two request groups."""
    source: str = ""
    """What it was made from, for messages (e.g. "steering vector (diff_of_means) coef 4.0")."""
    key: str = field(default="", compare=False)
    """Set by the engine: the name its worker hooks are registered under."""

    def __post_init__(self) -> None:
        if not self.deltas:
            raise ValueError("StreamEdit has no layers. Fix: pass deltas={layer: tensor [d_model]}.")
        if self.where not in WHERE:
            raise VLLMInterventionError(_where_refusal(self.where))
        if self.fraction is not None and not (isinstance(self.fraction, (int, float)) and 0 <= self.fraction <= 1):
            raise ValueError(f"StreamEdit.fraction={self.fraction!r} is outside [0, 1]. Fix: e.g. 0.25, or None for all.")
        deltas = {}
        for layer, v in self.deltas.items():
            v = torch.as_tensor(v).detach().float().cpu()
            if not isinstance(layer, int) or layer < 0 or v.ndim != 1 or not torch.isfinite(v).all():
                raise ValueError(f"StreamEdit layer {layer!r}: expected a layer index >= 0 and a finite [d_model] "
                                 f"vector, got shape {tuple(v.shape)}. Fix: one 1-D vector per layer.")
            deltas[layer] = v
        if len({v.shape[0] for v in deltas.values()}) > 1:
            raise ValueError(f"StreamEdit mixes widths {sorted({v.shape[0] for v in deltas.values()})}. "
                             "Fix: vectors of one model.")
        object.__setattr__(self, "deltas", dict(sorted(deltas.items())))

    def steered_samples(self, n: int) -> int:
        """How many samples of each prompt are edited: round(fraction * n), or n (as `steering.apply`)."""
        return n if self.fraction is None else int(round(self.fraction * n))


def _where_refusal(where: str) -> str:
    return (f"where={where!r} cannot run inside vLLM: allowed {WHERE}. vLLM flattens every request's tokens into "
            "one batch and does not say which are prompt tokens, so 'prompt' (prompt tokens only) has no exact "
            f"form there. {HF_FIX}, or use where='generated' / 'all'.")


def _stream_layer(site: str, layer: int, what: str) -> int:
    """The decoder layer after which the stream edit at `site` (a template with {L}) of `layer` acts."""
    m = re.fullmatch(r"blocks\.\{L\}\.hook_(resid_post|resid_pre|mlp_out|attn_out)", site)
    if m is None or m.group(1) == "attn_out" or (m.group(1) == "resid_pre" and layer == 0):
        raise VLLMInterventionError(
            f"{what} at {site.replace('{L}', str(layer))!r} cannot run inside vLLM: the engine edits the residual "
            "stream between decoder layers (blocks.{L}.hook_resid_post, hook_resid_pre of layers >= 1, "
            f"hook_mlp_out), not mid-block outputs or the embeddings. {HF_FIX}.")
    return layer - 1 if m.group(1) == "resid_pre" else layer


def stream_edit(directions: dict[int, Tensor], site: str, coef: float, *, what: str, gate: str = "always",
                where: str = "generated", fraction: float | None = None, conditioned: str | None = None,
                trace: bool = False) -> StreamEdit:
    """A steering intervention's settings as a `StreamEdit`, or `VLLMInterventionError` with the reason.

    `directions`: layer -> `[d_model]` at `site` (a template such as "blocks.{L}.hook_resid_post");
    `conditioned`: why the directions depend on the token (a conditioning name), None when they do not.
    """
    if gate != "always":
        raise VLLMInterventionError(
            f"{what} with gate={gate!r} cannot run inside vLLM: the engine installs fixed hooks in its worker model "
            "and has no per-step sampler state, so it runs gate='always' only ('entropy' and 'disagree' need a "
            "probe pass over the unsteered next-token distribution, 'base_entropy' a base model in step, 'detector' "
            f"and 'planning' per-row reads). {HF_FIX}.")
    if trace:
        raise VLLMInterventionError(f"{what} with trace=True cannot run inside vLLM (a trace needs a probe pass per "
                                    f"step). {HF_FIX}.")
    if conditioned is not None:
        raise VLLMInterventionError(f"{what} is {conditioned}: its direction depends on each token, which the vLLM "
                                    f"engine's fixed hooks cannot see. {HF_FIX}, or use a global vector.")
    if where not in WHERE:
        raise VLLMInterventionError(_where_refusal(where))
    if not (isinstance(coef, (int, float)) and math.isfinite(coef)):
        raise ValueError(f"coef={coef!r} is not a finite number. Fix: e.g. coef=4.0.")
    deltas: dict[int, Tensor] = {}
    for layer, v in directions.items():
        at = _stream_layer(site, int(layer), what)
        deltas[at] = deltas.get(at, 0) + float(coef) * torch.as_tensor(v).detach().float().cpu()
    return StreamEdit(deltas, where=where, fraction=fraction, source=f"{what} coef {float(coef):g}")


# --- worker side: run in vLLM's worker processes through `LLM.apply_model` -------------------------

_HANDLES: dict[str, list] = {}
"""Hook handles registered in this (worker) process, by `StreamEdit.key`."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a vLLM model: the `nn.ModuleList` with one module per hidden layer
    (`model.model.layers` in most families)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(getattr(cfg, "text_config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and (n is None or len(m) == n)]
    found.sort(key=lambda nm: (not nm[0].endswith("layers"), nm[0].count(".")))
    if not found:
        raise VLLMInterventionError(f"found no decoder-layer list of {n} modules in {type(model).__name__}. "
                                    f"{HF_FIX}.")
    return found[0][1]


def decision_rows(device: torch.device) -> Tensor | None:
    """Rows of this step's flat token batch whose next token is sampled (the last token of each
    request's segment); None in a dummy step without attention metadata (no real tokens)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        raise VLLMInterventionError("a StreamEdit hook ran outside a vLLM forward pass (no forward context), so it "
                                    "cannot find the decision positions. Fix: sample through probe.sampling.vllm_engine.")
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # dual-batch overlap: one dict per micro-batch
        raise VLLMInterventionError("where='generated' cannot find decision positions under vLLM's dual-batch "
                                    "overlap (micro-batches). Fix: leave enable_dbo off, or where='all'.")
    if isinstance(meta, dict):
        meta = next(iter(meta.values()), None)
    if meta is None:
        return None
    qsl = getattr(meta, "query_start_loc", None)
    if qsl is None:
        raise VLLMInterventionError(f"the attention metadata {type(meta).__name__} has no query_start_loc, so the "
                                    f"decision positions are unknown. Use where='all', or {HF_FIX[5:]}.")
    return (qsl[1:] - 1).to(device=device, dtype=torch.long)


def _stream_hook(delta: Tensor, where: str, cache: dict, module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook on a decoder layer: the stream after it (hidden + residual) gains `delta`."""
    fused = isinstance(output, tuple) and len(output) == 2 and output[1] is not None
    hidden = output[0] if fused else output
    if not isinstance(hidden, Tensor) or hidden.ndim != 2:
        raise VLLMInterventionError(f"{type(module).__name__} returned {type(output).__name__} (hidden "
                                    f"{getattr(hidden, 'shape', None)}); the vLLM stream edit expects a [tokens, "
                                    f"d_model] tensor or a (hidden_states, residual) pair. {HF_FIX}.")
    k = (hidden.device, hidden.dtype)
    if k not in cache:
        cache[k] = delta.to(device=hidden.device, dtype=hidden.dtype)
    d = cache[k]  # [d_model]
    if where == "all":
        hidden = hidden + d
    else:
        rows = decision_rows(hidden.device)
        if rows is None:
            return None
        hidden = hidden.index_add(0, rows, d.expand(len(rows), -1))  # out of place: vLLM's norms work in place
    return (hidden, output[1]) if fused else hidden


def install_hooks(edit: StreamEdit, model: nn.Module) -> int:
    """Register `edit`'s hooks on `model` (a vLLM worker's model) under `edit.key`; returns how many."""
    if not edit.key or edit.key in _HANDLES:
        raise VLLMInterventionError(f"StreamEdit key {edit.key!r} is empty or already installed in this worker")
    layers = decoder_layers(model)
    handles = []
    try:
        for layer, delta in edit.deltas.items():
            if layer >= len(layers):
                raise VLLMInterventionError(f"{edit.source or 'the edit'} acts after layer {layer}, but the model has "
                                            f"layers 0..{len(layers) - 1}. Fix: a vector derived from this model.")
            width = getattr(getattr(model, "config", None), "hidden_size", delta.shape[0])
            if delta.shape[0] != width:
                raise VLLMInterventionError(f"{edit.source or 'the edit'} has width {delta.shape[0]}, the model's "
                                            f"hidden_size is {width}. Fix: a vector derived from this model.")
            handles.append(layers[layer].register_forward_hook(partial(_stream_hook, delta, edit.where, {})))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    _HANDLES[edit.key] = handles
    return len(handles)


def remove_hooks(key: str, model: nn.Module) -> int:
    """Remove the hooks registered under `key` in this worker; returns how many were removed."""
    handles = _HANDLES.pop(key, [])
    for h in handles:
        h.remove()
    return len(handles)


def hooks_installed(model: nn.Module) -> int:
    """Hooks this module registered in this worker and not yet removed (0 after every sampling call)."""
    return sum(len(h) for h in _HANDLES.values())

"""The structure of a Hugging Face decoder-only causal LM: where each block, mixer and norm lives.

What it is: `structure_of(model)` finds, for any `*ForCausalLM`, the modules the hook sites of
`probe.models.hooks` attach to: the decoder-layer list, each layer's token mixer (self-attention, or the
linear-attention / state-space mixer of a hybrid layer), its channel mixer (MLP or
mixture-of-experts block, whose combined output is what the layer adds), and the final norm with
its convention. Names give the candidates; one traced forward pass of four tokens (once per model
object, cached) checks them against the data flow:
- the layer list is the `ModuleList` of `num_hidden_layers` modules (of the classes HF records as
  hidden states, when the model declares them); each layer must run once per forward and map one
  [batch, pos, d_model] stream to another;
- a mixer is the one child of the layer whose attribute name (`MIXER_NAMES`) or class name
  (`MIXER_CLASSES`) says so; a norm that takes the mixer's output as its input (the post-norms of
  Gemma 2/3, OLMo 2, GLM 4, ...) is what the layer adds, so the site moves to that norm's output;
- a mixer site is kept only if its output is a term of the block's update: resid_post must be a
  least-squares-exact linear combination of resid_pre and the outputs of the layer's children, with
  a coefficient of the site that is not ~0 (scalars admit residual multipliers: Granite, MiniCPM,
  Gemma 4's layer scalar). A module that adds the residual inside it (BLOOM's and MPT's MLPs), or an
  update that no combination explains (MiniMax's normalised residual), refuses the sub-block sites;
- the final norm is the norm outside the blocks that reads the last block's output; its convention
  (`probe.models.norms`: RMS or layer norm, times `weight`, `1 + weight` or nothing, plus `bias`) is
  identified by running it on a probe input, so `ln_final.hook_normalized` can be recovered
  exactly from its output.
`OVERRIDES` (model_type -> component -> module path) settles what the structure leaves ambiguous;
overridden mixer sites are trusted (only their shape and call count are checked).

Refusals name the missing piece: several candidate mixers, none, a module shared between layers or
run several times per forward (looped depth), a layer whose output is not one residual stream
(hyper-connections, AltUp), an output that is not a term of the update, a final norm of unknown
convention. Each says how to add an override.

What it is not: the site names (`probe.models.hooks`). The traced forward runs the model's own modules
once under `torch.no_grad()`, in eval mode, with the hooks already on them set aside (restored
after), so user and steering hooks never see it; the structure is cached per model object, so
replace modules before the first resolve, not after.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from probe.models.module_trace import ModuleTrace, TraceError, trace_modules
from probe.models.norms import NormConventionError, norm_convention

MIXER_NAMES: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn", "attn", "attention", "self_attention", "multi_head_attention", "self_att",
             "rel_attn", "linear_attn", "mixer", "mamba", "temporal_block", "conv", "mlstm_layer"),
    "mlp": ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe", "mlp_block", "moe", "mlps"),
}
"""Attribute names of a decoder layer's children that are a token mixer ("attn") or a channel mixer
("mlp"). A child matching either table (name or class) is a candidate; exactly one must match."""

MIXER_CLASSES: dict[str, str] = {
    "attn": r"Attention|Attn|Mixer|Mamba|DeltaNet|ShortConv|RecurrentBlock|mLSTM",
    "mlp": r"MLP|Mlp|MoE|Moe|FeedForward|FFN|Experts",
}
"""Class-name patterns of the same (regular expressions, searched)."""

NORM_CLASS = r"Norm"
"""Class-name pattern of normalisation modules (LayerNorm, RMSNorm, LayerNorm1P, ...)."""


class StructureError(ValueError):
    """The structure does not say where a component lives (or says it ambiguously)."""


OVERRIDES: dict[str, dict[str, str | None]] = {
    # the MLP is two Linear children of the layer (fc1, fc2): fc2's output is what the layer adds
    "biogpt": {"mlp": "biogpt.layers.{L}.fc2"},
    "opt": {"mlp": "model.decoder.layers.{L}.fc2"},
    "xglm": {"mlp": "model.layers.{L}.fc2"},
    "trocr": {"attn": "model.decoder.layers.{L}.self_attn", "mlp": "model.decoder.layers.{L}.fc2"},
    # post-LN BERT blocks: the dense projections are the sub-blocks' contributions
    "bert-generation": {"attn": "bert.encoder.layer.{L}.attention.output.dense",
                        "mlp": "bert.encoder.layer.{L}.output.dense"},
    "dbrx": {"attn": "transformer.blocks.{L}.norm_attn_norm.attn"},  # norm, attention, norm in one module
    "falcon_h1": {"attn": "model.layers.{L}.self_attn"},  # attention and a Mamba mixer in parallel
}
"""`config.model_type` -> component ("layers", "attn", "mlp", "final_norm") -> module path (`{L}`
for the layer; "layers" is the `ModuleList`), or None for "this model has none". Add an entry
where `structure_of` refuses or the structure is ambiguous."""


@dataclass
class Site:
    """Where one component of one layer lives: a module path, or why there is none."""

    path: str | None
    reason: str | None = None
    alternative: str | None = None
    """The mixer itself when `path` is its post-norm (the data-flow check may fall back to it)."""


@dataclass
class Structure:
    """The resolved components of one model (paths relative to the `*ForCausalLM`)."""

    model_type: str
    layers: str
    """Path of the decoder-layer `ModuleList`."""
    n_layers: int
    layer: list[Site]
    attn: list[Site]
    mlp: list[Site]
    final_norm: Site
    norm_convention: str | None = None
    """Key of `probe.models.norms.NORM_CONVENTIONS` for the final norm (None when there is none)."""

    def site(self, component: str, layer: int | None) -> Site:
        """The `Site` of "layer" / "attn" / "mlp" at `layer`, or of "final_norm"."""
        return self.final_norm if component == "final_norm" else getattr(self, component)[layer]


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fix_hint(model_type: str, component: str) -> str:
    return (f"Fix: add probe.models.structure.OVERRIDES[{model_type!r}] = {{{component!r}: '<module path, "
            f"{{L}} for the layer>'}} (or None if the model has no such module).")


def structure_of(model: nn.Module) -> Structure:
    """The `Structure` of a HF causal LM (cached per model object; see the module docstring)."""
    if model not in _CACHE:
        _CACHE[model] = _discover(model)
    return _CACHE[model]


def _discover(model: nn.Module) -> Structure:
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    mtype = str(model.config.model_type)
    over = OVERRIDES.get(mtype, {})
    names = {id(m): n for n, m in model.named_modules()}
    paths: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    layers_path = over.get("layers") or _find_layer_list(model, cfg, mtype)
    layers = model.get_submodule(layers_path)
    n = len(layers)
    try:
        trace = trace_modules(model)
    except TraceError as e:
        raise StructureError(str(e)) from e
    struct = Structure(mtype, layers_path, n, [], [], [], Site(None))
    for i, layer in enumerate(layers):
        struct.layer.append(_layer_site(f"{layers_path}.{i}", layer, trace, paths))
        for comp in ("attn", "mlp"):
            if comp in over:
                p = over[comp]
                site = Site(p.replace("{L}", str(i))) if p else Site(None, f"{mtype} has no {comp} module (OVERRIDES)")
                if site.path is not None:
                    site = _override_site(model, site.path, trace, paths, mtype, comp)
            else:
                site = _mixer_site(comp, f"{layers_path}.{i}", layer, trace, paths, mtype)
            getattr(struct, comp).append(site)
        if struct.layer[i].path is not None:
            sites = {c: getattr(struct, c)[i] for c in ("attn", "mlp")}
            _check_update(model, f"{layers_path}.{i}", layer, sites, {c for c in sites if c in over}, trace, mtype)
            struct.attn[i], struct.mlp[i] = sites["attn"], sites["mlp"]
    if "final_norm" in over:
        p = over["final_norm"]
        struct.final_norm = Site(p) if p else Site(None, f"{mtype} has no final norm (OVERRIDES)")
    else:
        struct.final_norm = _final_norm_site(model, layers, trace, names, mtype)
    if struct.final_norm.path is not None:
        try:
            norm = model.get_submodule(struct.final_norm.path)
            seen = trace.calls.get(id(norm)) or [(None, None)]
            width = seen[0][0].shape[-1] if seen[0][0] is not None else None
            struct.norm_convention = norm_convention(norm, width)
        except NormConventionError as e:
            struct.final_norm = Site(None, f"{e} {fix_hint(mtype, 'final_norm')}")
    return struct


def _find_layer_list(model: nn.Module, cfg, mtype: str) -> str:
    rec = (getattr(model.base_model, "_can_record_outputs", None) or getattr(model, "_can_record_outputs", None)
           or {}).get("hidden_states")
    n = getattr(cfg, getattr(rec, "num_hidden_layers_key", None) or "num_hidden_layers", None)
    rec = getattr(rec, "target_class", rec)
    classes = tuple(c for c in (rec if isinstance(rec, (list, tuple)) else [rec]) if isinstance(c, type))
    lists = [(name.count("."), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and len(m) > 0]
    # prefer lists of the classes HF records hidden states from (hybrid stacks mix classes)
    found = [(d, name) for d, name, m in lists if not classes or any(isinstance(x, classes) for x in m)]
    if not found:
        raise StructureError(
            f"no decoder-layer list found in {type(model).__name__} (model_type={mtype!r}): no ModuleList "
            f"of num_hidden_layers={n} modules{' of ' + str([c.__name__ for c in classes]) if classes else ''}. "
            + fix_hint(mtype, "layers").replace("{L} for the layer", "the ModuleList"))
    return min(found)[1]


def _once(module: nn.Module, path: str, trace: ModuleTrace, paths: dict[int, list[str]]) -> str | None:
    """Why a hook on `module` would not be one site of one layer (None if it would)."""
    where = paths.get(id(module), [path])
    if len(where) > 1:
        return f"module {path} is shared by {where}: a hook on it fires at every one of them"
    n = len(trace.calls.get(id(module), []))
    if n != 1:
        return (f"module {path} ran {n} times in one forward pass (looped depth or a skipped block): a hook "
                "on it is not one site")
    return None


def _layer_site(path: str, layer: nn.Module, trace: ModuleTrace, paths) -> Site:
    why = _once(layer, path, trace, paths)
    if why:
        return Site(None, why)
    x, y = trace.calls[id(layer)][0]
    if not (_is_stream(x, trace) and _is_stream(y, trace)):
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        return Site(None, f"layer {path} does not map one [batch, pos, d_model] = {list(trace.stream)} residual stream "
                          f"to another (input {shape(x)}, output {shape(y)}): e.g. hyper-connections or AltUp keep "
                          "several streams, positions come first, or a prompt prefix is prepended")
    return Site(path)


def _is_stream(t: Tensor | None, trace: ModuleTrace) -> bool:
    return t is not None and tuple(t.shape) == trace.stream


def _is_norm(m: nn.Module) -> bool:
    return re.search(NORM_CLASS, type(m).__name__) is not None


def _mixer_site(comp: str, path: str, layer: nn.Module, trace: ModuleTrace, paths, mtype: str) -> Site:
    kids = [(n, m) for n, m in layer.named_children() if not _is_norm(m)]
    cand = [(n, m) for n, m in kids if n in MIXER_NAMES[comp]
            or re.search(MIXER_CLASSES[comp], type(m).__name__) is not None]
    other = "mlp" if comp == "attn" else "attn"
    cls = lambda c, m: re.search(MIXER_CLASSES[c], type(m).__name__) is not None  # noqa: E731
    cand = [(n, m) for n, m in cand if cls(comp, m) or not cls(other, m)]  # the class outranks a generic name
    if len(cand) > 1:  # a child that is named as the other mixer is not this one
        cand = [(n, m) for n, m in cand if n not in MIXER_NAMES[other]] or cand
    what = {"attn": "attention (token-mixing)", "mlp": "MLP / mixture-of-experts"}[comp]
    if not cand:
        return Site(None, f"no {what} module found in {path} (children: {[n for n, _ in layer.named_children()]}). "
                          + fix_hint(mtype, comp))
    if len(cand) > 1:
        return Site(None, f"several {what} candidates in {path}: {[n for n, _ in cand]}; no single module "
                          "outputs what the layer adds. " + fix_hint(mtype, comp))
    name, mod = cand[0]
    why = _once(mod, f"{path}.{name}", trace, paths)
    if why:
        return Site(None, why)
    out = trace.calls[id(mod)][0][1]
    if not _is_stream(out, trace):
        return Site(None, f"{path}.{name} outputs {None if out is None else list(out.shape)}, not one [batch, pos, "
                          f"d_model] = {list(trace.stream)} stream (e.g. tokens flattened): a hook there cannot be "
                          "read or steered per position. " + fix_hint(mtype, comp))
    for n, m in layer.named_children():  # a post-norm takes the mixer's output as its input
        seen = trace.calls.get(id(m), [])
        if _is_norm(m) and len(seen) == 1 and _same(seen[0][0], out):
            return Site(f"{path}.{n}", alternative=f"{path}.{name}")
    return Site(f"{path}.{name}")


def _check_update(model: nn.Module, path: str, layer: nn.Module, sites: dict[str, Site], trusted: set[str],
                  trace: ModuleTrace, mtype: str) -> None:
    """Keep a mixer site only if its output is a term of the block's update: resid_post must be a
    linear combination of resid_pre and the block's sub-module outputs (scalars allow residual
    multipliers) in which the site's coefficient is not ~0. Edits `sites` in place."""
    live = {c: s for c, s in sites.items() if s.path is not None and c not in trusted}
    if not live:
        return
    x, y = trace.calls[id(layer)][0]
    size = x.numel()

    def col(m: nn.Module) -> Tensor | None:  # a module's output as a regressor (token-flattened ones too)
        seen = trace.calls.get(id(m), [])
        t = seen[0][1] if len(seen) == 1 else None
        return t.reshape(trace.stream) if t is not None and t.numel() == size else None

    named = [p for s in sites.values() for p in (s.path, s.alternative) if p]
    named += [f"{path}.{n}" for n, _ in layer.named_children()]
    cols: dict[str, Tensor] = {}
    for p in dict.fromkeys(named):  # the sites first; drop duplicates (dropouts repeat their input)
        t = col(model.get_submodule(p))
        if t is not None and not any(torch.equal(t, u) for u in [x, *cols.values()]):
            cols[p] = t
    for c, s in live.items():
        if s.path in cols and torch.allclose(cols[s.path].float(), y.float()):
            sites[c] = Site(None, f"{s.path} outputs the block's output: the residual is added inside it, so no "
                                  "module outputs only this sub-block's update. " + fix_hint(mtype, c))
    live = {c: s for c, s in sites.items() if s.path is not None and c not in trusted}
    cols = {p: t for p, t in cols.items() if not torch.allclose(t.float(), y.float())}
    keys = list(cols)
    X = torch.stack([x.double().flatten()] + [cols[k].double().flatten() for k in keys], 1)  # [N, 1 + k]
    target = y.double().flatten()
    beta = torch.linalg.lstsq(X, target[:, None], driver="gelsd").solution[:, 0]
    rel = float((X @ beta - target).norm() / (target - x.double().flatten()).norm().clamp_min(1e-30))
    tol = 1e-3 if y.dtype == torch.float32 or y.dtype == torch.float64 else 3e-2
    coef = dict(zip(keys, beta[1:].tolist()))
    for c, s in live.items():
        if s.path not in coef:  # a duplicate of the block's input (or of an earlier site)
            sites[c] = Site(None, f"{s.path} outputs the same as another module of {path}. " + fix_hint(mtype, c))
        elif rel > tol:
            sites[c] = Site(None, f"the update of {path} is not a sum of its sub-blocks' outputs (least-squares "
                                  f"residual {rel:.1e}): a residual added inside a module, or an output transformed "
                                  "before it is added. " + fix_hint(mtype, c))
        elif abs(coef[s.path]) < 1e-2:
            alt = s.alternative
            sites[c] = Site(alt) if alt and abs(coef.get(alt, 0.0)) >= 1e-2 else Site(
                None, f"{s.path}'s output is not a term of {path}'s update (coefficient {coef[s.path]:.1e}). "
                      + fix_hint(mtype, c))


def _override_site(model: nn.Module, path: str, trace: ModuleTrace, paths, mtype: str, comp: str) -> Site:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return Site(None, f"OVERRIDES[{mtype!r}][{comp!r}] names {path}, which this model does not have")
    why = _once(mod, path, trace, paths)
    out = None if why else trace.calls[id(mod)][0][1]
    if not why and not _is_stream(out, trace):
        why = (f"{path} outputs {None if out is None else list(out.shape)}, not one [batch, pos, d_model] = "
               f"{list(trace.stream)} stream (e.g. tokens flattened)")
    return Site(None, why) if why else Site(path)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def _final_norm_site(model: nn.Module, layers: nn.ModuleList, trace: ModuleTrace, names, mtype: str) -> Site:
    """The norm outside the blocks that reads the last block's output (TransformerLens's ln_final)."""
    last = trace.calls.get(id(layers[-1]), [(None, None)])[-1][1]
    inside = {id(m) for m in layers.modules()}
    norms = [m for m in model.modules() if id(m) not in inside and _is_norm(m)
             and any(_same(x, last) for x, _ in trace.calls.get(id(m), []))]
    if len(norms) == 1:
        path = names[id(norms[0])]
        why = _once(norms[0], path, trace, {})
        return Site(None, why) if why else Site(path)
    if not norms and _same(last, trace.head_input):
        return Site(None, "this model has no final norm: the unembedding reads the last block's output")
    return Site(None, f"{'several norms' if norms else 'no norm'} outside the blocks read the last block's output "
                      f"({[names.get(id(m)) for m in norms]}). " + fix_hint(mtype, "final_norm"))

"""Hooked checkpoint pairs: a base model and its RL-trained descendant behind one interface.

What it is: `HookedModel`, a thin wrapper over a TransformerLens `HookedTransformer` or an nnsight
`TransformersModel` that gives logits and named activations (`probe.models.hooks` names) the same way
for both; `load_pair(base, rl)`, which loads two of them and refuses pairs that cannot be compared
token by token (`check_compatible`); and the context-length check every forward pass runs.

No paper is implemented here. What it is not: entropy or forks (see `probe.entropy`, `probe.forks`), or generation. Sampling
uses the Hugging Face model underneath (`HookedModel.hf`, for `probe.sampling.sampler.sample_branches`):
with the TransformerLens backend that is a second copy of the weights, fine for organisms; use
nnsight for large pairs.

Padding: either side works. Position ids are `cumsum(attention_mask) - 1` for Hugging Face
(nnsight) and TransformerLens derives the same offsets from the mask, so a padded row gives the
same logits as the row alone. Values at padded positions are meaningless.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probe.models.backends import TL_ARCHITECTURES, to_hooked_transformer, to_nnsight
from probe.models.budget import ContextLengthError
from probe.models.checkpoint import load_causal_lm, resolve_device
from probe.models.hooks import ResolvedHook, StopForward, hook_module, resolve_hook, site_name
from probe.models.kv_cache import position_ids
from probe.models.norms import normalized

Backend = Literal["transformer_lens", "nnsight"]
BACKENDS: tuple[str, ...] = ("transformer_lens", "nnsight")
RESID_POST = "blocks.{L}.hook_resid_post"


class PairMismatchError(ValueError):
    """Two models that cannot be compared token by token (vocabulary, width, depth, backend)."""


@dataclass
class HookedModel:
    """One hooked model; `backend` says which library runs its forward passes."""

    backend: Backend
    model: Any
    """The `HookedTransformer` or nnsight `TransformersModel`."""
    hf: Any
    """The Hugging Face causal LM (the source of `model`; what the sampler runs)."""
    tokenizer: Any
    name: str = "model"
    """A label for messages (the checkpoint path when loaded from disk)."""

    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return int(self.hf.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        cfg = self.hf.config.get_text_config(decoder=True)
        return int(getattr(cfg, "hidden_size", None) or self.hf.get_input_embeddings().embedding_dim)

    @property
    def d_vocab(self) -> int:
        return int(self.hf.get_output_embeddings().weight.shape[0])

    @property
    def n_ctx(self) -> int:
        """Positions the model accepts: `max_position_embeddings`; unbounded (sys.maxsize) for
        models without one (recurrent / state-space models)."""
        return int(getattr(self.hf.config, "max_position_embeddings", None) or sys.maxsize)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def check_context(self, n_tokens: int) -> None:
        """Raise `ContextLengthError` if `n_tokens` positions do not fit the context window."""
        if n_tokens > self.n_ctx:
            raise ContextLengthError(
                f"trajectories of {n_tokens} tokens are longer than the context of {self.name} "
                f"(n_ctx={self.n_ctx} positions); allowed at most {self.n_ctx}. Fix: shorten the "
                "prompts or max_new_tokens so prompt + completion fits."
            )

    def _prepare(self, tokens: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos]; got shape {tuple(tokens.shape)}")
        self.check_context(tokens.shape[1])
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != tokens {tuple(tokens.shape)}")
        return tokens.to(self.device), attention_mask.to(self.device).long()

    def run_with_sites(
        self,
        tokens: Int[Tensor, "batch pos"],
        sites: Sequence[str] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Float[Tensor, "batch pos d_model"]]]:
        """Logits (float32) and the named activations (`probe.models.hooks` names) in one forward pass."""
        tokens, mask = self._prepare(tokens, attention_mask)
        hooks = sorted((resolve_hook(s, self) for s in dict.fromkeys(sites)), key=lambda h: h.order)
        if self.backend == "transformer_lens":
            if not hooks:
                return self.model(tokens, attention_mask=mask).float(), {}
            names = [h.name for h in hooks]
            logits, cache = self.model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
            return logits.float(), {n: cache[n] for n in names}
        return self._nnsight_forward(tokens, mask, hooks)

    def _position_kwargs(self, mask: Tensor) -> dict[str, Tensor]:
        """{"position_ids": cumsum(mask) - 1} for HF models that take them (recurrent / ALiBi: implicit)."""
        takes = inspect.signature(type(self.hf).forward).parameters
        return {"position_ids": position_ids(mask)} if "position_ids" in takes else {}

    def _as_tl(self, hooks: list[ResolvedHook], saved: dict[str, Tensor]) -> dict[str, Tensor]:
        """HF values of `hooks` as TransformerLens defines them (ln_final: the norm before its affine map)."""
        return {h.name: normalized(self.hf.get_submodule(h.module_path), saved[h.name], h.post.split(":", 1)[1])
                if h.post is not None and h.post.startswith("undo_affine:") else saved[h.name] for h in hooks}

    def _nnsight_forward(self, tokens, mask, hooks: list[ResolvedHook]):
        saved = {}
        with self.model.trace(tokens, attention_mask=mask, **self._position_kwargs(mask)):
            for h in hooks:  # in execution order: nnsight cannot go back in the forward pass
                env = _envoy(self.model, h.module_path)
                value = env.input if h.port == "input" else env.output
                if isinstance(value, (tuple, list)):  # (hidden, extras...): the first element
                    value = value[0]
                saved[h.name] = value.clone().save()  # a copy: layers may add to it in place later
            logits = self.model.output.logits.save()
        return logits.float(), self._as_tl(hooks, saved)

    def activations(
        self,
        tokens: Int[Tensor, "batch pos"],
        sites: Sequence[str],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> dict[str, Float[Tensor, "batch pos d_model"]]:
        """The named activations alone, equal to `run_with_sites`'s: the forward stops after the last
        of them (no later block, no unembedding and no logits), which on a large vocabulary is most
        of the cost and memory of collecting one middle layer."""
        if not sites:
            raise ValueError("no sites; name at least one activation, e.g. blocks.2.hook_resid_post")
        tokens, mask = self._prepare(tokens, attention_mask)
        hooks = sorted((resolve_hook(s, self) for s in dict.fromkeys(sites)), key=lambda h: h.order)
        if self.backend == "transformer_lens":
            names = [h.name for h in hooks]
            last = hooks[-1].layer
            stop = {} if last is None or any(h.layer is None for h in hooks) else {"stop_at_layer": last + 1}
            _, cache = self.model.run_with_cache(tokens, attention_mask=mask, names_filter=names, **stop)
            return {n: cache[n] for n in names}
        return self._hf_activations(tokens, mask, hooks)

    def _hf_activations(self, tokens: Tensor, mask: Tensor, hooks: list[ResolvedHook]) -> dict[str, Tensor]:
        """Plain torch hooks on the HF modules (nnsight's own), stopping the forward after the last site."""
        saved: dict[str, Tensor] = {}
        handles = []

        def keep(h: ResolvedHook, value: Tensor) -> None:
            saved[h.name] = value.clone()  # a copy: layers may add to it in place later
            if len(saved) == len(hooks):
                raise StopForward

        try:
            for h in hooks:
                handles.append(hook_module(self.hf, h, lambda x, h=h: keep(h, x)))
            try:
                self.hf(tokens, attention_mask=mask, use_cache=False, **self._position_kwargs(mask))
            except StopForward:
                pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [h.name for h in hooks if h.name not in saved]
        if missing:
            raise RuntimeError(f"the forward pass of {self.name} never reached {missing}; its modules "
                               f"{[h.module_path for h in hooks]} were not called")
        return self._as_tl(hooks, saved)

    def logits(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None
    ) -> Float[Tensor, "batch pos vocab"]:
        """Next-token logits at every position (float32)."""
        return self.run_with_sites(tokens, (), attention_mask)[0]

    def run_with_resid(
        self,
        tokens: Int[Tensor, "batch pos"],
        layers: Sequence[int],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        site: str = RESID_POST,
    ) -> tuple[Float[Tensor, "batch pos vocab"], dict[int, Float[Tensor, "batch pos d_model"]]]:
        """Logits and the residual stream (`site`, default resid_post) at each of `layers`."""
        names = {layer: site_name(site, layer) for layer in layers}
        logits, acts = self.run_with_sites(tokens, list(names.values()), attention_mask)
        return logits, {layer: acts[n] for layer, n in names.items()}


def _envoy(model, path: str):
    """The nnsight envoy of the submodule at `path` (children by name first: a submodule called
    `output` or `input`, as in BERT blocks, would otherwise be read as the envoy's own property)."""
    env = model
    for part in path.split("."):
        children = dict(env._named_children())
        env = children[part] if part in children else (env[int(part)] if part.isdigit() else getattr(env, part))
    return env


def wrap(hf, tokenizer, backend: str = "auto", device: str | torch.device = "auto", name: str = "model") -> HookedModel:
    """A `HookedModel` around an in-memory HF causal LM. backend "auto": TransformerLens when it
    has a converter for the architecture (`probe.models.backends.TL_ARCHITECTURES`), else nnsight."""
    backend = _pick_backend(backend, [hf])
    dev = resolve_device(device)
    hf = hf.to(dev).eval()
    if backend == "transformer_lens":
        return HookedModel(backend, to_hooked_transformer(hf, tokenizer, device=dev), hf, tokenizer, name)
    return HookedModel("nnsight", to_nnsight(hf, tokenizer), hf, tokenizer, name)


def _arch(hf) -> str:
    return (hf.config.architectures or [type(hf).__name__])[0]


def _pick_backend(backend: str, hfs: list) -> str:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend={backend!r}; allowed 'auto', {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend
    return "transformer_lens" if all(_arch(h) in TL_ARCHITECTURES for h in hfs) else "nnsight"


@dataclass
class Pair:
    """A base model and its RL-trained descendant, checked compatible."""

    base: HookedModel
    rl: HookedModel

    def __iter__(self) -> Iterator[HookedModel]:
        return iter((self.base, self.rl))

    def items(self) -> list[tuple[str, HookedModel]]:
        return [("base", self.base), ("rl", self.rl)]


ModelSpec = str | Path | HookedModel | tuple


def load_pair(base: ModelSpec, rl: ModelSpec, backend: str = "auto", device: str | torch.device = "auto",
              dtype: str | torch.dtype = "float32") -> Pair:
    """Load two hooked models and check they are a comparable pair.

    base, rl: a checkpoint spec (a directory, a `.gguf` file, `BASE+ADAPTER`: `probe.models.checkpoint`), an
    `(hf_model, tokenizer)` tuple, or a `HookedModel`. dtype: precision of models loaded from specs.
    backend: "auto" (TransformerLens if it supports *both* architectures, else nnsight),
    "transformer_lens" or "nnsight". Raises `PairMismatchError` naming every difference.
    """
    loaded = {}
    for role, spec in (("base", base), ("rl", rl)):
        if isinstance(spec, HookedModel):
            loaded[role] = spec
        elif isinstance(spec, tuple):
            loaded[role] = (spec[0], spec[1], f"{role} (in memory)")
        else:
            hf, tok = load_causal_lm(spec, device="cpu", dtype=dtype)
            loaded[role] = (hf, tok, str(spec))
    raw = [v[0] for v in loaded.values() if isinstance(v, tuple)]
    chosen = _pick_backend(backend, raw) if raw else backend
    for role, v in loaded.items():
        if isinstance(v, tuple):
            loaded[role] = wrap(v[0], v[1], chosen, device, v[2])
    pair = Pair(loaded["base"], loaded["rl"])
    check_compatible(pair.base, pair.rl)
    return pair


def check_compatible(a: HookedModel, b: HookedModel) -> None:
    """Raise `PairMismatchError` unless `a` and `b` share tokenizer (token -> id map), vocabulary
    size, d_model, n_layers and backend; the message lists every difference."""
    diffs = []
    for what, va, vb in (
        ("backend", a.backend, b.backend),
        ("d_model", a.d_model, b.d_model),
        ("n_layers", a.n_layers, b.n_layers),
        ("vocabulary size (unembedding rows)", a.d_vocab, b.d_vocab),
        ("eos_token_id", a.tokenizer.eos_token_id, b.tokenizer.eos_token_id),
    ):
        if va != vb:
            diffs.append(f"{what}: {va!r} ({a.name}) vs {vb!r} ({b.name})")
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        bad = sorted(set(va) ^ set(vb) | {t for t in set(va) & set(vb) if va[t] != vb[t]})
        shown = ", ".join(f"{t!r}: {va.get(t)} vs {vb.get(t)}" for t in bad[:5])
        diffs.append(f"tokenizer token->id maps differ on {len(bad)} token(s) ({shown}{' ...' if len(bad) > 5 else ''})")
    if diffs:
        raise PairMismatchError(
            f"{a.name} and {b.name} are not a comparable pair: " + "; ".join(diffs) + ". Fix: pass an RL "
            "checkpoint trained from this base (same architecture and tokenizer), loaded with one backend."
        )

"""A shadow model: a second Hugging Face causal LM fed exactly what the sampler feeds the steered one.

What it is: the machinery behind every intervention that needs the *other* model of the pair on
the same prefix, while `probe.sampling.sampler.sample_branches` drives the steered model: the `disagree` and
`base_entropy` gates of `steering.apply` and cross-model patching (`steering.patching`). Before
each forward pass of the steered model, `Shadow.step` runs the shadow model on the same
`input_ids` / `attention_mask` / `position_ids`, with its own KV cache (`probe.models.kv_cache`, the model family's own class) kept in step with
the sampler's: a new cache at each prefill, expanded from prompts to rows (prompt-major) after it,
and shrunk whenever the sampler drops finished rows (read from `SamplingState.row_ids`). It
captures the shadow's activations at the requested sites and returns its next-token logits.

Outside the sampler (no `SamplingState`), a forward pass that carries no KV cache is shadowed by
one full forward of the shadow model on the same inputs (teacher forcing); one that carries a cache
is refused, since the shadow has no way to know the prefix.

Cost: one forward of the shadow model per forward of the steered one, and a second KV cache. A
shadow built with `logits=False` (cross-model patching reads activations only) stops its forward
after the last requested site: no later block, no unembedding (on a 49k-token vocabulary a fifth of
the forward), and a KV cache for the blocks up to that site only.
What it is not: a generic multi-model runner; both models must share the tokenizer (check with
`probe.models.pair.check_compatible`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from probe.models.hooks import StopForward, hook_module, resolve_hook
from probe.models.kv_cache import (
    CACHE_ARGS,
    cache_arg,
    new_cache,
    position_ids,
    returned_cache,
    select_rows,
    takes_logits_to_keep,
)
from probe.sampling.sampler import SamplingState


class ShadowError(RuntimeError):
    """The shadow model cannot follow the steered model's forward pass."""


def hf_of(model: Any) -> Any:
    """The Hugging Face model under a HF model, a `probe.models.pair.HookedModel` or an nnsight model."""
    for attr in ("hf", "_module"):
        inner = getattr(model, attr, None)
        if inner is not None and hasattr(inner, "config"):
            return inner
    if isinstance(model, torch.nn.Module) and hasattr(getattr(model, "config", None), "model_type"):
        return model
    raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM (or a HookedModel / nnsight "
                    "model around one); the shadow (base) model must be one")


def cache_kw(hf: Any) -> tuple[str, dict[str, Any]]:
    """The name of `hf.forward`'s KV-cache argument and the extra kwargs of a cached step."""
    return cache_arg(hf), {"use_cache": True, **({"logits_to_keep": 1} if takes_logits_to_keep(hf) else {})}


def forward_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None, Tensor | None, Any]:
    """(input_ids, attention_mask, position_ids, cache) of a HF forward call."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise ShadowError("the steered forward pass has no input_ids (inputs_embeds?); the shadow needs token ids")
    cache = next((kwargs[k] for k in CACHE_ARGS if kwargs.get(k) is not None), None)
    return ids, kwargs.get("attention_mask"), kwargs.get("position_ids"), cache


class Shadow:
    """Runs `model` in step with the sampler; `acts[name]` holds its last captured activations.

    logits: False when the caller reads only `acts` (then `step` returns None and the forward
    stops after the last site, where the model's cache allows it)."""

    def __init__(self, model: Any, sites: tuple[str, ...] = (), logits: bool = True):
        self.hf = hf_of(model)
        self.sites = [resolve_hook(s, self.hf) for s in sites]
        self.logits = logits or not self.sites
        self.acts: dict[str, Float[Tensor, "batch seq d_model"]] = {}
        self._cache_kw, self._extra = cache_kw(self.hf)
        self._stopping, self._may_stop = False, False
        self.reset()

    def reset(self) -> None:
        """Forget the cache (the next step must be a prefill)."""
        self.cache, self.keys, self.keys_are_prompts, self.acts = None, None, True, {}

    def register(self) -> list:
        """Capture hooks on the shadow's sites; the caller removes the returned handles."""
        def grab(name: str, x: Tensor) -> None:
            self.acts[name] = x
            if self._stopping and len(self.acts) == len(self.sites):
                raise StopForward

        return [hook_module(self.hf, h, lambda x, name=h.name: grab(name, x)) for h in self.sites]

    def _align(self, state: SamplingState) -> None:
        """Make the shadow cache's batch items the sampler's current ones (`state.row_ids`)."""
        want = state.prompt_index if self.keys_are_prompts else state.row_ids
        sel = torch.searchsorted(self.keys, want)  # keys are ascending (prompt index / row id)
        if (sel >= len(self.keys)).any() or not torch.equal(self.keys[sel.clamp_max(len(self.keys) - 1)], want):
            raise ShadowError(f"shadow cache holds items {self.keys.tolist()[:8]} but the sampler's batch is "
                              f"{want.tolist()[:8]}: out of step. Fix: use one Shadow per sample_branches call.")
        if len(sel) != len(self.keys) or not torch.equal(sel, torch.arange(len(sel), device=sel.device)):
            self.cache = select_rows(self.cache, sel)
        self.keys, self.keys_are_prompts = state.row_ids.clone(), False

    @torch.inference_mode()
    def step(self, state: SamplingState | None, args: tuple, kwargs: dict) -> Float[Tensor, "batch seq vocab"]:
        """Run the shadow on the inputs of the steered forward pass; returns its logits (float32):
        the last position only inside the sampler, every position outside it; None for a shadow
        built with `logits=False`, which stops after its last site (where its cache allows it)."""
        ids, attn, pos, cache = forward_inputs(args, kwargs)
        dev = next(self.hf.parameters()).device
        move = lambda t: None if t is None else t.to(dev)  # noqa: E731
        self.acts = {}
        if state is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ShadowError("the steered forward pass continues a KV cache the shadow has not seen. Fix: "
                                  "shadowed interventions run inside sample_branches, or on full sequences.")
            if pos is None and attn is not None:
                pos = position_ids(attn)
            out = self._forward(not self.logits, input_ids=move(ids), attention_mask=move(attn), position_ids=move(pos), use_cache=False)
            return None if out is None else out.logits.float()
        if state.phase == "prompt":
            if len(torch.unique(state.prompt_index)) != len(state.prompt_index):
                raise ShadowError("the sampler prefills some prompts more than once (row-level `fraction` or modes), "
                                  "which a shadow model cannot follow. Fix: run shadowed interventions (patching, "
                                  "base_entropy / disagree gates) on every sample (fraction=None).")
            self.cache = new_cache(self.hf)
            self.keys, self.keys_are_prompts = state.prompt_index.clone(), True
            self._may_stop = not self.logits and self.cache is not None  # a cache the model makes itself needs the end
        elif self.cache is None:
            raise ShadowError("the sampler is generating but the shadow never saw the prompt. Fix: enter "
                              "the intervention before sample_branches starts (pass it as intervention=).")
        else:
            self._align(state)
        out = self._forward(self._may_stop, input_ids=move(ids), attention_mask=move(attn), position_ids=move(pos),
                            **{self._cache_kw: self.cache}, **self._extra)
        if out is None:  # stopped after the last site; the cache holds the blocks up to it
            return None
        if self.cache is None:  # a model that makes its own cache in the prefill (probe.models.kv_cache.new_cache)
            self.cache = returned_cache(out, self._cache_kw)
        return out.logits[:, -1:].float()

    def _forward(self, stop: bool, **kwargs: Any) -> Any:
        """The shadow's forward, stopped after the last site where `stop` (then None). Only inside it
        do the capture hooks stop a forward: another forward of the same model while they stay
        registered (a probe pass, `HookedModel.activations`) runs to its end."""
        self._stopping = stop
        try:
            return self.hf(**kwargs)
        except StopForward:
            return None
        finally:
            self._stopping = False

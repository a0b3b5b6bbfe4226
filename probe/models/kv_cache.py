"""KV caches and batching of any Hugging Face causal LM: which cache a model uses, selecting its
batch rows, and whether left padding is safe.

What it is: the cache operations `probe.sampling.sampler` needs, for every family's own cache:
- `cache_arg(model)`: the forward's name for the cache (`cache`, `past_key_values`, or a
  family's own: `cache_params`, `state`); `CacheError` if the forward takes none.
- `new_cache(model)`: what `generate` itself would start from: `DynamicCache(config=...)` (which
  builds sliding-window, chunked, indexed, linear-attention / state-space and hybrid layers from
  the config's layer types), or None for the families whose forward makes its own cache on the
  first call (MiniMax, RWKV, xLSTM, ...; read it back with `returned_cache`).
- `select_rows(cache, rows)`: keep, drop or repeat batch rows (`rows` may repeat an index: that is
  how one prefilled prompt becomes its n samples). A cache class that defines its own
  `batch_select_indices` is trusted with it (it knows its extra states); otherwise every layer is
  reordered with `reorder_cache`, the beam-search reorder that each built-in layer implements for
  all the states it holds (keys / values, sliding windows, indexer keys, conv and recurrent
  states). `DynamicCache.batch_select_indices` is not used for those: under transformers 5.24 it
  skips the conv / recurrent states of hybrid layers and fails on pure linear-attention layers.
  A cache none of these apply to raises `CacheError` naming its class.
- `padding_unsafe(model)` / `batch_unsafe(model)`: why left padding (a forward without
  `attention_mask`, or a family in `LEFT_PADDING_UNSAFE`) or batching at all (`BATCH_UNSAFE`)
  would change a row's outputs, or None. The families in those tables are ones whose HF modelling
  code itself gives a padded or batched row other logits than the row alone (found by
  `bench/coverage.py`, which compares with HF `generate` on each prompt alone).
- `takes_logits_to_keep(model)`: whether the forward computes logits at chosen positions only
  (transformers' `logits_to_keep`), looking through a peft wrapper.
- `position_ids(attention_mask)`: `cumsum(mask) - 1`, clamped at 0: each row's real tokens count
  from 0 whichever side it is padded on (padding positions, masked anyway, get 0 on the left and
  the last real position on the right).

What it is not: a cache implementation, or cropping (speculative rollback) of recurrent states.
"""

from __future__ import annotations

import inspect
from typing import Any

from jaxtyping import Int, Shaped
from torch import Tensor
from transformers import Cache, DynamicCache

CACHE_ARGS: tuple[str, ...] = ("cache", "past_key_values", "cache_params", "state")
"""Forward keyword names of a model's cache, in order of preference; the output attribute that
returns it has the same name."""


BATCH_UNSAFE: dict[str, str] = {
    "rwkv": "HF's RWKV gives a row other logits in a batch than alone (its own generate does too)",
}
"""`config.model_type` -> why rows of one forward batch are not independent: the sampler then runs
one row per forward (`SamplerConfig(batch_size=1)`) or refuses."""

LEFT_PADDING_UNSAFE: dict[str, str] = {
    "rwkv": "its forward ignores attention_mask",
    "glm_moe_dsa": "its sparse-attention indexer scores left-padding positions",
    "dots3_note_text": "its sparse-attention indexer scores left-padding positions",
}
"""`config.model_type` -> why a left-padded row's outputs differ from the row alone (HF's own
`generate` differs the same way)."""


def position_ids(attention_mask: Shaped[Tensor, "rows pos"]) -> Int[Tensor, "rows pos"]:
    """Padding-safe position ids: a row's first real token is 0 under left or right padding.

    `attention_mask`: (rows, pos), bool or 0/1 ints. Returns (rows, pos) int64; left padding gets
    0 and right padding the row's last real position (both are masked).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class CacheError(RuntimeError):
    """A model whose cache the sampler cannot create, read back or reorder by batch row."""


def cache_arg(model: Any) -> str:
    """The keyword under which `model.forward` takes (and its output returns) the cache."""
    params = inspect.signature(type(model).forward).parameters
    for name in CACHE_ARGS:
        if name in params:
            return name
    raise CacheError(
        f"{type(model).__name__}.forward takes no cache (none of {list(CACHE_ARGS)}): the sampler decodes "
        "with a KV cache. Fix: sample this model with transformers' generate, or add the name its forward uses "
        "to probe.models.kv_cache.CACHE_ARGS.")


def takes_logits_to_keep(model: Any) -> bool:
    """Whether `model.forward` (a peft model's base model's) takes `logits_to_keep`: an int (the last n
    positions) or an index tensor, so the unembedding runs on those positions alone."""
    inner = getattr(model, "get_base_model", lambda: model)()
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def padding_unsafe(model: Any) -> str | None:
    """Why left padding would change a row's outputs in `model`, or None when it is safe."""
    if "attention_mask" not in inspect.signature(type(model).forward).parameters:
        return "its forward takes no attention_mask"
    return LEFT_PADDING_UNSAFE.get(str(getattr(getattr(model, "config", None), "model_type", "")))


def batch_unsafe(model: Any) -> str | None:
    """Why the rows of one forward batch of `model` are not independent, or None."""
    return BATCH_UNSAFE.get(str(getattr(getattr(model, "config", None), "model_type", "")))


def new_cache(model: Any) -> Cache | None:
    """A fresh cache as `generate` makes it, or None where the model makes its own in the prefill
    (HF classes whose `_supports_default_dynamic_cache()` is False)."""
    default = getattr(type(model), "_supports_default_dynamic_cache", None)
    if default is not None and not default():
        return None
    cfg = model.config
    return DynamicCache(config=cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg)


def returned_cache(output: Any, name: str) -> Any:
    """The cache a forward returned under `name` (see `CACHE_ARGS`); raises if there is none."""
    cache = getattr(output, name, None)
    if cache is None:
        raise CacheError(f"the model's forward returned no cache under {name!r} with use_cache=True, so the "
                         "sampler cannot decode incrementally. Fix: check config.use_cache and the model class.")
    return cache


def select_rows(cache: Any, rows: Int[Tensor, " new_batch"]) -> Any:
    """`cache` with batch rows `rows` (keep, drop, reorder or repeat); in place where the cache
    allows it. Returns the cache to use from now on."""
    if isinstance(cache, Cache):
        if type(cache).batch_select_indices is not Cache.batch_select_indices:
            cache.batch_select_indices(rows)  # the class knows its own extra states (e.g. MiniMax)
            return cache
        for i, layer in enumerate(cache.layers):
            if not hasattr(layer, "reorder_cache"):
                raise CacheError(f"cache layer {i} ({type(layer).__name__}) of a {type(cache).__name__} has no "
                                 "reorder_cache, so its batch rows cannot be selected. Fix: sample with "
                                 "SamplerConfig(n=1) and one prompt per batch, or give the layer a reorder_cache.")
            layer.reorder_cache(rows)
        return cache
    if isinstance(cache, (list, tuple)) and cache and all(isinstance(t, Tensor) for t in cache):
        return type(cache)(t.index_select(0, rows.to(t.device)) for t in cache)  # per-layer state tensors
    for method in ("batch_select_indices", "reorder_cache"):
        if callable(getattr(cache, method, None)):
            getattr(cache, method)(rows)
            return cache
    raise CacheError(f"cannot select batch rows of a {type(cache).__name__} (no batch_select_indices or "
                     "reorder_cache): the sampler shares one prefill among a prompt's samples and drops finished "
                     "rows. Fix: give the cache class a reorder_cache(rows) that index_selects its states.")

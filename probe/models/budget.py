"""What fits: a model's context window and a memory budget for batches and kept activations.

What it is: arithmetic on a model's config, so that long generations (thousands of tokens) on real
checkpoints neither overflow the context nor the device:

- `context_length(model)` and `check_context(...)`: a prompt plus the completion budget must fit
  the positions the model was built for (`max_position_embeddings` and its aliases); the check runs
  before any sampling and names the prompt, the numbers and the fix (`ContextLengthError`).
- `memory_budget()`: bytes a batch may use: `FORKSIGHT_MEMORY_GB` if set, else 60% of the free
  CUDA memory, or 25% of the available RAM on the CPU.
- `sampling_rows(...)` / `forward_rows(...)` / `activation_rows(...)`: how many rows of a sampling
  batch (KV cache of prompt + completion, one step of logits), of a teacher-forced batch (logits of
  every position, several float32 copies) or of a forward pass stopped at one block (no logits) fit
  the budget. Callers take the minimum of that and their configured batch
  size, so small models (the organisms) never see a difference.
- `length_chunks(...)`: a right-padded teacher-forced batch in row chunks of similar length, each
  cut to its longest row (budgeted per chunk by one of the above).
- `keep_fraction(...)`: the share of positions whose activations can be kept within a byte budget,
  for callers that subsample (the fork detector's data, SAE training activations).

Estimates are deliberately rough (upper bounds from shapes, no allocator model); they only need to
keep a batch within a factor of the budget. What it is not: a profiler.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor


class ContextLengthError(ValueError):
    """Positions that do not fit the model's context window."""


def _config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def context_length(model: Any) -> int:
    """Positions the model accepts (`max_position_embeddings`, `n_positions`, `max_seq_len`,
    `seq_length`); sys.maxsize when the config states none (e.g. recurrent models)."""
    return _attr(_config(model), "max_position_embeddings", "n_positions", "max_seq_len", "seq_length") or sys.maxsize


def check_context(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
                  max_new_tokens: int) -> None:
    """Raise `ContextLengthError` unless every prompt plus `max_new_tokens` fits the model's context."""
    n_ctx = context_length(model)
    if n_ctx == sys.maxsize or not prompts:
        return
    ids = tokenizer(list(prompts)).input_ids if isinstance(prompts[0], str) else prompts
    lengths = [len(x) for x in ids]
    i = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[i] + max_new_tokens > n_ctx:
        shown = prompts[i][:60] if isinstance(prompts[i], str) else f"{lengths[i]} token ids"
        raise ContextLengthError(
            f"prompt {i} ({shown!r}, {lengths[i]} tokens) plus max_new_tokens={max_new_tokens} is "
            f"{lengths[i] + max_new_tokens} positions, longer than the model's context of {n_ctx}; allowed at most "
            f"{n_ctx}. Fix: lower max_new_tokens to <= {n_ctx - lengths[i]} (for a math task: "
            f"--task math:FILE,max_new_tokens={max(1, n_ctx - lengths[i])}) or shorten the prompts")


def memory_budget(device: torch.device | str | None = None) -> int:
    """Bytes one batch may use on `device` (see the module docstring)."""
    env = os.environ.get("FORKSIGHT_MEMORY_GB")
    if env:
        return int(float(env) * 2**30)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.6 * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * 2**30
    return int(0.25 * avail)


def _attr(cfg: Any, *names: str) -> int:
    """The first of `names` the config states as a positive int; 0 if none (some configs raise on
    attributes that vary per layer: those count as unstated)."""
    for name in names:
        try:
            value = getattr(cfg, name, None)
        except Exception:  # noqa: BLE001  e.g. transformers' AmbiguousGlobalPerLayerAttributeError
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _shape(model: Any) -> tuple[int, int, int, int, int]:
    """(layers, kv heads, head dim, hidden size, vocab) from the config, with safe fallbacks."""
    cfg = _config(model)
    hidden = _attr(cfg, "hidden_size", "n_embd", "d_model") or 1024
    layers = _attr(cfg, "num_hidden_layers", "n_layer") or 32
    heads = _attr(cfg, "num_attention_heads", "n_head") or 1
    kv = _attr(cfg, "num_key_value_heads") or heads
    head_dim = _attr(cfg, "head_dim") or max(1, hidden // heads)
    vocab = _attr(cfg, "vocab_size") or model.get_input_embeddings().num_embeddings
    return layers, kv, head_dim, hidden, vocab


def _dtype_bytes(model: Any) -> int:
    try:
        return next(model.parameters()).element_size()
    except (StopIteration, AttributeError):
        return 4


def sampling_rows(model: Any, seq_len: int, budget: int | None = None, extra_models: Sequence[Any] = ()) -> int:
    """Rows of a sampling batch that fit `budget` bytes: KV cache over `seq_len` positions plus one
    step of float32 logits (with the sampler's working copies) per row, for `model` and for each of
    `extra_models` that an intervention runs in step with it (a shadow model keeps its own KV cache);
    at least 1."""
    per_row = 0
    for m in (model, *extra_models):
        layers, kv, head_dim, hidden, vocab = _shape(m)
        per_row += 2 * layers * kv * head_dim * seq_len * _dtype_bytes(m) + 32 * vocab + 8 * hidden
    budget = memory_budget(_device(model)) if budget is None else budget
    return max(1, budget // per_row)


def forward_rows(model: Any, seq_len: int, budget: int | None = None, models: int = 1) -> int:
    """Rows of a teacher-forced batch over `seq_len` positions that fit `budget` bytes: float32
    logits of every position for `models` models, with ~6 working copies (log-softmax, probabilities,
    KL terms), plus the residual stream; at least 1 (unbounded for a stand-in without a config)."""
    if _config(model) is None:
        return sys.maxsize
    layers, _, _, hidden, vocab = _shape(model)
    per_row = models * seq_len * (24 * vocab + 4 * hidden * (layers + 1))
    budget = memory_budget(_device(model)) if budget is None else budget
    return max(1, budget // per_row)


def activation_rows(model: Any, seq_len: int, budget: int | None = None, n_sites: int = 1) -> int:
    """Rows of a forward pass that stops at one block (`HookedModel.activations`) that fit `budget`
    bytes: per position the block's float32 working set (residual copies, MLP activations), one
    head's row of attention scores at a time per head and a copy of each of `n_sites` kept
    activations; no logits. At least 1 (unbounded for a stand-in without a config)."""
    cfg = _config(model)
    if cfg is None:
        return sys.maxsize
    _, _, _, hidden, _ = _shape(model)
    inner = _attr(cfg, "intermediate_size", "n_inner") or 4 * hidden
    heads = _attr(cfg, "num_attention_heads", "n_head") or 1
    per_row = seq_len * 4 * ((8 + 2 * n_sites) * hidden + 3 * inner + 2 * heads * seq_len)
    budget = memory_budget(_device(model)) if budget is None else budget
    return max(1, budget // per_row)


def length_chunks(attention_mask: Int[Tensor, "rows pos"], rows_for: Callable[[int], int]) -> list[tuple[Tensor, int]]:
    """Row chunks `(rows, length)` of a right-padded teacher-forced batch: rows ordered by length
    (longest first, ties in row order), each chunk cut to its longest row and holding
    `rows_for(length)` rows (e.g. `lambda n: forward_rows(model, n)`), so rows that end early do not
    pay for another row's padding. Exact for causal models: a position after a row's last real
    token never changes an earlier one. rows: indices into the batch."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    lengths = ((attention_mask > 0) * (pos + 1)).amax(1)  # last real position + 1 per row
    order = torch.argsort(lengths, descending=True, stable=True)
    out, i = [], 0
    while i < len(order):
        length = max(1, int(lengths[order[i]]))
        step = max(1, int(rows_for(length)))
        out.append((order[i:i + step], length))
        i += step
    return out


def keep_fraction(n_positions: int, bytes_per_position: int, budget_bytes: int) -> float:
    """The share of `n_positions` whose activations (`bytes_per_position` each) fit `budget_bytes`."""
    if n_positions <= 0:
        return 1.0
    return min(1.0, budget_bytes / (n_positions * max(1, bytes_per_position)))


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")

"""One traced forward pass of a Hugging Face causal LM: every submodule's (first input, first output).

What it is: `trace_modules(model)` runs 4 tokens through the model once, under `torch.no_grad()`
in eval mode, with read-only hooks on every submodule and on the unembedding's input; the model's
own hooks (a user's, a steering's) are set aside for that forward and restored after, so they never
see it. `probe.models.structure` reads the data flow off it to find where each block, mixer and norm lives.

What it is not: activation caching for analysis (see `probe.models.pair`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class TraceError(ValueError):
    """The traced forward pass failed."""


@dataclass
class ModuleTrace:
    """What the traced forward saw: per module id, its calls' (first input, first output)."""

    calls: dict[int, list[tuple[Any, Any]]]
    head_input: Tensor | None
    stream: tuple[int, int, int]
    """(batch, pos, d_model) of the traced input: the shape of one residual stream."""


def first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return getattr(x, "last_hidden_state", None) if not isinstance(x, (tuple, list)) else None


def trace_modules(model: nn.Module) -> ModuleTrace:
    """One forward of 4 tokens with read-only hooks on every submodule and the unembedding's input."""
    watch = [m for m in model.modules() if m is not model]
    calls: dict[int, list] = {}
    head: dict[str, Tensor] = {}

    def grab_head(mod, args, kwargs):
        if "x" not in head:
            head["x"] = args[0] if args else next(iter(kwargs.values()))

    def record(mod, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        y = first_tensor(out)  # copies: some layers add to a module's output in place afterwards
        calls.setdefault(id(mod), []).append((x.detach().clone() if isinstance(x, Tensor) else None,
                                              y.detach().clone() if isinstance(y, Tensor) else None))

    hidden = {m: (m._forward_hooks, m._forward_pre_hooks) for m in model.modules()}
    for m in hidden:  # the model's own hooks (a user's, a steering) do not see this forward
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    handles = [m.register_forward_hook(record, with_kwargs=True) for m in dict.fromkeys(watch)]
    unembed = model.get_output_embeddings()
    if unembed is not None:
        handles.append(unembed.register_forward_pre_hook(grab_head, with_kwargs=True))
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % vocab
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception as e:
        raise TraceError(f"tracing the structure of {type(model).__name__} needs one forward pass of 4 "
                             f"tokens, which failed: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for m, (post, pre) in hidden.items():
            m._forward_hooks, m._forward_pre_hooks = post, pre
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    d_model = getattr(cfg, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    return ModuleTrace(calls, head.get("x"), (*ids.shape, int(d_model)))

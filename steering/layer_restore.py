"""Layer restoration: the RL model with some decoder blocks' weights replaced by the base model's.

What it is: the weight-level twin of the patching curve (`steering.patching`; arXiv:2602.06665
restores layers the same way). `restore_layers(rl, base, layers)` is a context manager that copies
the parameters and buffers of decoder blocks `layers` of the base model into the RL model, in
place, and copies the RL model's own tensors back in `finally` (also when the body raises), so
the RL model is bit-identical to what it was afterwards. Sweeping L over single blocks shows which
block's weights carry the collapse; the body is anything that runs the RL model, e.g.
`probe.sampling.sampler.sample_branches` (still one forward per token, no hooks):

    for L in range(rl.config.num_hidden_layers):
        with restore_layers(rl, base, [L]):
            branches = sample_branches(rl, tok, prompts, SamplerConfig(n=64))

Blocks are found from the model's structure: `probe.models.hooks.resolve_hook("blocks.{L}.hook_resid_post")`
gives the block module's path, so every architecture the hook table supports works, with no
`if arch == ...`. Only the blocks change: embeddings, final norm and head stay the RL model's, so
restoring every block equals the base model only where those are equal too.

What it is not: an RL-alone intervention. It needs the base model's weights, so, like patching,
it is a diagnostic and a localiser, not a deliverable. It is not thread-safe (the RL model is
modified in place: nothing else may run it during the body) and it does not support autograd
through the swap (copies run under `torch.no_grad`).

Departures: none in substance. The paper restores whole layers of a fine-tuned model to its base;
here a "layer" is exactly one decoder block (attention, MLP and their norms), nothing outside it.

Cost: the RL tensors of the restored blocks are cloned once (on their device) to be put back, so
restoring k blocks holds k blocks' worth of extra memory during the body. The base model may live
on another device (e.g. the CPU); dtypes must match, so the restored block is the base's exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from probe.models.hooks import resolve_hook
from steering.shadow import hf_of


def block_path(model: Any, layer: int) -> str:
    """Module path of decoder block `layer` in the HF model under `model` (e.g. "model.layers.3")."""
    return resolve_hook(f"blocks.{int(layer)}.hook_resid_post", hf_of(model)).module_path


def _tensors(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a block, by name (shared tensors once)."""
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


def _check(rl: Any, base: Any, layers: list[int]) -> list[tuple[dict, dict]]:
    n_rl, n_base = int(rl.config.num_hidden_layers), int(base.config.num_hidden_layers)
    bad = [x for x in layers if not (0 <= x < n_rl and x < n_base)]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the RL model has {n_rl} blocks and the base model "
                         f"{n_base}. Fix: pass block indices in 0..{min(n_rl, n_base) - 1}.")
    pairs = []
    for x in layers:
        t_rl = _tensors(rl.get_submodule(block_path(rl, x)))
        t_base = _tensors(base.get_submodule(block_path(base, x)))
        if t_rl.keys() != t_base.keys():
            raise ValueError(f"block {x} has different tensors in the RL model ({sorted(t_rl.keys() - t_base.keys())} "
                             f"only) and the base model ({sorted(t_base.keys() - t_rl.keys())} only). Fix: restore "
                             "an RL checkpoint from the base it was trained from (same architecture).")
        for name, a in t_rl.items():
            b = t_base[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"block {x} tensor {name!r}: the RL model's is {tuple(a.shape)} {a.dtype}, the base "
                                 f"model's {tuple(b.shape)} {b.dtype}. Fix: restore an RL checkpoint from the base it "
                                 "was trained from, both loaded in the same dtype.")
        pairs.append((t_rl, t_base))
    return pairs


@contextmanager
def restore_layers(rl_model: Any, base_model: Any, layers: int | Sequence[int]) -> Iterator[Any]:
    """Inside the `with`, decoder blocks `layers` of `rl_model` hold `base_model`'s weights.

    `rl_model` / `base_model`: HF causal LMs (or a `probe.models.pair.HookedModel` / nnsight model around
    one; the HF model is the one modified) of the same architecture. `layers`: a block index or
    indices (duplicates ignored; empty: nothing changes). Yields the HF RL model. Raises ValueError
    (before touching anything) for a layer out of range or blocks whose tensors differ in name,
    shape or dtype. A diagnostic that needs the base's weights: see the module docstring.
    """
    rl, base = hf_of(rl_model), hf_of(base_model)
    layers = sorted({int(layers)} if isinstance(layers, int) else {int(x) for x in layers})
    pairs = _check(rl, base, layers)
    saved = [{k: t.detach().clone() for k, t in t_rl.items()} for t_rl, _ in pairs]  # the RL weights
    try:
        with torch.no_grad():
            for t_rl, t_base in pairs:
                for k, t in t_rl.items():
                    t.copy_(t_base[k])
        yield rl
    finally:
        with torch.no_grad():
            for (t_rl, _), keep in zip(pairs, saved):
                for k, t in t_rl.items():
                    t.copy_(keep[k])

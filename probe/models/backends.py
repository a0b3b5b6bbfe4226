"""Hooked views of a Hugging Face causal LM: TransformerLens and nnsight, offline.

What it is: the two loaders that turn a local checkpoint directory (or an in-memory HF model) into
a hooked model. What it is not: the hook-site name table (`probe.models.hooks`), pair loading or
compatibility checks (`probe.models.pair`).

- TransformerLens 3.9 refuses local paths in `from_pretrained*`. We assemble instead
  (docs/architecture.md, "Library traps"): `get_pretrained_model_config(name, hf_cfg=...)`,
  `get_pretrained_state_dict(name, cfg, hf_model)`, `HookedTransformer(cfg, tokenizer)`,
  `load_and_process_state_dict(..., fold_ln=False, ...)`: no weight processing, so activations and
  logits match the HF model (to ~1e-6). TL reads the config from a local directory: we write it
  to a temporary directory with a neutral name, because TL takes a name-based branch (and fails)
  for paths containing "llama" or "gemma".
- nnsight: `TransformersModel(path, tokenizer=..., dispatch=True)`.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from probe.models.checkpoint import load_causal_lm, resolve_device

# HF architectures whose TransformerLens weight converter was checked to reproduce HF logits.
TL_ARCHITECTURES: tuple[str, ...] = ("Qwen2ForCausalLM", "LlamaForCausalLM", "GPT2LMHeadModel")


def to_hooked_transformer(hf_model, tokenizer, device: str | torch.device = "auto"):
    """Convert an in-memory HF causal LM to a `HookedTransformer` with identical outputs."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    arch = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    if arch not in TL_ARCHITECTURES:
        raise ValueError(
            f"TransformerLens backend has no converter for {arch!r}; supported: "
            f"{sorted(TL_ARCHITECTURES)}. Use the nnsight backend for other architectures."
        )
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        # TL reads the config from a local directory; a neutral name avoids its name-based
        # branches (paths containing "llama"/"gemma" skip the config and fail).
        local = Path(tmp) / "model"
        config = copy.deepcopy(hf_model.config)
        config.architectures = [arch]  # unset on models built in memory (from_config)
        config.save_pretrained(str(local))
        cfg = get_pretrained_model_config(
            str(local), hf_cfg=config.to_dict(), fold_ln=False, device=str(dev), dtype=hf_model.dtype
        )
        state = get_pretrained_state_dict(str(local), cfg, hf_model)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.to(dev).eval()


def load_hooked_transformer(path: str | Path, device: str | torch.device = "auto"):
    """A `HookedTransformer` for the checkpoint directory `path` (converted offline)."""
    hf, tok = load_causal_lm(path, device="cpu")
    return to_hooked_transformer(hf, tok, device=device)


def load_nnsight(path: str | Path, device: str | torch.device = "auto"):
    """An nnsight `TransformersModel` for the checkpoint directory `path`."""
    hf, tok = load_causal_lm(path, device=device)
    return to_nnsight(hf, tok)


def to_nnsight(hf_model, tokenizer):
    """Wrap an in-memory HF causal LM (already on its device) in an nnsight `TransformersModel`."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(hf_model, tokenizer=tokenizer)

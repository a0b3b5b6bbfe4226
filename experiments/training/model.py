"""The model organism: a tiny `Qwen2ForCausalLM` (Countdown or word problems), sized by one knob.

It is a real Hugging Face architecture (rotary positions, RMSNorm, SwiGLU, grouped-query
attention), so the organism goes through exactly the code paths a real checkpoint does:
`transformers`, nnsight and TransformerLens all load it offline from its directory.

`depth` derives the rest (nanochat-style): `depth` layers, width 32 * depth, head dim 32,
`depth` query heads, `max(1, depth // 2)` key/value heads, MLP 4x width, tied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from experiments.training.tokenizer import build_tokenizer

HEAD_DIM = 32


@dataclass(frozen=True)
class OrganismConfig:
    """The organism's size. Everything else is derived from `depth`."""

    depth: int = 4
    """Number of transformer blocks; width is 32 * depth."""
    max_positions: int = 64
    """Context length (rotary positions); a Countdown sequence is ~20 tokens, a word problem ~170."""

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 32:
            raise ValueError(f"depth={self.depth} must be in 1..32")
        if self.max_positions < 16:
            raise ValueError(f"max_positions={self.max_positions} is too short for a Countdown sequence")

    def hf_config(self, vocab_size: int, bos: int | None, eos: int, pad: int) -> Qwen2Config:
        width = HEAD_DIM * self.depth
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=self.depth,
            num_attention_heads=self.depth,
            num_key_value_heads=max(1, self.depth // 2),
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            use_sliding_window=False,
            attention_dropout=0.0,
        )


def build_organism(config: OrganismConfig, seed: int = 0, tokenizer=None):
    """A freshly initialised organism and its tokenizer: `(Qwen2ForCausalLM, tokenizer)`
    (default: the Countdown tokenizer; pass `build_text_tokenizer(...)` for text tasks)."""
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    hf = config.hf_config(len(tok), None, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(hf).eval(), tok


def save_checkpoint(model, tokenizer, path: str | Path) -> None:
    """Save model (safetensors) + tokenizer into `path` (the caller makes it atomic)."""
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


"""The sampler's plain data: its config, its output batch and the state an intervention reads.

`SamplerConfig` (validated on construction), `Branches` (the samples, rows prompt-major) and
`SamplingState` (updated in place by `probe.sampling.sampler.sample_branches` before every forward pass).
Kept apart from the sampler so that learners, metrics and interventions depend on the data, not on
the decoding loop; `probe.sampling.sampler` re-exports all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class SamplerConfig:
    """How to sample; every field is validated on construction."""

    n: int = 1
    """Samples per prompt (>= 1)."""
    max_new_tokens: int = 32
    """Tokens generated per row at most (>= 1); `Branches.tokens` has this many columns."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 means greedy argmax."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 turns it off."""
    top_k: int = 0
    """Keep the k most likely tokens (>= 0); 0 turns it off."""
    seed: int = 0
    """Seed of the counter-based RNG (0 <= seed < 2**63)."""
    batch_size: int = 512
    """Rows (prompt x sample) per forward pass (>= 1)."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), or a torch device string; the model must be there."""

    def __post_init__(self):
        def check(name, ok, allowed, fix):
            if not ok:
                raise ValueError(f"SamplerConfig.{name}={getattr(self, name)!r} is invalid: "
                                 f"allowed {allowed}. Fix: {fix}.")
        int_ = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        check("n", int_(self.n) and self.n >= 1, "an int >= 1", "ask for at least one sample")
        check("max_new_tokens", int_(self.max_new_tokens) and self.max_new_tokens >= 1,
              "an int >= 1", "generate at least one token")
        check("temperature", num(self.temperature) and 0 <= self.temperature < float("inf"),
              "a finite float >= 0 (0 = greedy)", "use 0 for greedy, 1 for the model's distribution")
        check("top_p", num(self.top_p) and 0 < self.top_p <= 1, "a float in (0, 1]",
              "use 1.0 to turn top-p off")
        check("top_k", int_(self.top_k) and self.top_k >= 0, "an int >= 0", "use 0 to turn top-k off")
        check("seed", int_(self.seed) and 0 <= self.seed < 2**63, "an int in [0, 2**63)",
              "pass a non-negative int seed")
        check("batch_size", int_(self.batch_size) and self.batch_size >= 1, "an int >= 1",
              "use e.g. 512 rows per forward pass")
        check("device", isinstance(self.device, str) and bool(self.device),
              '"auto" or a torch device string such as "cpu" or "cuda:0"', 'use "auto"')


@dataclass
class Branches:
    """Samples as a plain batch, rows prompt-major (row = i * n + j), on the sampler's device."""

    prompt_index: Int[Tensor, " rows"]
    sample_index: Int[Tensor, " rows"]
    tokens: Int[Tensor, "rows new"]
    """Generated ids; `pad_token_id` after the row finished. `new == cfg.max_new_tokens`."""
    mask: Bool[Tensor, "rows new"]
    """True on real generated tokens (the eos token included)."""
    logprobs: Float[Tensor, "rows new"]
    """Log-prob of the token under the sampling distribution; 0 where masked."""
    entropy: Float[Tensor, "rows new"]
    """Entropy (nats) of the sampling distribution at that step; 0 where masked."""
    finish_reason: list[str]
    """"eos" or "length" per row."""
    prompt_tokens: list[list[int]]
    """The prompts as token ids (unpadded), one per prompt (not per row)."""


@dataclass
class SamplingState:
    """What an intervention can read; updated by the sampler before every forward pass.

    The forward batch holds `batch` items: rows while generating; during the prompt phase one item
    per prefill of the current row batch (a prompt, or a prompt and a prefill group when the
    intervention defines `prefill_groups`), shared by the samples it continues.
    """

    step: int = -1
    """-1 during the prefill (the forward reads the prompt); else t: the forward reads generated
    token t (its activations are token t's) and yields the logits of token t + 1."""
    phase: str = "prompt"
    """"prompt" (prefill) or "generate"."""
    row_ids: Int[Tensor, " batch"] = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    """Global row id (i * n + j) of each batch item; -1 in the prompt phase (item = a prompt)."""
    prompt_index: Int[Tensor, " batch"] = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    """Prompt index of each batch item (valid in both phases)."""
    sample_index: Int[Tensor, " batch"] = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    """Sample index j of each row (row = i * n + j); in the prompt phase the smallest j of the prefill's
    samples in this batch (every sample of a prefill shares its prefill group)."""
    active: Bool[Tensor, " batch"] = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))
    """True for items still generating (always True in the prompt phase)."""
    tokens: Int[Tensor, "batch step"] = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.long))
    """Tokens generated so far by each item, the one being read included (`step + 1` columns)."""
    position_ids: Int[Tensor, "batch seq"] = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.long))
    """Position ids of the tokens this forward consumes (left padding: pads sit at 0)."""

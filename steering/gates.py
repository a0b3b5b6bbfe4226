"""Gates: at which tokens a steering intervention acts. Pure decision functions plus their contract.

Vocabulary. Inside `probe.sampling.sampler.sample_branches`, a *decision position* is one whose next-token
distribution gets sampled: the last prompt token (it yields generated token 0) and generated
token t at step t (it yields token t + 1). Steering the residual at a decision position changes
that distribution (and, through the KV cache, later ones). A gate says, per row and decision
position, whether to steer; it never sees the token that will be sampled there.

- `always`: every decision position.
- `entropy`: the steered model's own next-token entropy at this position exceeds `threshold`
  (nats, temperature 1, full vocabulary, docs/architecture.md's token entropy). *Which distribution*: the one
  the model would produce here if this position were not steered, given the actual (steered)
  prefix in the KV cache. It is computed by a probe pass: the same forward run once without the
  edit, its KV-cache entries cropped off again, then the real (edited) forward. Exact, at 2x the
  forward cost. Rejected alternatives: the previous step's entropy (decides on the wrong token,
  lags forks by one), the post-steering entropy (circular: the decision changes it).
- `base_entropy`: the base model's next-token entropy on the same prefix exceeds `threshold`
  (the base's forks, online). Needs `base=`: one base forward per step, no probe pass.
- `disagree`: KL(base || steered model unsteered here) of the two next-token distributions exceeds
  `threshold` nats (KL(base || RL) is large where the base had mass the RL model dropped: lost
  branches). Cost: a base forward (with its own KV cache) plus a probe pass: 3x forwards, 2 caches.
- `detector`: a `probe.detector.ForkDetector` reading the residual at its own site (default
  `blocks.{L}.hook_resid_post`, L = its best layer) says P(base fork) > `threshold` (default 0.5).
  Read in the same forward when its site runs no later than the first steered site (free);
  otherwise read in a probe pass (2x).
- `planning`: a user predicate over the tokens generated so far says the *next* token is a planning
  token. The role of the next token is unknown at decision time (it is not sampled yet), so the
  predicate must guess it from the prefix. `after_tokens(ids)` is the usual rule: steer when the
  last token is a boundary after which a choice follows (and at the first decision, before any
  token). For Countdown (`3,5,12|24:` then `5-3=2;12*2=24`), boundaries are the operators and
  `;` (and `:`, the prompt's end): the next token starts an operand, a planning choice; the
  operator choice after a multi-digit operand is not caught by this rule.

Outside the sampler (plain forwards, HF `generate`, TransformerLens, nnsight traces) there is no
prompt / generated distinction: every position is a decision position, gated by its own
distribution. `always` and `detector` work anywhere; `entropy` on any Hugging Face forward (the
probe pass crops whatever KV cache it is given); `base_entropy` / `disagree` on Hugging Face
forwards that continue no KV cache (teacher forcing); `planning` only inside the sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.entropy import kl

GATES: tuple[str, ...] = ("always", "entropy", "base_entropy", "disagree", "detector", "planning")
WHERE: tuple[str, ...] = ("generated", "prompt", "all")
"""generated: decision positions (gated); prompt: every prompt token, ungated; all: both."""
NEEDS_BASE = ("base_entropy", "disagree")
NEEDS_THRESHOLD = ("entropy", "base_entropy", "disagree")

Predicate = Callable[[Int[Tensor, "batch step"]], Bool[Tensor, " batch"]]


def token_entropy(logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """Entropy (nats) of softmax(logits) at temperature 1 over the full vocabulary (float32)."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)


def entropy_gate(logits: Float[Tensor, "*batch vocab"], threshold: float) -> Bool[Tensor, "*batch"]:
    """True where the next-token entropy is strictly above `threshold` nats."""
    return token_entropy(logits) > threshold


def disagree_gate(
    base_logits: Float[Tensor, "*batch vocab"], logits: Float[Tensor, "*batch vocab"], threshold: float
) -> Bool[Tensor, "*batch"]:
    """True where KL(base || model) of the next-token distributions is strictly above `threshold` nats."""
    return kl(base_logits, logits.to(base_logits.device)).to(logits.device) > threshold


def after_tokens(ids: Iterable[int], at_start: bool = True) -> Predicate:
    """Predicate for the `planning` gate: True for rows whose last generated token is in `ids`, and
    (if `at_start`) for rows with nothing generated yet (the first decision, at the prompt's end)."""
    ids_t = torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long)
    if ids_t.numel() == 0:
        raise ValueError("after_tokens needs at least one token id (e.g. the ids of '+', '-', ';')")

    def predicate(tokens: Int[Tensor, "batch step"]) -> Bool[Tensor, " batch"]:
        if tokens.shape[1] == 0:
            return torch.full((tokens.shape[0],), at_start, dtype=torch.bool, device=tokens.device)
        return torch.isin(tokens[:, -1], ids_t.to(tokens.device))

    return predicate


def check_gate(gate: str, where: str, threshold: float | None, base, detector, planning) -> None:
    """Validate a gate configuration; errors name the bad value, the allowed ones and the fix."""
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} is invalid: allowed {GATES}. Fix: e.g. gate='entropy', threshold=1.0.")
    if where not in WHERE:
        raise ValueError(f"where={where!r} is invalid: allowed {WHERE}. Fix: 'generated' steers the "
                         "positions whose next token is sampled.")
    if where == "prompt" and gate != "always":
        raise ValueError(f"where='prompt' steers every prompt token and no generated one, so gate={gate!r} "
                         "would never be consulted. Fix: where='all' (prompt + gated generation) or gate='always'.")
    if gate in NEEDS_THRESHOLD and threshold is None:
        raise ValueError(f"gate={gate!r} needs threshold= (nats). Fix: e.g. the fork threshold of a probe "
                         "run (metrics.json: models.<name>.fork_threshold).")
    if gate in NEEDS_BASE and base is None:
        raise ValueError(f"gate={gate!r} runs the base model on the same prefix: pass base=<base model>.")
    if gate == "detector" and detector is None:
        raise ValueError("gate='detector' needs detector=<probe.detector.ForkDetector> (ForkDetector.load(path)).")
    if gate == "planning" and not callable(planning):
        raise ValueError("gate='planning' needs planning=<predicate over the generated tokens so far>, e.g. "
                         "steering.gates.after_tokens(ids_of_boundary_tokens).")

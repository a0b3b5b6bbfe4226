"""Teacher-forced per-token entropy, log-prob and KL of a model pair on the same trajectories.

What it is: given fixed token sequences (prompt + completion, sampled from either model), run
each model once over them and read, for every completion token, the distribution that token was
drawn from. Alignment: the stats stored at position t describe the next-token distribution
computed at position t - 1 (the one that *predicts* token t), exactly like
`probe.sampling.sampler.Branches.entropy[:, t]` describes the distribution that sampled token t. Position 0
has no predicting position, so it can never be an answer token.

- token entropy: nats, temperature 1, full vocabulary (no top-k / top-p), float32.
- logprob: log p(token t | tokens < t).
- KL(p || q) = sum_v p_v (log p_v - log q_v), per token, both directions for the pair.

Departure from Wang et al. 2025 (arXiv:2506.01939): the paper reads token entropy off the policy
while it generates; here both models are teacher-forced on the *same* tokens (sampled from either
model), so base and RL entropies, log-probs and KLs are compared position by position. On the
sampling model's own trajectories the two coincide (tested against `Branches.entropy`).

What it is not: sampling (`probe.sampling.sampler`) or forks (`probe.forks`). Values outside the answer
mask are 0. Residuals for the fork detector are gathered in the same forward pass of the RL model
(`pair_stats(..., resid_layers=...)`), at the predicting position of each answer token (or of the
answer tokens in `resid_keep`, a subsample a caller draws to stay within memory), and kept on the
CPU in float32. Teacher-forced batches hold at most `batch_size` rows and at most what fits the
memory budget (`probe.models.budget.forward_rows`: every position's logits, for long trajectories).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.models.budget import forward_rows
from probe.models.pair import RESID_POST, HookedModel, Pair
from probe.sampling.sampler import Branches

UNLABELLED = -1  # role code outside answers (or when the task gives no roles)


@dataclass
class Trajectories:
    """Right-padded prompt + completion token rows, and which positions are answer tokens."""

    tokens: Int[Tensor, "rows pos"]
    attention_mask: Bool[Tensor, "rows pos"]
    """True on real tokens (prompt and completion)."""
    answer_mask: Bool[Tensor, "rows pos"]
    """True on completion tokens (the eos token included): the tokens whose stats are read."""
    roles: Int[Tensor, "rows pos"]
    """Role code per answer token (`probe.metrics.evaluate.ROLE_CODE`); -1 elsewhere or when unlabelled."""
    prompt_index: Int[Tensor, " rows"]
    """Which prompt each row continues (for splitting by problem)."""


def trajectories_from_branches(
    branches: Branches, roles: Int[Tensor, "rows new"] | None = None, pad_id: int = 0
) -> Trajectories:
    """Prompt tokens + generated tokens of every row, right-padded with `pad_id`.

    roles: per generated token, aligned with `branches.tokens` (e.g. `Scored.roles`); None = unlabelled.
    """
    tok, gen_mask = branches.tokens.cpu(), branches.mask.cpu()
    rows = []
    for r in range(tok.shape[0]):
        prompt = branches.prompt_tokens[int(branches.prompt_index[r])]
        rows.append((prompt, tok[r][gen_mask[r]], None if roles is None else roles.cpu()[r][gen_mask[r]]))
    width = max(len(p) + len(c) for p, c, _ in rows)
    out_tok = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.bool)
    answer = torch.zeros_like(attn)
    out_roles = torch.full((len(rows), width), UNLABELLED, dtype=torch.long)
    for r, (prompt, comp, role) in enumerate(rows):
        p, c = len(prompt), len(comp)
        out_tok[r, :p] = torch.tensor(prompt, dtype=torch.long)
        out_tok[r, p : p + c] = comp
        attn[r, : p + c] = True
        answer[r, p : p + c] = True
        if role is not None:
            out_roles[r, p : p + c] = role
    return Trajectories(out_tok, attn, answer, out_roles, branches.prompt_index.cpu().clone())


def _check_masks(tokens: Tensor, attention_mask: Tensor | None, answer_mask: Tensor | None):
    attention_mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if answer_mask is None:
        answer_mask = attention_mask.clone()
        answer_mask[:, 0] = False
    answer_mask = answer_mask.bool()
    if not (attention_mask.shape == answer_mask.shape == tokens.shape):
        raise ValueError(f"tokens {tuple(tokens.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"answer_mask {tuple(answer_mask.shape)} must have the same [rows, pos] shape")
    if answer_mask[:, 0].any():
        raise ValueError("answer_mask is True at position 0: no position predicts the first token. "
                         "Fix: start answers after at least one prompt token.")
    if (answer_mask & ~attention_mask).any():
        raise ValueError("answer_mask is True on padding (attention_mask False). Fix: answer_mask must "
                         "be a subset of attention_mask.")
    return attention_mask, answer_mask


def entropy_and_logprob(
    logits: Float[Tensor, "rows pos vocab"], tokens: Int[Tensor, "rows pos"], entropy_grad: bool = True
) -> tuple[Float[Tensor, "rows pos"], Float[Tensor, "rows pos"]]:
    """Entropy (nats, temperature 1) and log-prob of each token, aligned to `tokens`: column t
    comes from `logits[:, t - 1]` (the distribution that predicts token t); column 0 is 0.
    Differentiable (the RL learner uses it with gradients); `entropy_grad=False` computes the
    entropy outside autograd (same values; no [rows, pos, vocab] tensors kept for a backward pass
    that a loss without an entropy term never takes)."""
    logp = logits[:, :-1].float().log_softmax(-1)  # [b, T-1, V]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        p = logp.exp()
        ent = -torch.where(p > 0, p * logp, 0.0).sum(-1)  # [b, T-1]
    lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [b, T-1]
    pad = ent.new_zeros(ent.shape[0], 1)
    return torch.cat([pad, ent], 1), torch.cat([pad, lp], 1)


def kl(
    p_logits: Float[Tensor, "*batch vocab"], q_logits: Float[Tensor, "*batch vocab"]
) -> Float[Tensor, "*batch"]:
    """KL(p || q) in nats per position, from logits (softmax at temperature 1)."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} differ; "
                         "the two models must share a vocabulary")
    logp, logq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def token_stats(
    model: HookedModel,
    tokens: Int[Tensor, "rows pos"],
    attention_mask: Bool[Tensor, "rows pos"] | None = None,
    answer_mask: Bool[Tensor, "rows pos"] | None = None,
    batch_size: int = 32,
) -> tuple[Float[Tensor, "rows pos"], Float[Tensor, "rows pos"]]:
    """Teacher-forced (entropy, logprob) of every answer token (0 elsewhere), on the CPU.

    answer_mask None = every real token but the first.
    """
    attention_mask, answer_mask = _check_masks(tokens, attention_mask, answer_mask)
    model.check_context(tokens.shape[1])
    batch_size = min(batch_size, forward_rows(getattr(model, "hf", None), tokens.shape[1]))
    ent, lp = torch.zeros(tokens.shape), torch.zeros(tokens.shape)
    with torch.inference_mode():
        for r0 in range(0, tokens.shape[0], batch_size):
            sl = slice(r0, r0 + batch_size)
            logits = model.logits(tokens[sl], attention_mask[sl])
            e, l_ = entropy_and_logprob(logits, tokens[sl].to(logits.device))
            ent[sl], lp[sl] = e.cpu(), l_.cpu()
    return torch.where(answer_mask, ent, 0.0), torch.where(answer_mask, lp, 0.0)


@dataclass
class PairStats:
    """Both models' teacher-forced stats on the same trajectories (0 outside `mask`)."""

    mask: Bool[Tensor, "rows pos"]
    """The answer mask the stats were computed on."""
    h_base: Float[Tensor, "rows pos"]
    h_rl: Float[Tensor, "rows pos"]
    lp_base: Float[Tensor, "rows pos"]
    lp_rl: Float[Tensor, "rows pos"]
    kl_base_rl: Float[Tensor, "rows pos"]
    """KL(base || rl) of the next-token distributions."""
    kl_rl_base: Float[Tensor, "rows pos"]
    """KL(rl || base)."""
    resid: dict[int, Float[Tensor, "n_answer d_model"]] = field(default_factory=dict)
    """RL model residual (`resid_site`) at the position predicting each answer token, row-major
    order of `mask` (so `resid[L][i]` goes with `h_base[mask][i]`); with `resid_keep`, of the kept
    answer tokens only, row-major order of `resid_keep`. In the model's dtype (bfloat16 models keep
    bfloat16 residuals: upcasting is exact, so consumers upcast only what they select)."""
    resid_base: dict[int, Float[Tensor, "n_answer d_model"]] = field(default_factory=dict)
    """The base model's residuals likewise (`pair_stats(base_resid=True)`, read in the same forward as its
    entropies); else empty."""


def pair_stats(
    pair: Pair,
    traj: Trajectories,
    batch_size: int = 32,
    resid_layers: Sequence[int] = (),
    resid_site: str = RESID_POST,
    resid_keep: Bool[Tensor, "rows pos"] | None = None,
    base_resid: bool = False,
) -> PairStats:
    """Entropy, logprob and both KLs of base and RL on `traj`, plus RL residuals at `resid_layers`
    for the answer tokens in `resid_keep` (default: all of them), and the base's too if `base_resid`."""
    attention_mask, answer_mask = _check_masks(traj.tokens, traj.attention_mask, traj.answer_mask)
    for m in pair:
        m.check_context(traj.tokens.shape[1])
    batch_size = min(batch_size, forward_rows(getattr(pair.base, "hf", None), traj.tokens.shape[1], models=2))
    keep = answer_mask if resid_keep is None else resid_keep.bool() & answer_mask
    shape = traj.tokens.shape
    out = {k: torch.zeros(shape) for k in ("h_base", "h_rl", "lp_base", "lp_rl", "kl_base_rl", "kl_rl_base")}
    resid: dict[int, list[Tensor]] = {layer: [] for layer in resid_layers}
    resid_b: dict[int, list[Tensor]] = {layer: [] for layer in resid_layers} if base_resid else {}
    pred = torch.zeros_like(answer_mask)  # [rows, pos] positions predicting an answer token
    pred[:, :-1] = keep[:, 1:]
    with torch.inference_mode():
        for r0 in range(0, shape[0], batch_size):
            sl = slice(r0, r0 + batch_size)
            tok, attn = traj.tokens[sl], attention_mask[sl]
            if base_resid:
                lb, acts_b = pair.base.run_with_resid(tok, list(resid_layers), attn, site=resid_site)  # [b, T, V]
            else:
                lb, acts_b = pair.base.logits(tok, attn), {}
            lr, acts = pair.rl.run_with_resid(tok, list(resid_layers), attn, site=resid_site)
            tok = tok.to(lb.device)
            (hb, pb), (hr, pr) = entropy_and_logprob(lb, tok), entropy_and_logprob(lr.to(lb.device), tok)
            kbr, krb = kl(lb[:, :-1], lr[:, :-1].to(lb.device)), kl(lr[:, :-1].to(lb.device), lb[:, :-1])
            zero = kbr.new_zeros(kbr.shape[0], 1)
            for k, v in zip(out, (hb, hr, pb, pr, torch.cat([zero, kbr], 1), torch.cat([zero, krb], 1))):
                out[k][sl] = v.cpu()
            for got, store in ((acts, resid), (acts_b, resid_b)):
                for layer, a in got.items():
                    store[layer].append(a[pred[sl].to(a.device)].cpu())  # [n, d_model], the model's dtype
    stats = {k: torch.where(answer_mask, v, 0.0) for k, v in out.items()}
    return PairStats(answer_mask, **stats, resid={k: torch.cat(v) for k, v in resid.items()},
                     resid_base={k: torch.cat(v) for k, v in resid_b.items()})

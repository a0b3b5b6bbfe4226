"""The GRPO learner: rollout batch, group advantages, token selection and the policy loss.

The sampler (`probe.sampler`) and the learner meet only through `Rollouts`, a plain batch.
Everything here is a pure function of tensors, tested against hand-worked examples.

"GRPO" here, and where each intervention departs from its paper:
- GRPO (DeepSeekMath, arXiv:2402.03300): G samples per prompt, advantage = reward - group mean
  (optionally / group std), PPO-clipped ratio against the sampling policy, no value model, no
  reference-model KL (as in DAPO / Dr. GRPO), token-level loss normalisation (sum over all answer
  tokens of a mini-batch / their count, as in DAPO).
- `entropy-bonus`: loss -= coef * mean token entropy of the current policy.
- `clip-cov` (arXiv:2505.22617, Alg. Clip-Cov): per-token covariance
  cov_t = (logp_t - mean logp) * (A_t - mean A) over the mini-batch's answer tokens; among tokens
  with cov in [cov_low, cov_high], a random `clip_cov_ratio` fraction has its policy-gradient
  term detached. Departure: the paper's ratio (2e-4) assumes millions of tokens per batch; our
  batches hold thousands, so the default ratio is larger (0.01, tuned on the organism: 0.004 kept
  45% of the planning entropy vanilla GRPO loses, 0.01 kept 76%, 0.05 kept all of it but lost
  the pass@1 gain), and at least one token is clipped when any candidate exists.
- `kl-cov` (same paper, Alg. KL-Cov): the top `kl_cov_ratio` fraction of tokens by cov get
  `kl_cov_coef * |logp - logp_old|` added to their (unclipped) policy-gradient loss, as in the
  authors' verl implementation. It only bites once the policy moves off the sampling policy, i.e.
  from the second mini-batch of a rollout batch on (`mini_batches` >= 2).
- `forks-only` (arXiv:2506.01939): the policy gradient flows only through the top `fork_rho`
  fraction of answer tokens by the sampling policy's entropy (per rollout batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.entropy import entropy_and_logprob
from probe.forks import fork_mask

INTERVENTIONS = ("none", "entropy-bonus", "clip-cov", "kl-cov", "forks-only")


@dataclass
class Rollouts:
    """One rollout batch: prompt (left-padded) + completion (right-padded) per row."""

    input_ids: Int[Tensor, "rows seq"]
    attention_mask: Int[Tensor, "rows seq"]
    position_ids: Int[Tensor, "rows seq"]
    answer_mask: Bool[Tensor, "rows seq"]
    """True where the token at this position was generated (the learner's targets, eos included)."""
    old_logprobs: Float[Tensor, "rows seq"]
    """Log-prob of each generated token under the sampling policy; 0 elsewhere."""
    old_entropy: Float[Tensor, "rows seq"]
    """Entropy (nats) of the sampling policy where each token was drawn; 0 elsewhere."""
    rewards: Float[Tensor, " rows"]
    advantages: Float[Tensor, " rows"]

    def select(self, rows: Int[Tensor, " k"]) -> Rollouts:
        return Rollouts(**{k: v[rows] for k, v in self.__dict__.items()})


@dataclass
class LossConfig:
    """How the learner turns a rollout batch into a loss."""

    intervention: str = "none"
    """none | entropy-bonus | clip-cov | kl-cov | forks-only."""
    clip_eps: float = 0.2
    """PPO ratio clip (epsilon)."""
    entropy_coef: float = 0.02
    """entropy-bonus: weight of the entropy term."""
    clip_cov_ratio: float = 0.01
    """clip-cov: fraction of answer tokens (drawn among the candidates) whose gradient is detached."""
    clip_cov_low: float = 0.5
    """clip-cov: lower covariance bound of the candidates."""
    clip_cov_high: float = 5.0
    """clip-cov: upper covariance bound of the candidates."""
    kl_cov_ratio: float = 0.05
    """kl-cov: fraction of answer tokens (highest covariance) that get the KL penalty."""
    kl_cov_coef: float = 1.0
    """kl-cov: weight of |logp - logp_old| on the selected tokens."""
    fork_rho: float = 0.2
    """forks-only: fraction of answer tokens (highest sampling entropy) that carry the gradient."""

    def __post_init__(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {self.intervention!r}; choose one of {list(INTERVENTIONS)}")
        for name in ("clip_cov_ratio", "kl_cov_ratio", "fork_rho"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")
        if self.clip_cov_low > self.clip_cov_high:
            raise ValueError(f"clip_cov_low={self.clip_cov_low} > clip_cov_high={self.clip_cov_high}")


def group_advantages(
    rewards: Float[Tensor, " rows"], group_size: int, std_normalize: bool = False, eps: float = 1e-6
) -> Float[Tensor, " rows"]:
    """Reward minus its group's mean (rows are prompt-major groups of `group_size`);
    divided by the group's std (unbiased=False) + eps when `std_normalize`."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs G >= 2 samples per prompt")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)  # (prompts, G)
    adv = g - g.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (g.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def token_covariance(
    logprobs: Float[Tensor, "rows seq"], advantages: Float[Tensor, " rows"], mask: Bool[Tensor, "rows seq"]
) -> Float[Tensor, "rows seq"]:
    """cov_t = (logp_t - mean logp) * (A_t - mean A), means over the masked tokens; 0 off-mask."""
    adv = advantages[:, None].expand_as(logprobs)
    lp_c = logprobs - logprobs[mask].mean()
    a_c = adv - adv[mask].mean()
    return torch.where(mask, lp_c * a_c, torch.zeros_like(logprobs))


def clip_cov_select(
    cov: Float[Tensor, "rows seq"], mask: Bool[Tensor, "rows seq"], cfg: LossConfig, generator: torch.Generator
) -> Bool[Tensor, "rows seq"]:
    """Clip-Cov: a random `clip_cov_ratio` fraction (of all answer tokens) drawn from the tokens
    whose covariance lies in [clip_cov_low, clip_cov_high]."""
    cand = mask & (cov >= cfg.clip_cov_low) & (cov <= cfg.clip_cov_high)
    idx = cand.flatten().nonzero().squeeze(1)
    k = min(idx.numel(), max(1, int(cfg.clip_cov_ratio * int(mask.sum()))))
    out = torch.zeros(cov.numel(), dtype=torch.bool)
    if idx.numel():
        perm = torch.randperm(idx.numel(), generator=generator)[:k]
        out[idx[perm].cpu()] = True
    return out.view(cov.shape).to(cov.device)


def kl_cov_select(
    cov: Float[Tensor, "rows seq"], mask: Bool[Tensor, "rows seq"], cfg: LossConfig
) -> Bool[Tensor, "rows seq"]:
    """KL-Cov: the top `kl_cov_ratio` fraction of answer tokens by covariance (ties: earlier first)."""
    k = max(1, int(cfg.kl_cov_ratio * int(mask.sum())))
    score = torch.where(mask, cov, torch.full_like(cov, -float("inf"))).flatten()
    top = torch.topk(score, k, sorted=False, largest=True).indices
    out = torch.zeros_like(score, dtype=torch.bool)
    out[top] = True
    return out.view(cov.shape) & mask


def policy_logprobs(
    model, batch: Rollouts
) -> tuple[Float[Tensor, "rows seq"], Float[Tensor, "rows seq"]]:
    """Teacher-forced log-prob of each token and entropy (nats, temperature 1) of the distribution
    that predicted it, aligned with `batch.input_ids` (position 0 gets 0)."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    entropy, logp = entropy_and_logprob(logits, batch.input_ids)
    return logp, entropy


def grpo_loss(
    logp: Float[Tensor, "rows seq"],
    entropy: Float[Tensor, "rows seq"],
    batch: Rollouts,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
    forks: Bool[Tensor, "rows seq"] | None = None,
) -> tuple[Tensor, dict]:
    """The scalar loss for one mini-batch and its diagnostics.

    `forks` (forks-only) is the fork mask of the whole rollout batch, restricted to these rows;
    when None it is computed on this mini-batch."""
    mask = batch.answer_mask
    n_tok = mask.sum().clamp(min=1)
    adv = batch.advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - batch.old_logprobs)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
    pg = torch.maximum(unclipped, clipped)
    selected = torch.zeros_like(mask)
    if cfg.intervention in ("clip-cov", "kl-cov"):
        cov = token_covariance(logp.detach(), batch.advantages, mask)
        if cfg.intervention == "clip-cov":
            selected = clip_cov_select(cov, mask, cfg, generator or torch.Generator().manual_seed(0))
            pg = torch.where(selected, pg.detach() * 0, pg)
        else:
            selected = kl_cov_select(cov, mask, cfg)
            kl = (logp - batch.old_logprobs).abs()
            pg = torch.where(selected, unclipped + cfg.kl_cov_coef * kl, pg)
    elif cfg.intervention == "forks-only":
        selected = forks if forks is not None else fork_mask(batch.old_entropy, mask, cfg.fork_rho)
        pg = torch.where(selected, pg, pg.detach() * 0)
    loss = (pg * mask).sum() / n_tok
    ent_mean = (entropy * mask).sum() / n_tok
    if cfg.intervention == "entropy-bonus":
        loss = loss - cfg.entropy_coef * ent_mean
    clip_frac = (((ratio - 1).abs() > cfg.clip_eps) & mask).sum() / n_tok
    stats = {
        "loss": loss.item(),
        "entropy": ent_mean.item(),
        "ratio_clipped_frac": clip_frac.item(),
        "intervened_frac": ((selected & mask).sum() / n_tok).item(),
    }
    return loss, stats

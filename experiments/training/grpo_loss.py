"""The GRPO learner: rollout batch, group advantages, token selection and the policy loss.

The sampler (`probe.sampling.sampler`) and the learner meet only through `Rollouts`, a plain batch.
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

Regimes that keep breadth by changing the *advantage* (`regime_advantages`; the clipped token
loss above is unchanged, so only the per-sample weight differs from GRPO):
- `nsr` (negative-sample reinforcement, arXiv:2506.01347, L_NSR): reward -1 for an incorrect
  sample, 0 for a correct one, no baseline: A = -1[wrong]. The loss only pushes probability off
  wrong answers and lets the model redistribute it by its own prior.
- `w-reinforce` (same paper, Weighted-REINFORCE, L = lambda * L_PSR + L_NSR): A = lambda for a
  correct sample, -1 for an incorrect one, no baseline; lambda = `w_reinforce_lambda` (0.1, the
  paper's recommended value). Departure for both: the paper's objectives are REINFORCE; here the
  same clipped, token-normalised loss as GRPO, which at the first mini-batch (ratio 1) is exactly
  REINFORCE with that advantage and clips the later mini-batches like every other regime here.
  Rewards are 0/1 here, read as +1 / -1.
- `pass-at-k` (arXiv:2508.10751, the analytical pass@k advantage,
  `probe.metrics.passk.pass_at_k_advantages`): with N samples of a prompt,
  N_neg incorrect, group reward R = 1 - C(N_neg, k) / C(N, k) (expected pass@k of a random
  k-subset), sigma = sqrt(R (1 - R)); A_pos = (1 - R) / sigma, A_neg = (1 - R - C(N_neg - 1, k - 1)
  / C(N - 1, k - 1)) / sigma: each sample's mean (max reward of a k-subset holding it) minus R.
  k = `pass_k` (4). Departure: the division by sigma follows `std_normalize` (off in our GRPO, as
  in Dr. GRPO), so that only the reward differs from rl-none; groups with all samples alike get 0.
- `vpo-distinct` (a diversity-rewarding objective in the spirit of VPO, arXiv:2605.22817): the
  reward is a vector with one component per valid solution of the problem (1 where the sample
  *is* that solution, by the task's canonical form), and the group is scored as a set:
  F(S) = number of distinct correct solutions in the group, which is m times the expectation over
  one-hot scalarizations w of max_{y in S} w . r(y) (VPO's set objective with random weights).
  Each sample is credited its Shapley share of F, 1 / c for a correct sample whose solution
  appears c times in the group (0 if incorrect; the shares sum to F), and A = share - group mean
  (/ std with `std_normalize`). Departure: VPO's vector components are test cases or reward
  models and its own estimator assigns credit; here the components are the task's solutions and
  credit is the exact Shapley share, so duplicates of one answer split one unit of reward.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.entropy import entropy_and_logprob
from probe.forks import fork_mask
from probe.metrics.passk import distinct_solution_shares, pass_at_k_advantages
from probe.models.kv_cache import takes_logits_to_keep

INTERVENTIONS = ("none", "entropy-bonus", "clip-cov", "kl-cov", "forks-only", "nsr", "w-reinforce", "pass-at-k",
                 "vpo-distinct")
ADVANTAGE_REGIMES = ("nsr", "w-reinforce", "pass-at-k", "vpo-distinct")
"""Interventions that change the per-sample advantage (`regime_advantages`), not the token loss."""


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
    """none | entropy-bonus | clip-cov | kl-cov | forks-only | nsr | w-reinforce | pass-at-k | vpo-distinct."""
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
    w_reinforce_lambda: float = 0.1
    """w-reinforce: weight of the positive samples (advantage lambda for correct, -1 for incorrect)."""
    pass_k: int = 4
    """pass-at-k: the k of the pass@k reward (at most the group size)."""

    def __post_init__(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {self.intervention!r}; choose one of {list(INTERVENTIONS)}")
        for name in ("clip_cov_ratio", "kl_cov_ratio", "fork_rho"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")
        if self.w_reinforce_lambda < 0:
            raise ValueError(f"w_reinforce_lambda={self.w_reinforce_lambda} must be >= 0")
        if self.pass_k < 1:
            raise ValueError(f"pass_k={self.pass_k} must be >= 1")
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


shapley_distinct_shares = distinct_solution_shares
"""vpo-distinct's credit (module docstring): `probe.metrics.passk.distinct_solution_shares`."""


def regime_advantages(
    rewards: Float[Tensor, " rows"], group_size: int, cfg: LossConfig, std_normalize: bool = False,
    keys: Sequence[Hashable | None] | None = None,
) -> Float[Tensor, " rows"]:
    """Per-sample advantages of `cfg.intervention` (module docstring): GRPO's `group_advantages` for
    every token-loss intervention; nsr, w-reinforce, pass-at-k and vpo-distinct their own. `keys`
    (vpo-distinct): the canonical solution of each sample, None where incorrect."""
    iv = cfg.intervention
    if iv == "nsr":
        return -(rewards < 0.5).to(rewards.dtype)
    if iv == "w-reinforce":
        return torch.where(rewards > 0.5, cfg.w_reinforce_lambda, -1.0).to(rewards.dtype)
    if iv == "pass-at-k":
        return pass_at_k_advantages(rewards, group_size, cfg.pass_k, std_normalize)
    if iv == "vpo-distinct":
        if keys is None or len(keys) != rewards.numel():
            raise ValueError("vpo-distinct needs one canonical key per sample (None where incorrect)")
        shares = distinct_solution_shares(keys, group_size).to(rewards.device, rewards.dtype)
        return group_advantages(shares, group_size, std_normalize)
    return group_advantages(rewards, group_size, std_normalize)


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
    model, batch: Rollouts, entropy_grad: bool = True
) -> tuple[Float[Tensor, "rows seq"], Float[Tensor, "rows seq"]]:
    """Teacher-forced log-prob of each token and entropy (nats, temperature 1) of the distribution
    that predicted it, aligned with `batch.input_ids` (position 0 gets 0). `entropy_grad=False`:
    the entropy carries no gradient (for losses without an entropy term; same values)."""
    # Only the positions that predict generated tokens need logits: with left-padded prompts and
    # right-padded completions those are the last `keep` columns (the vocabulary projection and the
    # [rows, seq, vocab] softmax of a real model's long prompts are most of the loss's memory).
    first = int(batch.answer_mask.any(0).float().argmax()) if batch.answer_mask.any() else 1
    keep = batch.input_ids.shape[1] - max(first - 1, 0)
    kwargs = {"logits_to_keep": keep} if keep < batch.input_ids.shape[1] and takes_logits_to_keep(model) else {}
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, **kwargs
    ).logits
    start = batch.input_ids.shape[1] - logits.shape[1]  # 0, or the columns cut off in front
    entropy, logp = entropy_and_logprob(logits, batch.input_ids[:, start:], entropy_grad=entropy_grad)
    if start:
        pad = logp.new_zeros(logp.shape[0], start)
        entropy, logp = torch.cat([pad, entropy], 1), torch.cat([pad, logp], 1)
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

"""Evaluating checkpoints on a task's held-out split (Countdown by default, any `--task`).

Thin glue: load a checkpoint (`probe.checkpoint`), check its tokenizer can write the task
(`task.check_tokenizer`), sample n branches per held-out problem with the toolkit's sampler and
compute the shared metrics (`probe.evaluate`). The same numbers go into every `metrics.json`
(base, RL, steered).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from experiments.tasks import load_task
from probe.checkpoint import load_causal_lm, parse_dtype
from probe.entropy import Trajectories, trajectories_from_branches
from probe.evaluate import Scored, evaluate, score_branches
from probe.sampler import Branches, SamplerConfig, sample_branches


@dataclass
class EvalConfig:
    """Held-out evaluation of one or more checkpoints."""

    n: int = 64
    """Samples per held-out problem."""
    temperature: float = 1.0
    """Sampling temperature."""
    seed: int = 0
    """Sampling seed."""
    problems: int = 0
    """Use only the first N held-out problems (0 = all)."""
    batch_size: int = 1024
    """Rows (problem x sample) per forward pass."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    task: str = "countdown"
    """Task: "countdown" or "math:PATH[,train=PATH][,chat][,max_new_tokens=N]" (`experiments.tasks.load_task`)."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (faster; logits read in float32)."""

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1 sample per problem")
        if self.problems < 0:
            raise ValueError(f"problems={self.problems} must be >= 0 (0 = all)")


def evaluate_model(model, tokenizer, cfg: EvalConfig, task=None, **kw):
    """Metrics dict (and branches, scored) of an in-memory model on the held-out split of `task`
    (default: `cfg.task`)."""
    task = task or load_task(cfg.task)
    task.check_tokenizer(tokenizer)
    sampler = SamplerConfig(
        n=cfg.n,
        max_new_tokens=task.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )
    return evaluate(model, tokenizer, task.heldout_prompts(cfg.problems), task, sampler, **kw)


def evaluate_checkpoint(path: str | Path, cfg: EvalConfig, task=None, **kw) -> dict:
    """Metrics dict of the checkpoint directory `path` on the held-out split (kw go to
    `probe.evaluate.diversity_metrics`, e.g. per_problem=True)."""
    model, tok = load_causal_lm(path, device=cfg.device, dtype=cfg.dtype)
    metrics, _, _ = evaluate_model(model, tok, cfg, task, **kw)
    return metrics


def sample_scored_trajectories(
    model, tokenizer, prompts: list[str], n: int, seed: int, batch_size: int, device: str,
    task=None,
) -> tuple[Branches, Scored, Trajectories]:
    """`n` completions per prompt at temperature 1, scored by `task` (default Countdown), and as
    role-labelled trajectories (prompt + completion, right-padded) for teacher-forced probing."""
    task = task or load_task("countdown")
    cfg = SamplerConfig(n=n, max_new_tokens=task.max_new_tokens, temperature=1.0, seed=seed,
                        batch_size=max(batch_size, 1), device=device)
    branches = sample_branches(model, tokenizer, prompts, cfg)
    scored = score_branches(branches, prompts, task, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return branches, scored, trajectories_from_branches(branches, scored.roles, pad_id=pad)


def sample_trajectories(model, prompts: list[str], samples: int, seed: int,
                        batch_size: int, task=None) -> tuple[Trajectories, float]:
    """`samples` completions per prompt (temperature 1) as role-labelled trajectories, and the pass rate."""
    _, scored, traj = sample_scored_trajectories(model.hf, model.tokenizer, prompts, samples, seed, batch_size,
                                                 str(model.device), task)
    return traj, scored.correct.float().mean().item()

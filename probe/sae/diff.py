"""The SAE fork diff from prompts: sample, teacher-force both models, rank the features RL pruned.

What it is: `sae_fork_diff` is the library entry point of `forksight sae diff`. Given a model pair,
an SAE fitted to them and explicit prompts, it samples `samples` completions per prompt from one
model (`probe.metrics.trajectories.sample_trajectories`, temperature 1, seeded), then runs
`probe.sae.features.fork_feature_diff` on those trajectories: both models teacher-forced on the same
tokens, the base model's forks (top-`rho` answer tokens by base entropy), both residuals encoded at
the positions predicting each answer token, pruned / amplified features ranked. The result carries
the pass rate of the sampled rows. `feature_records` / `feature_row_html` (`probe.sae.features`)
read it.

What it is not: the choice of problems. The caller passes the prompts; to keep the features it ranks
independent of any reported number, take them from problems no reported number uses (the study uses
the selection half of the held-out split: `task.heldout_prompts()[0::2]`, see
`experiments.study.protocol`). Nor SAE training (`probe.sae.dictionary.train_sae`), nor the metrics
file and plots of `forksight sae diff` (`experiments.study.sae_stage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probe.metrics.trajectories import sample_trajectories
from probe.models.pair import Pair
from probe.sae.dictionary import check_sae
from probe.sae.features import DiffResult, fork_feature_diff
from probe.tasks import load_task
from probe.tasks.protocol import Task

SAMPLE_FROM = ("base", "rl")


def sae_fork_diff(pair: Pair, sae: Any, prompts: Sequence[str], task: Task | str, samples: int = 8, seed: int = 0,
                  rho: float = 0.2, min_freq: float = 0.02, batch_size: int = 256,
                  sample_from: str = "base") -> DiffResult:
    """Sample `samples` completions per prompt from `pair.base` (or `pair.rl`: `sample_from="rl"`),
    then `fork_feature_diff(pair, sae, trajectories, rho, min_freq, batch_size)`; `pass_rate` is set.

    sae: a sae-lens SAE whose hook site fits both models (`probe.sae.dictionary.load_sae`); task: a
    `Task` or a spec for `probe.tasks.load_task` ("countdown", "math:PATH"); rho: fork fraction;
    min_freq: a ranked feature fires on at least this fraction of forks; batch_size: rows per forward
    pass. Raises `SAEMismatchError` when the SAE does not fit a model, before any sampling."""
    if sample_from not in SAMPLE_FROM:
        raise ValueError(f"sample_from={sample_from!r}; allowed {SAMPLE_FROM} (which model samples the trajectories)")
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1 completion per prompt")
    if not 0 < rho <= 1:
        raise ValueError(f"rho={rho} must be in (0, 1]; 0.2 selects the top 20% of answer tokens as forks")
    if not 0 <= min_freq <= 1:
        raise ValueError(f"min_freq={min_freq} must be in [0, 1] (a fraction of the fork tokens)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (e.g. task.heldout_prompts()[0::2][:128])")
    check_sae(sae, pair.base)
    check_sae(sae, pair.rl)
    task = load_task(task) if isinstance(task, str) else task
    task.check_tokenizer(pair.base.tokenizer)
    sampler = pair.base if sample_from == "base" else pair.rl
    traj, pass_rate = sample_trajectories(sampler, prompts, samples, seed, batch_size, task)
    res = fork_feature_diff(pair, sae, traj, rho, min_freq, batch_size)
    res.pass_rate = pass_rate
    return res

"""Sampled, scored, role-labelled trajectories: the input of every teacher-forced probe.

What it is: one call from prompts to what the probes read (and `save_trajectories` /
`load_trajectories`, a safetensors file with a caller's key, so a long job does not sample twice). `sample_scored_trajectories` samples `n`
completions per prompt at temperature 1 (`probe.sampling.sampler`), scores them against the task
(`probe.metrics.evaluate.score_branches`, which also labels each answer token's role) and lays them out
as right-padded prompt + completion rows (`probe.entropy.Trajectories`). `sample_trajectories` is the
same for a loaded `HookedModel`, returning the trajectories and the pass rate only.

What it is not: the probing itself (teacher-forced stats are `probe.entropy.pair_stats`, SAE diffs
`probe.sae.diff`), nor the choice of problems (callers pass the prompts; the study's protocol takes
them from the selection half of the held-out split, `experiments.study.protocol.Half`).

Conventions: temperature 1, no top-k / top-p (the distribution the entropies describe); padding is the
tokenizer's pad id, or its eos id when it has none; the pass rate is the fraction of all sampled rows
the task accepts (a mean over rows, so over problems weighted equally when every prompt has `n` rows).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from probe.entropy import Trajectories, trajectories_from_branches
from probe.metrics.evaluate import Scored, score_branches
from probe.models.pair import HookedModel
from probe.sampling.sampler import SamplerConfig, sample_branches
from probe.sampling.types import Branches
from probe.tasks import load_task
from probe.tasks.protocol import Task


def sample_scored_trajectories(
    model: Any, tokenizer: Any, prompts: Sequence[str], n: int, seed: int, batch_size: int, device: str,
    task: Task | None = None,
) -> tuple[Branches, Scored, Trajectories]:
    """`n` completions per prompt at temperature 1, scored by `task` (default Countdown), and as
    role-labelled trajectories (prompt + completion, right-padded) for teacher-forced probing.

    model / tokenizer: a Hugging Face causal LM and its tokenizer; batch_size: rows per forward pass
    (values below 1 mean 1); device: where the sampler runs ("cpu", "cuda", "auto")."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (e.g. task.heldout_prompts(8))")
    task = task or load_task("countdown")
    cfg = SamplerConfig(n=n, max_new_tokens=task.max_new_tokens, temperature=1.0, seed=seed,
                        batch_size=max(batch_size, 1), device=device)
    branches = sample_branches(model, tokenizer, prompts, cfg)
    scored = score_branches(branches, prompts, task, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return branches, scored, trajectories_from_branches(branches, scored.roles, pad_id=pad)


def sample_trajectories(model: HookedModel, prompts: Sequence[str], samples: int, seed: int,
                        batch_size: int, task: Task | None = None) -> tuple[Trajectories, float]:
    """`samples` completions per prompt (temperature 1) of a loaded `HookedModel` (e.g. `pair.base`)
    as role-labelled trajectories, and the pass rate (fraction of rows the task accepts)."""
    _, scored, traj = sample_scored_trajectories(model.hf, model.tokenizer, prompts, samples, seed, batch_size,
                                                 str(model.device), task)
    return traj, scored.correct.float().mean().item()


def save_trajectories(path: str | Path, traj: Trajectories, key: Any) -> Path:
    """Write `traj` to `path` (safetensors, atomically) with `key` (JSON-able: what produced it) in
    the header, for `load_trajectories`."""
    from probe.models.checkpoint import save_safetensors_atomic

    return save_safetensors_atomic(path, {f.name: getattr(traj, f.name) for f in fields(Trajectories)},
                                   {"forksight.trajectories.key": json.dumps(key, sort_keys=True)})


def load_trajectories(path: str | Path, key: Any) -> Trajectories | None:
    """The trajectories at `path` if it exists and was saved with this `key`, else None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("forksight.trajectories.key") != json.dumps(key, sort_keys=True):
                return None
            return Trajectories(**{name: f.get_tensor(name) for name in f.keys()})
    except Exception:  # noqa: BLE001  a foreign or older file is not ours to reuse: sample again
        return None

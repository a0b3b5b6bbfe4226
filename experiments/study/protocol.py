"""The honest protocol: selection and test halves of the held-out split, seeds, and one cell's evaluation.

Every recovery number forksight reports is measured the same way:
- The held-out problems are split once: problem i (in the task's held-out order, which is the
  generator's draw order, so the halves are random) is in the *selection* half iff i is even, in
  the *test* half iff i is odd. Fixed for every run of every command.
- Every choice (method, layers, coefficient, gate, fraction, temperature, training settings of a
  learned intervention) is made on the selection half, at the selection seed(s).
- Every reported number comes from the test half at *test seeds* that no selection used
  (`test_seeds`), with base, RL, temperature, mixture, patching and the entropy-preserving RL
  models evaluated there the same way (same problems, same seeds: common random numbers). The
  patching and layer-restoration curves, on which no choice is made, may instead be read from the
  selection half's cells (`SweepConfig.curves_half="selection"`, the real-model profile: on a CPU
  each point costs a base-length sampling run).

A *cell* is one (model, intervention, temperature) evaluated on one half at one seed: n samples per
problem through `probe.sampling.sampler` (or the vLLM engine, `experiments.study.engines`), scored by the task; it keeps its metrics (docs/architecture.md
keys), its per-problem arrays, and its per-sample `probe.metrics.outcomes.Outcomes` (so a mixture or a
row-level splice can be formed later without sampling again).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from probe.metrics.evaluate import evaluate
from probe.metrics.outcomes import Outcomes
from probe.metrics.passk import distinct_rule
from probe.sampling.sampler import SamplerConfig

HALVES = ("selection", "test")
KEPT = ("n_problems", "n_samples", "pass_at_1", "pass_at_64", "pass_at_k", "distinct_correct_mean",
        "distinct_correct_subset", "distinct_correct_all_mean", "fork_entropy_mean", "planning_entropy_mean",
        "execution_entropy_mean", "truncated_share", "eos_by_budget", "temperature", "seed")


def split_heldout(prompts: Sequence[str]) -> dict[str, list[str]]:
    """{"selection": even-indexed prompts, "test": odd-indexed prompts} of the held-out list."""
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError(f"the held-out split has {len(prompts)} problem(s); the protocol needs at least 2 "
                         "(one per half). Fix: use a task with a larger held-out split")
    return {"selection": prompts[0::2], "test": prompts[1::2]}


def test_seeds(seed: int, count: int) -> list[int]:
    """Sampling seeds of the test half: seed + 1000, seed + 1001, ... (selection uses `seed` only)."""
    if count < 1:
        raise ValueError(f"test seeds count={count} must be >= 1")
    return [seed + 1000 + i for i in range(count)]


@dataclass(frozen=True)
class Half:
    """One half of the held-out split, ready to evaluate on."""

    name: str
    prompts: list[str]
    eligible: list[bool | None]
    """Per problem: counts toward distinct_correct_mean by the task's rule (n_solutions >= 3), or None
    where the task cannot count solutions (then: where the compared models solved it, `probe.metrics.frontier`)."""

    @classmethod
    def of(cls, task: Any, name: str, limit: int = 0) -> Half:
        """Half `name` of `task`'s held-out split (its first `limit` problems; 0 = all)."""
        if name not in HALVES:
            raise ValueError(f"half {name!r}; allowed {HALVES}")
        prompts = split_heldout(task.heldout_prompts())[name]
        prompts = prompts[:limit] if limit else prompts
        return cls(name, prompts, distinct_rule(task, prompts))


def evaluate_cell(model: Any, tokenizer: Any, task: Any, half: Half, *, n: int, seed: int, temperature: float = 1.0,
                  batch_size: int = 1024, intervention: Any = None, engine: Any = None, parts_dir: Any = None,
                  identity: str = "") -> dict[str, Any]:
    """Metrics (`KEPT` keys), per-problem arrays, `outcomes` (Outcomes.to_json) and `engine` of one cell;
    sampled from `model` by the built-in sampler, or by `engine` (a started `VLLMEngine`; `model` unused).
    `parts_dir`, `identity`: the built-in sampler saves the cell's samples there part by part and resumes
    from them (`probe.sampling.parts`), so a stopped cell loses one part, not the cell."""
    t0 = time.time()
    device = "auto" if engine is not None else str(next(model.parameters()).device)
    cfg = SamplerConfig(n=n, max_new_tokens=task.max_new_tokens, temperature=temperature, seed=seed,
                        batch_size=batch_size, device=device)
    m, _, scored = evaluate(model, tokenizer, half.prompts, task, cfg, intervention=intervention, engine=engine,
                            parts_dir=parts_dir, identity=identity, n_boot=200, per_problem=True)
    out = {k: m.get(k) for k in KEPT}
    out["engine"] = "hf" if engine is None else engine.name
    out["per_problem"] = m["per_problem"]
    out["outcomes"] = Outcomes.from_scored(scored, n, half.eligible).to_json()
    out["seconds"] = time.time() - t0
    return out

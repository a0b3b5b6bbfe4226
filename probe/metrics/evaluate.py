"""Scoring sampled branches against a task, the shared metrics dict, and the pass@k figure.

What it is: glue between `probe.sampling.sampler.Branches`, a task (the protocol in `probe.tasks.protocol`) and the
pure metrics of `probe.metrics.passk` / `probe.forks`. `score_branches` decodes and verifies every row;
`diversity_metrics` turns that into the metrics.json keys of docs/architecture.md; `evaluate` does both after
sampling; `plot_pass_at_k` draws the curves of several models.

What it is not: a sampler (see `probe.sampling.sampler`) or a task (see `experiments`).

Conventions where docs/architecture.md is silent:
- A completion is the decoded masked tokens with the final end-of-sequence token dropped for
  rows that finished on "eos", decoded with `skip_special_tokens=True`.
- The role of the eos token is "other"; padding gets role code -1 (`PAD_ROLE`).
- A row's canonical key is None unless `task.verify` accepts it, so keys count valid answers only.
- Entropy means pool tokens over all rows (a token-weighted mean, not a mean of per-row means);
  forks are taken over the whole evaluated batch, eos tokens included. Undefined means are None,
  and so are all three entropy means of branches without per-token entropy (NaN: the vLLM engine's).
- `distinct_correct_mean` averages over problems with `task.n_solutions(prompt) >= 3`; a problem
  whose n_solutions is None (the task cannot enumerate solutions, e.g. a math file) counts when it
  was solved (at least one correct sample); `distinct_correct_subset` records which rule held. That
  subset is this model's own: to compare models use `probe.metrics.breadth.compare_breadth`, which averages
  them all over the same problems. `distinct_correct_all_mean` averages over every problem, an
  unsolved one counting 0 (comparable across models as it is).
- `truncated_share`: rows that never emitted eos within `max_new_tokens` (finish reason "length"),
  over all rows; `fraction_finished_eos` is the rest. A budget that cuts a model off measures its
  verbosity, not its search (`probe.metrics.breadth.TRUNCATION_LIMIT`). `eos_by_budget` {budget: share}
  is the eos share each smaller budget would have given (`probe.metrics.breadth.eos_by_budget`).
- `seed` is both recorded (the sampler's seed) and used to seed the bootstrap.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from probe.forks import fork_mask
from probe.metrics.breadth import budget_record
from probe.metrics.passk import (
    check_k,
    crossover_k,
    default_ks,
    distinct_correct,
    distinct_eligible,
    distinct_rule,
    pass_at_k_per_problem,
    solution_counts,
    subset_label,
)
from probe.sampling.parts import sample_in_parts
from probe.sampling.sampler import Branches, SamplerConfig, sample_branches
from probe.stats import bootstrap_ci
from probe.tasks.protocol import ROLES, Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROLE_CODE: dict[str, int] = {r: i for i, r in enumerate(ROLES)}  # planning 0, execution 1, other 2
PAD_ROLE = -1


@dataclass
class Scored:
    """Per-row verdicts for a `Branches`, rows in the same prompt-major order."""

    completions: list[str]
    """Decoded completion per row (eos and padding stripped), the text the task verified."""
    correct: Bool[Tensor, " rows"]
    """`task.verify(prompt, completion)` per row."""
    canonical: list[Hashable | None]
    """`task.canonical(prompt, completion)` per row; None where the row is not correct."""
    roles: Int[Tensor, "rows new"]
    """Role code per generated token (`ROLE_CODE`), aligned with `branches.tokens`; -1 on padding."""

    @property
    def planning(self) -> Bool[Tensor, "rows new"]:
        return self.roles == ROLE_CODE["planning"]

    @property
    def execution(self) -> Bool[Tensor, "rows new"]:
        return self.roles == ROLE_CODE["execution"]


def _check_layout(branches: Branches, prompts: Sequence[str]) -> int:
    """Validate that `branches` holds n samples of each prompt, prompt-major; return n."""
    n_prompts, rows = len(prompts), branches.tokens.shape[0]
    if n_prompts == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    if rows == 0 or rows % n_prompts:
        raise ValueError(
            f"branches have {rows} rows, not a positive multiple of {n_prompts} prompts"
        )
    n = rows // n_prompts
    want_p = torch.arange(n_prompts).repeat_interleave(n)
    want_s = torch.arange(n).repeat(n_prompts)
    if not (
        torch.equal(branches.prompt_index.cpu().long(), want_p)
        and torch.equal(branches.sample_index.cpu().long(), want_s)
    ):
        raise ValueError(
            f"branches are not {n} samples of each of {n_prompts} prompts in prompt-major order "
            "(row = i * n + j); were they sampled from these prompts?"
        )
    if len(branches.prompt_tokens) != n_prompts or len(branches.finish_reason) != rows:
        raise ValueError(
            f"branches hold {len(branches.prompt_tokens)} prompts and {len(branches.finish_reason)} "
            f"finish reasons; expected {n_prompts} and {rows}"
        )
    return n


def _check_ks(ks: Sequence[int] | None, n: int) -> list[int]:
    if ks is None:
        return default_ks(n)
    return sorted({check_k(k, n) for k in ks})


def score_branches(
    branches: Branches, prompts: Sequence[str], task: Task, tokenizer: Any
) -> Scored:
    """Decode, verify, canonicalise and role-label every row of `branches`."""
    n = _check_layout(branches, prompts)
    tokens, mask = branches.tokens.cpu(), branches.mask.cpu()
    roles = torch.full(tokens.shape, PAD_ROLE, dtype=torch.long)
    roles[mask] = ROLE_CODE["other"]
    completions, correct, keys = [], [], []
    for r in range(tokens.shape[0]):
        pos = mask[r].nonzero().squeeze(1)  # (len,) positions of real tokens
        if branches.finish_reason[r] == "eos":
            pos = pos[:-1]  # the eos token is not part of the completion text
        ids = tokens[r, pos].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        row_roles = list(task.token_roles(tokenizer.convert_ids_to_tokens(ids)))
        if len(row_roles) != len(ids) or not set(row_roles) <= ROLE_CODE.keys():
            raise ValueError(
                f"task.token_roles gave {row_roles!r} for {len(ids)} tokens of row {r}; "
                f"need one of {ROLES} per token"
            )
        roles[r, pos] = torch.tensor([ROLE_CODE[x] for x in row_roles], dtype=torch.long)
        prompt = prompts[r // n]
        ok = bool(task.verify(prompt, text))
        key = task.canonical(prompt, text) if ok else None
        if ok and key is None:
            raise ValueError(
                f"task.verify accepts {text!r} for prompt {prompt!r} but task.canonical returned "
                "None; a valid completion needs a key"
            )
        completions.append(text)
        correct.append(ok)
        keys.append(key)
    return Scored(completions, torch.tensor(correct, dtype=torch.bool), keys, roles)


def _mean_or_none(x: Tensor, where: Tensor) -> float | None:
    return x[where].double().mean().item() if where.any() else None


def diversity_metrics(
    branches: Branches,
    scored: Scored,
    prompts: Sequence[str],
    task: Task,
    *,
    ks: Sequence[int] | None = None,
    rho: float = 0.2,
    n_boot: int = 1000,
    seed: int = 0,
    temperature: float | None = None,
    per_problem: bool = False,
) -> dict[str, Any]:
    """The shared metrics.json record for one model (docs/architecture.md names; JSON-ready values).

    ks: pass@k budgets (default 1, 2, 4, ... <= n plus n); each must be in 1..n. rho: fork
    fraction. n_boot, seed: percentile bootstrap over problems for the `*_ci` entries ([lo, hi],
    95%). temperature, seed: recorded as given (pass the sampler's). per_problem: also return
    `per_problem` = {"n_correct", "distinct_correct", "distinct_eligible", "distinct_rule", "solution_counts"
    (each problem's `probe.metrics.passk.solution_counts`)}, one entry
    per problem in prompt order (for paired bootstraps and paired subsets between models evaluated
    on the same problems, `probe.metrics.breadth.compare_breadth`); `distinct_rule` is True / False where the
    task counts solutions (n_solutions >= 3 or not), None where it cannot.
    """
    n = _check_layout(branches, prompts)
    n_prompts, rows = len(prompts), len(scored.completions)
    if rows != n * n_prompts or scored.roles.shape != branches.tokens.shape:
        raise ValueError(
            f"scored has {rows} rows / roles {tuple(scored.roles.shape)}; branches "
            f"have {n * n_prompts} / {tuple(branches.tokens.shape)}: score these branches"
        )
    ks = _check_ks(ks, n)
    counts = scored.correct.cpu().view(n_prompts, n).sum(1)  # (problems,)
    extra = {1, 64} if n >= 64 else {1}
    per_k = {k: pass_at_k_per_problem(counts, n, k) for k in sorted(set(ks) | extra)}

    def ci(values: Tensor) -> list[float]:
        return list(bootstrap_ci(values, n_boot=n_boot, seed=seed))

    out: dict[str, Any] = {"pass_at_1": per_k[1].mean().item(), "pass_at_1_ci": ci(per_k[1])}
    if n >= 64:
        out["pass_at_64"] = per_k[64].mean().item()
        out["pass_at_64_ci"] = ci(per_k[64])
    out["pass_at_k"] = {str(k): per_k[k].mean().item() for k in ks}
    out["pass_at_k_ci"] = {str(k): ci(per_k[k]) for k in ks}

    rule = distinct_rule(task, prompts)
    eligible = distinct_eligible(rule, counts > 0)  # (problems,) this model's own subset
    distinct = distinct_correct([scored.canonical[i * n : (i + 1) * n] for i in range(n_prompts)])
    picked = distinct[eligible].double()  # (eligible problems,)
    out["distinct_correct_mean"] = picked.mean().item() if len(picked) else None
    out["distinct_correct_mean_ci"] = ci(picked) if len(picked) else None
    out["distinct_correct_n_problems"] = len(picked)
    out["distinct_correct_subset"] = subset_label(rule, paired=False)  # which problems the mean is over
    out["distinct_correct_all_mean"] = distinct.double().mean().item()  # every problem, unsolved = 0

    entropy, mask = branches.entropy.cpu(), branches.mask.cpu()
    if bool(torch.isnan(entropy[mask]).any()):  # not measured (the vLLM engine): None, never NaN or a guess
        out.update(planning_entropy_mean=None, execution_entropy_mean=None, fork_entropy_mean=None)
    else:
        out["planning_entropy_mean"] = _mean_or_none(entropy, scored.planning & mask)
        out["execution_entropy_mean"] = _mean_or_none(entropy, scored.execution & mask)
        out["fork_entropy_mean"] = _mean_or_none(entropy, fork_mask(entropy, mask, rho))
    out.update(budget_record(branches.finish_reason, branches.mask.sum(1).cpu(), branches.tokens.shape[1]))
    out.update(n_problems=n_prompts, n_samples=n, temperature=temperature, seed=seed)
    if per_problem:
        out["per_problem"] = {"n_correct": counts.tolist(), "distinct_correct": distinct.tolist(),
                              "distinct_eligible": eligible.tolist(), "distinct_rule": rule,
                              "solution_counts": [solution_counts(scored.canonical[i * n : (i + 1) * n])
                                                  for i in range(n_prompts)]}
    return out


def evaluate(
    model: Any, tokenizer: Any, prompts: Sequence[str], task: Task, cfg: SamplerConfig,
    intervention: Any = None, engine: Any = None, parts_dir: str | os.PathLike | None = None, identity: str = "",
    **kw: Any
) -> tuple[dict[str, Any], Branches, Scored]:
    """Sample `cfg.n` branches per prompt (with the sampler's `intervention`, e.g. a steering
    hook), score them, and compute `diversity_metrics` (kw go there).

    `engine`: None samples `model` with the built-in sampler; an engine with the same `sample(prompts,
    cfg, intervention)` (a `probe.sampling.vllm_engine.VLLMEngine`) samples instead, `model` unused.
    Both return the same `Branches`, so the metrics are computed by the same code either way.
    `parts_dir` (built-in sampler only): sample in parts saved there as they finish, resuming from the
    parts already there (`probe.sampling.parts.sample_in_parts`, fingerprinted with `identity`)."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    _check_ks(kw.get("ks"), cfg.n)  # fail before spending time on sampling
    if engine is None and parts_dir is not None:
        branches = sample_in_parts(model, tokenizer, list(prompts), cfg, parts_dir, intervention=intervention,
                                   identity=identity)
    elif engine is None:
        branches = sample_branches(model, tokenizer, list(prompts), cfg, intervention=intervention)
    else:
        branches = engine.sample(list(prompts), cfg, intervention=intervention)
    scored = score_branches(branches, prompts, task, tokenizer)
    metrics = diversity_metrics(
        branches, scored, prompts, task, temperature=cfg.temperature, seed=cfg.seed, **kw
    )
    return metrics, branches, scored


def plot_pass_at_k(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Figure:
    """Plot pass@k against k (log2 x axis) for each model's metrics dict, with CI bands.

    curves: model name -> a `diversity_metrics` dict (or one read back from JSON). Where one curve
    overtakes another (`crossover_k`), the k is marked and labelled. The PNG is written atomically
    (temporary file in the same directory, then `os.replace`). Returns the figure.
    """
    from probe.figures import new_figure, save_figure_atomic

    if not curves:
        raise ValueError("no curves to plot; pass {model name: metrics dict}")
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    points: dict[str, dict[int, float]] = {}
    for name, metrics in curves.items():
        if "pass_at_k" not in metrics:
            raise KeyError(f"metrics for {name!r} lack 'pass_at_k'; pass diversity_metrics output")
        pts = points[name] = {int(k): float(v) for k, v in metrics["pass_at_k"].items()}
        ks = sorted(pts)
        (line,) = ax.plot(ks, [pts[k] for k in ks], marker="o", ms=3, label=name)
        band = {int(k): v for k, v in (metrics.get("pass_at_k_ci") or {}).items()}
        if all(k in band for k in ks):
            lo, hi = ([band[k][i] for k in ks] for i in (0, 1))
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    crossings = [(a, b, crossover_k(pa, pb)) for a, pa in points.items() for b, pb in points.items() if a != b]
    crossings = [(a, b, k) for a, b, k in crossings if k is not None]
    for i, (a, b, k) in enumerate(crossings):  # stacked labels so several crossings stay legible
        ax.axvline(k, color="gray", ls=":", lw=1)
        ax.annotate(f"{b} overtakes {a} at k={k}", (k, points[b][k]), xytext=(6, -18 - 11 * i),
                    textcoords="offset points", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure_atomic(fig, path)
    return fig

"""Breadth compared across models: the paired distinct-correct subset, coverage, and the token budget.

What it is: arithmetic on the metrics dicts of `probe.metrics.evaluate.diversity_metrics` (evaluated with
`per_problem=True`), one per model, every model on the same problems with the same n. No sampling.
`compare_breadth` gives the numbers a comparison of breadth may quote; `check_truncation` says
which models the token budget cut off, and `eos_by_budget` what a smaller budget would have cut
(how to choose one: a run at a generous budget shows where the eos share stops rising).

What it is not: a sampler or a scorer. Distinct-correct per problem, the subsets, pass@k and the
rarefaction come from `probe.metrics.passk`; this module pairs them across models, matches their
correct-sample counts (`matched_distinct`) and reads the token budget (`eos_by_budget`).

Why both (issue #23): on a task that cannot count its solutions (a math file) each model's
`distinct_correct_mean` is over the problems *it* solved, so two models' means are over different
problems: a model that solves more problems, most of them once, can look broader than one whose
entropy is far higher. A comparison therefore averages every model over the problems eligible for
all of them (`probe.metrics.passk.paired_eligible`: the task's n_solutions >= 3 rule where it has one,
the same for every model, else the problems every compared model solved at least once), and
reports beside it distinct-correct over every problem (an unsolved one counting 0) and coverage
at k (the share of problems some of k samples solves: the unbiased pass@k, `pass_at_k` as is).
And a model that runs out of tokens is not searching: when more than `TRUNCATION_LIMIT` of a
model's samples end at the budget without eos, its breadth numbers measure verbosity.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from probe.metrics.passk import paired_eligible, rarefied_distinct, subset_label

TRUNCATION_LIMIT = 0.10
"""Largest share of a model's samples that may end at the token budget before breadth is flagged."""
COVERAGE_NOTE = ("coverage at k (problems solved by at least one of k samples, expected over k-subsets of the n) "
                 "is the unbiased pass@k")
UNRECORDED = "eligible for every model (rule not recorded: older per_problem records lack distinct_rule)"


class TruncationWarning(UserWarning):
    """More than `TRUNCATION_LIMIT` of some model's samples ended at the token budget."""


def _per_problem(name: str, m: Mapping[str, Any]) -> Mapping[str, list]:
    if "per_problem" not in m:
        raise KeyError(f"metrics of {name!r} lack 'per_problem'; evaluate with diversity_metrics(..., per_problem=True)")
    return m["per_problem"]


def compare_breadth(models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Breadth of several models on the same problems, averaged over the same problems.

    models: name -> metrics dict with `per_problem` (lists of P entries: `n_correct`,
    `distinct_correct`, `distinct_eligible`, optionally `distinct_rule`); counts may be means over
    seeds. Returns JSON-ready:
    - `distinct_correct_mean` {name: mean over the paired subset, None if it is empty}: the number
      to compare; `distinct_correct_subset` (words) and `distinct_correct_n_problems` say which.
    - `distinct_correct_all_mean` {name: mean over all P problems, unsolved = 0}.
    - `distinct_correct_own_mean` / `distinct_correct_own_n_problems` {name: each model's mean over
      its own subset, and its size}: what a single-model metrics.json reports, for contrast.
    - `distinct_correct_matched`: `matched_distinct` of the models' `solution_counts` (None where
      some model's per_problem lacks them).
    - `solved` {name: problems with a correct sample}, `coverage_at_k` {name: {k: pass@k}}
      (`COVERAGE_NOTE`), `truncated_share` {name: share or None when not recorded}, `n_problems`.
    Raises if the models were evaluated on different numbers of problems or samples.
    """
    if not models:
        raise ValueError("no models to compare; pass {name: metrics dict with per_problem}")
    pp = {k: _per_problem(k, m) for k, m in models.items()}
    sizes = {k: len(v["n_correct"]) for k, v in pp.items()}
    ns = {k: m.get("n_samples") for k, m in models.items()}
    if len(set(sizes.values())) != 1 or len(set(ns.values())) != 1:
        raise ValueError(f"models were evaluated on different problems or sample counts (problems {sizes}, n {ns}); "
                         "evaluate every model on the same prompts with the same n")
    own = torch.tensor([v["distinct_eligible"] for v in pp.values()], dtype=torch.bool)  # (models, P)
    paired = paired_eligible(own)  # (P,)
    rules = [v.get("distinct_rule") for v in pp.values()]
    if any(r is None for r in rules):
        label = UNRECORDED
    elif any(r != rules[0] for r in rules):
        raise ValueError("models disagree on which problems the task can count solutions for (distinct_rule); "
                         "were they evaluated on the same task and prompts?")
    else:
        label = subset_label(rules[0], paired=True)
    dist = {k: torch.tensor(v["distinct_correct"], dtype=torch.float64) for k, v in pp.items()}  # (P,) each

    def mean(x: torch.Tensor, where: torch.Tensor) -> float | None:
        return x[where].mean().item() if where.any() else None

    names = list(models)
    return {
        "models": names,
        "distinct_correct_matched": matched_distinct({k: v.get("solution_counts") for k, v in pp.items()}),
        "n_problems": next(iter(sizes.values())),
        "distinct_correct_subset": label,
        "distinct_correct_n_problems": int(paired.sum()),
        "distinct_correct_mean": {k: mean(dist[k], paired) for k in names},
        "distinct_correct_all_mean": {k: dist[k].mean().item() for k in names},
        "distinct_correct_own_mean": {k: mean(dist[k], own[i]) for i, k in enumerate(names)},
        "distinct_correct_own_n_problems": {k: int(own[i].sum()) for i, k in enumerate(names)},
        "solved": {k: sum(c > 0 for c in pp[k]["n_correct"]) for k in names},
        "coverage_at_k": {k: dict(models[k].get("pass_at_k") or {}) for k in names},
        "coverage_note": COVERAGE_NOTE,
        "truncated_share": {k: models[k].get("truncated_share") for k in names},
    }


MATCHED_NOTE = ("distinct solutions among m correct samples per problem, m = the fewest correct samples any compared "
                "model has on it (expected over draws without replacement: rarefaction); problems where every model "
                "has >= 2 correct samples")


def matched_distinct(counts: Mapping[str, Sequence[Sequence[int]] | None]) -> dict[str, Any] | None:
    """Distinct-correct at matched numbers of correct samples, per model, over the same problems.

    counts: name -> per problem the `probe.metrics.passk.solution_counts` of that model (P lists);
    None for a model that did not record them. On each problem where every model has at least 2
    correct samples, m = the smallest number of correct samples among the models, and each model
    scores `rarefied_distinct(its counts, m)`. Returns {"mean": {name: mean over those problems or
    None}, "per_problem_m_mean": mean m, "n_problems", "note": `MATCHED_NOTE`, "per_problem": {name:
    the scores, problem by problem, in the same order for every model}}, or None when some model has
    no counts. Unlike distinct-correct over the paired subset, a model with more correct
    samples does not score higher for that alone (on a math file nearly every correct completion is
    worded differently, so distinct-correct tracks the number of correct samples).
    """
    if not counts or any(v is None for v in counts.values()):
        return None
    sizes = {k: len(v) for k, v in counts.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"solution_counts cover different numbers of problems: {sizes}")
    names = list(counts)
    scores: dict[str, list[float]] = {k: [] for k in names}
    ms = []
    for p in range(next(iter(sizes.values()))):
        m = min(sum(counts[k][p]) for k in names)
        if m < 2:
            continue
        ms.append(m)
        for k in names:
            scores[k].append(rarefied_distinct(counts[k][p], m))
    return {"mean": {k: (sum(v) / len(v) if v else None) for k, v in scores.items()},
            "per_problem_m_mean": sum(ms) / len(ms) if ms else None, "n_problems": len(ms), "note": MATCHED_NOTE,
            "per_problem": scores}


def budget_record(finish_reason: Sequence[str], lengths: Int[Tensor, " rows"], max_new_tokens: int) -> dict[str, Any]:
    """How the token budget ended a set of samples: `fraction_finished_eos`, `truncated_share` (finish
    reason "length": cut at `max_new_tokens` without eos) and `eos_by_budget` (`eos_by_budget`).
    finish_reason: per row, as `probe.sampling.sampler.Branches` records it; lengths: generated
    tokens per row."""
    rows = len(finish_reason)
    if rows == 0 or rows != len(lengths):
        raise ValueError(f"{rows} finish reasons for {len(lengths)} lengths: one of each per sampled row")
    at_eos = torch.tensor([f == "eos" for f in finish_reason], dtype=torch.bool)
    return {"fraction_finished_eos": int(at_eos.sum()) / rows,
            "truncated_share": sum(f == "length" for f in finish_reason) / rows,
            "eos_by_budget": eos_by_budget(torch.as_tensor(lengths), at_eos, max_new_tokens)}


def eos_by_budget(lengths: Int[Tensor, " rows"], finished: Bool[Tensor, " rows"], max_new_tokens: int,
                  budgets: Sequence[int] | None = None) -> dict[str, float]:
    """Share of rows that would have ended at eos under each smaller token budget, from one run.

    lengths: generated tokens per row (the eos token included); finished: the row ended at eos
    (else at the budget); max_new_tokens: the run's budget; budgets: those to report (each
    <= max_new_tokens; default 16, 32, 64, ... below it, and it). Returns {str(budget): share of
    rows with eos among their first `budget` tokens}. Exact, not an estimate, for the built-in
    sampler: it draws a row's token t from (seed, prompt, sample, t) alone, so a run at a smaller
    budget writes the same first tokens (on vLLM, whose randomness is per request, it is what a
    budget cut at b would have kept of these samples). Where the share stops rising with the budget, the
    samples still running do not end (runaway generation), and a larger budget will not finish them.
    """
    if lengths.shape != finished.shape or lengths.ndim != 1:
        raise ValueError(f"lengths {tuple(lengths.shape)} and finished {tuple(finished.shape)} must be the same (rows,)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if budgets is None:
        budgets = [b for b in (2 ** i for i in range(4, 20)) if b < max_new_tokens] + [max_new_tokens]
    elif not all(1 <= b <= max_new_tokens for b in budgets):
        raise ValueError(f"budgets {list(budgets)} must lie in [1, max_new_tokens={max_new_tokens}]: a run cannot "
                         "say what a larger budget would have finished")
    rows = max(len(lengths), 1)
    return {str(b): int((finished & (lengths <= b)).sum()) / rows for b in budgets}


PLATEAU = 0.02
"""A doubling of the budget that finishes fewer than this share of samples more counts as no gain."""


def budget_note(name: str, by_budget: Mapping[str, float]) -> str | None:
    """A sentence on what the last doubling of `name`'s budget bought (`eos_by_budget`'s dict: from
    the largest budget at most half the run's to the run's), saying when it bought less than
    `PLATEAU`: then a larger budget will not finish the rest. None with no such pair of budgets."""
    pts = sorted((int(b), v) for b, v in by_budget.items())
    if len(pts) < 2:
        return None
    (b2, v2) = pts[-1]
    half = [(b, v) for b, v in pts[:-1] if 2 * b <= b2]  # at least a doubling below the run's budget
    if not half:
        return None
    b1, v1 = half[-1]
    text = f"{name}'s budget {b1} -> {b2} tokens finished {v1:.1%} -> {v2:.1%} of its samples at eos"
    if v2 - v1 < PLATEAU:
        text += " (the rest do not end: a larger budget will not finish them)"
    return text


def check_truncation(shares: Mapping[str, float | None], limit: float = TRUNCATION_LIMIT,
                     by_budget: Mapping[str, Mapping[str, float] | None] | None = None) -> dict[str, Any]:
    """Which models ended more than `limit` of their samples at the token budget.

    shares: name -> `truncated_share` (None: not recorded, e.g. results written before it existed).
    by_budget: name -> `eos_by_budget` dict (optional): the message then says what the last doubling
    of each flagged model's budget bought (`budget_note`).
    Returns {"limit", "truncated_share", "over_limit": [names], "unknown": [names], "message": a
    sentence naming the models, their shares and the fix, or None when none is over the limit,
    "eos_by_budget": by_budget as given ({} when not)}.
    """
    if not 0 <= limit < 1:
        raise ValueError(f"limit={limit} must be in [0, 1); {TRUNCATION_LIMIT} is the default")
    bad = {k: v for k, v in shares.items() if v is not None and v > limit}
    message = None
    if bad:
        who = ", ".join(f"{k} {v:.1%}" for k, v in bad.items())
        message = (f"samples that ended at the token budget (max_new_tokens) without eos: {who}, more than "
                   f"{limit:.0%}; their breadth numbers (pass@k, distinct-correct) then measure verbosity, not search. "
                   "Fix: raise the budget (e.g. --task 'math:FILE,max_new_tokens=N') until at least "
                   f"{1 - limit:.0%} of every model's samples finish at eos, or state why it cannot")
        notes = [budget_note(k, (by_budget or {}).get(k) or {}) for k in bad]
        if any(notes):
            message += ". " + "; ".join(n for n in notes if n)
    return {"limit": limit, "truncated_share": dict(shares), "over_limit": list(bad),
            "unknown": [k for k, v in shares.items() if v is None], "message": message,
            "eos_by_budget": {k: dict(v) for k, v in (by_budget or {}).items() if v is not None}}


def warn_if_truncated(shares: Mapping[str, float | None], where: str, limit: float = TRUNCATION_LIMIT,
                      by_budget: Mapping[str, Mapping[str, float] | None] | None = None) -> dict[str, Any]:
    """`check_truncation(shares, limit, by_budget)`, issuing a `TruncationWarning` (prefixed by `where`,
    e.g. "forksight run") when some model is over the limit; returns the check."""
    check = check_truncation(shares, limit, by_budget)
    if check["message"]:
        warnings.warn(f"{where}: {check['message']}", TruncationWarning, stacklevel=2)
    return check

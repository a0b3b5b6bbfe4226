"""The base-minus-RL distinct-correct gap that C4 and C5 judge, in the measure the task allows.

What it is: `breadth_gap(base, rl)` (at matched numbers of correct samples where the task cannot count
its solutions, else over the paired subset: `distinct_gap_ci`), with its paired interval over
problems (`paired_gap`), from two held-out metrics dicts with `per_problem`
(`probe.metrics.evaluate.diversity_metrics(..., per_problem=True)`).

What it is not: a claim (`experiments.study.claims` states C4 and C5 from these numbers) or the
sweep's own gap (`probe.metrics.frontier.compare_to_frontier`'s `distinct_gap`, per seed).
"""

from __future__ import annotations

from typing import Any

import torch

from probe.metrics.breadth import compare_breadth
from probe.metrics.passk import paired_eligible
from probe.stats import format_number, paired_ci


def per_problem_of(m: dict) -> dict[str, list]:
    """`m["per_problem"]`, or a KeyError naming the fix."""
    if "per_problem" not in m:
        raise KeyError("metrics lack 'per_problem'; evaluate with diversity_metrics(..., per_problem=True)")
    return m["per_problem"]


def breadth_gap(base: dict, rl: dict, seed: int = 0) -> dict[str, Any]:
    """Base minus RL distinct-correct in the measure the task allows, with its paired interval.

    Where the task cannot count its solutions (every `distinct_rule` None: a math file) and both
    metrics hold `solution_counts`: at matched numbers of correct samples
    (`probe.metrics.breadth.matched_distinct`), the measure the steering sweep's frontier uses there;
    else over the paired subset (`distinct_gap_ci`). Returns gap, gap_ci (None, None when no
    problem counts), measure ("matched" / "paired"), over (words for the problems), used (the two
    means, subset and n_problems), paired (the paired subset's means), matched, uncountable, breadth
    (`compare_breadth` of the two)."""
    br = compare_breadth({"base": base, "rl": rl})
    matched = br["distinct_correct_matched"]
    rule = per_problem_of(base).get("distinct_rule")
    uncountable = rule is not None and all(r is None for r in rule)
    paired = {**br["distinct_correct_mean"], "subset": br["distinct_correct_subset"],
              "n_problems": br["distinct_correct_n_problems"]}
    if uncountable and matched is not None:  # every correct completion differs: compare at matched counts
        gap, gap_ci = paired_gap((matched["per_problem"]["base"], matched["per_problem"]["rl"]), seed)
        m_mean = format_number(matched["per_problem_m_mean"], 1)
        return {"gap": gap, "gap_ci": gap_ci, "measure": "matched", "paired": paired, "matched": matched,
                "uncountable": True, "breadth": br,
                "over": f" at matched counts (m = {m_mean} correct samples) over {matched['n_problems']} problems",
                "used": {**matched["mean"], "n_problems": matched["n_problems"],
                         "subset": (f"matched numbers of correct samples (mean m = {m_mean}) on the problems where both "
                                    "have >= 2 correct samples")}}
    gap, gap_ci = distinct_gap_ci(base, rl, seed)  # counts missing (older cells): the paired mean, flagged by C4
    return {"gap": gap, "gap_ci": gap_ci, "measure": "paired", "paired": paired, "matched": matched,
            "uncountable": uncountable, "breadth": br, "used": paired,
            "over": f" over {br['distinct_correct_n_problems']} problems ({br['distinct_correct_subset']})"}


def distinct_gap_ci(base: dict, rl: dict, seed: int = 0) -> tuple[float | None, list | None]:
    """Mean distinct-correct of base minus RL over the problems eligible for both
    (`probe.metrics.passk.paired_eligible`: the task's rule where it counts solutions, else the problems
    both models solved), with its paired interval; (None, None) when that subset is empty."""
    pb, pr = per_problem_of(base), per_problem_of(rl)
    both = paired_eligible(torch.tensor([pb["distinct_eligible"], pr["distinct_eligible"]], dtype=torch.bool))
    elig = both.nonzero().flatten().tolist()
    return paired_gap(([pb["distinct_correct"][i] for i in elig], [pr["distinct_correct"][i] for i in elig]), seed)


def paired_gap(cols: tuple[list[float], list[float]], seed: int = 0) -> tuple[float | None, list | None]:
    """Mean of cols[0] minus cols[1] (the same problems, in the same order) with its paired interval;
    (None, None) for no problems."""
    if not cols[0]:
        return None, None
    return (sum(cols[0]) - sum(cols[1])) / len(cols[0]), list(paired_ci(cols, lambda x: (x[:, 0] - x[:, 1]).mean(), seed))

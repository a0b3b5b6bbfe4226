"""Paired breadth (issue #23): models that solve different problems are compared on the same ones,
and samples cut off by the token budget are counted and flagged.

The constructed pair (a task that cannot count its solutions, like a math file; 8 problems, n = 4):
problems 0-1 both models solve (base 3 distinct each, RL 2); problems 2-3 only the base (1 each);
problems 4-7 only RL (3 each). Each model's own mean says RL is broader (2.67 vs 2.00); over the
problems both solve the base is broader (3 vs 2), which is what the comparison must report.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from experiments.study import claims as C
from experiments.study.breadth_gap import distinct_gap_ci
from experiments.study.report import write_report
from experiments.study.truncation import claim_models, flag_truncation, truncation_by_model
from probe.metrics.breadth import (
    TRUNCATION_LIMIT,
    TruncationWarning,
    budget_note,
    budget_record,
    check_truncation,
    compare_breadth,
    eos_by_budget,
    matched_distinct,
    warn_if_truncated,
)
from probe.metrics.frontier import compare_to_frontier, mixture_curve, summary
from probe.metrics.outcomes import Outcomes, stack
from probe.metrics.passk import (
    distinct_eligible,
    paired_eligible,
    pass_at_k_curve,
    rarefied_distinct,
    solution_counts,
)

N = 4
BASE_DISTINCT = [3, 3, 1, 1, 0, 0, 0, 0]
RL_DISTINCT = [2, 2, 0, 0, 3, 3, 3, 3]


def _keys(distinct: list[int]) -> list[list[str | None]]:
    """n = 4 samples per problem: `d` distinct correct keys, then repeats of the last (or all wrong)."""
    rows = []
    for i, d in enumerate(distinct):
        row = [f"p{i}k{j}" for j in range(d)]
        rows.append(row + [row[-1] if row else None] * (N - d))
    return rows


def _metrics(distinct: list[int], rule: list[bool | None]) -> dict:
    """A metrics dict as `diversity_metrics(..., per_problem=True)` writes it, from the outcomes."""
    keys = _keys(distinct)
    correct = torch.tensor([[k is not None for k in row] for row in keys])
    eligible = distinct_eligible(rule, correct.any(1))
    curve = pass_at_k_curve(correct)
    return {"n_samples": N, "pass_at_1": curve[1], "pass_at_k": {str(k): v for k, v in curve.items()},
            "distinct_correct_mean": torch.tensor(distinct, dtype=torch.float64)[eligible].mean().item(),
            "truncated_share": 0.0,
            "per_problem": {"n_correct": correct.sum(1).tolist(), "distinct_correct": list(distinct),
                            "distinct_eligible": eligible.tolist(), "distinct_rule": list(rule)}}


UNKNOWN = [None] * 8


def test_paired_subset_is_the_problems_every_model_solved_and_its_mean_differs_from_each_models_own():
    base, rl = _metrics(BASE_DISTINCT, UNKNOWN), _metrics(RL_DISTINCT, UNKNOWN)
    assert (base["distinct_correct_mean"], rl["distinct_correct_mean"]) == (pytest.approx(2.0), pytest.approx(16 / 6)), \
        "premise: per-model means over each model's own solved problems say RL is broader"
    br = compare_breadth({"base": base, "rl": rl})
    assert br["distinct_correct_n_problems"] == 2
    assert br["distinct_correct_subset"] == "problems every compared model solved (n_solutions unknown)"
    assert br["distinct_correct_mean"] == {"base": 3.0, "rl": 2.0}, "over problems 0-1 only, the same for both"
    assert br["distinct_correct_own_mean"] == {"base": pytest.approx(2.0), "rl": pytest.approx(16 / 6)}
    assert br["distinct_correct_own_n_problems"] == {"base": 4, "rl": 6}
    assert br["distinct_correct_all_mean"] == {"base": 1.0, "rl": 2.0}, "every problem, unsolved counting 0"
    assert br["solved"] == {"base": 4, "rl": 6} and br["n_problems"] == 8
    assert br["coverage_at_k"]["rl"][str(N)] == pytest.approx(6 / 8), "coverage at n = share of problems solved"
    assert br["coverage_at_k"]["base"] == base["pass_at_k"], "coverage at k is the unbiased pass@k, not a copy of it"


def test_c4_uses_the_paired_mean_not_the_per_model_means_nor_the_union():
    base, rl = _metrics(BASE_DISTINCT, UNKNOWN), _metrics(RL_DISTINCT, UNKNOWN)
    c4 = C.claim_breadth(base, rl)
    assert c4.effect["value"] == pytest.approx(2.0 - 3.0), (
        "C4's effect is RL minus base over the problems both solved (-1); the per-model means give +0.67 and the "
        "union of solved problems (unsolved = 0) +1: both would report breadth RL lost as breadth it gained")
    ev = c4.evidence["distinct_correct_mean"]
    assert (ev["base"], ev["rl"], ev["n_problems"]) == (3.0, 2.0, 2) and "every compared model solved" in ev["subset"]
    assert ev["relative_change"] == pytest.approx(-1 / 3)
    assert c4.evidence["distinct_correct_own_subsets"]["rl"] == pytest.approx(16 / 6)
    assert "over 2 problems" in c4.reason, "the reason names the subset the number is over"
    gap, _ = distinct_gap_ci(base, rl)
    assert gap == pytest.approx(1.0), "C5's breadth gap is over the same paired subset"


def test_c4_with_no_problem_both_models_solved_has_no_breadth_effect():
    base, rl = _metrics([2, 0], [None] * 2), _metrics([0, 3], [None] * 2)  # disjoint solved sets
    c4 = C.claim_breadth(base, rl)
    assert c4.effect["value"] is None and c4.effect["ci"] is None and c4.status == "inconclusive", \
        "an empty paired subset is no evidence either way (not a change of 0)"
    assert "over 0 problems" in c4.reason and c4.evidence["distinct_correct_mean"]["relative_change"] is None
    assert distinct_gap_ci(base, rl) == (None, None)


def test_a_task_with_a_rule_keeps_it_for_every_model():
    rule = [True, True, True, False, True, True, True, False]  # n_solutions >= 3 known for every problem
    base, rl = _metrics(BASE_DISTINCT, rule), _metrics(RL_DISTINCT, rule)
    br = compare_breadth({"base": base, "rl": rl})
    assert br["distinct_correct_subset"] == "n_solutions>=3" and br["distinct_correct_n_problems"] == 6
    assert br["distinct_correct_mean"] == {"base": pytest.approx(base["distinct_correct_mean"]),
                                           "rl": pytest.approx(rl["distinct_correct_mean"])}, \
        "with a rule the subset is already the same for both: the paired mean is each model's own (Countdown)"
    assert C.claim_breadth(base, rl).effect["value"] == pytest.approx(13 / 6 - 7 / 6), "unsolved eligible problems count 0"


def test_paired_eligible_and_its_errors():
    own = torch.tensor([[True, True, False], [True, False, False]])
    assert paired_eligible(own).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="models, problems"):
        paired_eligible(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="rule has 2 problems"):
        distinct_eligible([None, True], torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="different problems"):
        compare_breadth({"a": _metrics([1, 2], [None] * 2), "b": _metrics(BASE_DISTINCT, UNKNOWN)})
    with pytest.raises(KeyError, match="per_problem=True"):
        compare_breadth({"a": {"n_samples": 4}})


def test_frontier_averages_base_rl_mixture_and_cell_over_the_problems_both_solved():
    b, r = Outcomes(_keys(BASE_DISTINCT), UNKNOWN), Outcomes(_keys(RL_DISTINCT), UNKNOWN)
    assert summary(b)["distinct_correct_mean"] == pytest.approx(2.0), "alone, a model keeps its own subset"
    curve = mixture_curve(b, r, ms=[0, N])
    assert [c["distinct_correct_mean"] for c in curve] == [2.0, 3.0], "the ends are RL and base on problems 0-1"
    explicit = [i < 2 for i in range(8)]  # the paired subset written out as a rule: the oracle
    want = compare_to_frontier(Outcomes(_keys(RL_DISTINCT), explicit), Outcomes(b.keys, explicit),
                               Outcomes(r.keys, explicit), n_boot=200, seed=3)
    got = compare_to_frontier(r, b, r, n_boot=200, seed=3)
    for k in ("restoration_distinct", "restoration_distinct_ci", "frontier_excess", "frontier_excess_ci",
              "distinct_correct_mean", "n_boot_used"):
        assert got[k] == want[k], k
    assert got["distinct_correct_mean"] == 2.0 and got["distinct_correct_n_problems"] == 2
    assert got["distinct_measure"] == "matched" and "same number of correct samples" in got["distinct_correct_subset"], \
        "a task that cannot count solutions compares at matched counts (here every solved row has 4 correct samples)"
    old = compare_to_frontier(Outcomes(r.keys, [True] * 8), Outcomes(b.keys, [True] * 8), Outcomes(r.keys, [True] * 8),
                              n_boot=20)
    assert old["distinct_correct_mean"] == 2.0 and mixture_curve(Outcomes(b.keys, [True] * 8), Outcomes(
        r.keys, [True] * 8), ms=[N])[0]["distinct_correct_mean"] == 1.0, "vacuity: all problems would differ"


def test_stacked_seeds_pair_a_problem_solved_at_any_seed():
    rule = [None, None, True]  # a task that counts only problem 2's solutions: the paired subset elsewhere
    b1 = Outcomes(_keys([2, 0, 3]), rule)
    b2 = Outcomes(_keys([0, 2, 3]), rule)  # the base solves problem 1 only at the second seed
    r = Outcomes(_keys([1, 1, 1]), rule)
    base, clusters = stack([b1, b2])
    rl, _ = stack([r, r])
    out = compare_to_frontier(rl, base, rl, n_boot=10, clusters=clusters)
    assert out["distinct_measure"] == "paired" and out["distinct_correct_n_problems"] == 3, \
        "every problem: each model solved problems 0-1 at some seed, problem 2 counts by the rule"
    assert mixture_curve(base, rl, ms=[N], clusters=clusters)[0]["distinct_correct_mean"] == pytest.approx(10 / 6)
    assert mixture_curve(base, rl, ms=[N])[0]["distinct_correct_mean"] == pytest.approx(2.5), \
        "vacuity: row by row only the rows the base solved would count"


def test_matched_measure_counts_the_rows_where_both_have_two_correct():
    b1, b2 = Outcomes(_keys([2, 0]), [None, None]), Outcomes(_keys([0, 2]), [None, None])
    r = Outcomes(_keys([1, 1]), [None, None])
    base, clusters = stack([b1, b2])
    rl, _ = stack([r, r])
    out = compare_to_frontier(rl, base, rl, n_boot=10, clusters=clusters)
    assert out["distinct_measure"] == "matched" and out["distinct_correct_n_problems"] == 2
    assert mixture_curve(base, rl, ms=[N], clusters=clusters)[0]["distinct_correct_mean"] == pytest.approx(2.0), \
        "a seed where the base solved nothing cannot be compared at matched counts: only the two solved rows count"


# --- truncation ------------------------------------------------------------------------------------
def test_check_truncation_flags_over_the_limit_only_and_names_the_fix():
    ok = check_truncation({"base": TRUNCATION_LIMIT, "rl": 0.01})
    assert ok["over_limit"] == [] and ok["message"] is None, "exactly 10% is within the limit"
    bad = check_truncation({"base": 0.78, "rl": 0.01, "old": None})
    assert bad["over_limit"] == ["base"] and bad["unknown"] == ["old"]
    assert "base 78.0%" in bad["message"] and "max_new_tokens" in bad["message"] and "rl" not in bad["message"]
    with pytest.warns(TruncationWarning, match="forksight run: .*base 78.0%"):
        warn_if_truncated({"base": 0.78}, "forksight run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_truncated({"base": 0.05, "rl": None}, "forksight run")  # no warning
    with pytest.raises(ValueError, match="limit=1.5"):
        check_truncation({}, limit=1.5)


def test_truncation_by_model_pools_test_seeds_and_unknown_stays_unknown():
    def cell(family, spec, seed, share, half="test"):
        return {"half": half, "family": family, "spec": spec, "seed": seed, **({} if share is None else
                {"truncated_share": share, "eos_by_budget": {"16": 0.5 * (1 - share), "32": 1 - share}})}
    cells = [cell("reference", {"model": "base"}, 1000, 0.7), cell("reference", {"model": "base"}, 1001, 0.9),
             cell("reference", {"model": "base"}, 0, 0.0, half="selection"),
             cell("reference", {"model": "rl"}, 1000, 0.0), cell("reference", {"model": "rl"}, 1001, None),
             cell("variant", {"method": "rl-x"}, 1000, 0.2)]
    shares, budgets = truncation_by_model(cells, ["runs/rl-x"])
    assert shares == {"base": pytest.approx(0.8), "rl": None, "rl-x": 0.2}
    steer = {"best": {"truncated_share": 0.3}, "best_goal": None, "temperature_baseline": {"pass_at_1": 0.1}}
    with_steered, _ = truncation_by_model(cells, ["runs/rl-x"], steer)
    assert with_steered == {**shares, "rl steered (best)": 0.3, "rl at matched T": None}, \
        "the steered test measurements join (unknown stays unknown; a missing pick adds no model)"
    assert budgets["base"] == {"16": pytest.approx(0.1), "32": pytest.approx(0.2)}
    assert budgets["rl"] is None and budgets["rl-x"] == {"16": pytest.approx(0.4), "32": pytest.approx(0.8)}


def test_eos_by_budget_counts_rows_ended_within_each_budget():
    lengths = torch.tensor([3, 16, 17, 40, 100, 100])
    finished = torch.tensor([True, True, True, True, True, False])
    assert eos_by_budget(lengths, finished, 100) == {"16": 2 / 6, "32": 3 / 6, "64": 4 / 6, "100": 5 / 6}
    rec = budget_record(["eos"] * 5 + ["length"], lengths, 100)
    assert rec == {"fraction_finished_eos": 5 / 6, "truncated_share": 1 / 6,
                   "eos_by_budget": eos_by_budget(lengths, finished, 100)}
    with pytest.raises(ValueError, match="one of each"):
        budget_record(["eos"], lengths, 100)
    assert eos_by_budget(lengths[:1], finished[:1], 16) == {"16": 1.0}
    with pytest.raises(ValueError, match="same"):
        eos_by_budget(lengths, finished[:2], 100)
    with pytest.raises(ValueError, match="larger budget"):
        eos_by_budget(lengths, finished, 100, budgets=(50, 200))


def test_eos_by_budget_of_one_run_is_what_a_run_at_the_smaller_budget_finishes():
    from experiments.paths import ORGANISMS_DIR
    from probe.models.checkpoint import load_causal_lm
    from probe.sampling.sampler import SamplerConfig, sample_branches
    from probe.tasks import load_task

    model, tok = load_causal_lm(ORGANISMS_DIR / "base")
    task = load_task("countdown")
    prompts = task.heldout_prompts(6)
    long = sample_branches(model, tok, prompts, SamplerConfig(n=4, max_new_tokens=40, seed=3))
    short = sample_branches(model, tok, prompts, SamplerConfig(n=4, max_new_tokens=12, seed=3, batch_size=5))
    by = eos_by_budget(long.mask.sum(1), torch.tensor([f == "eos" for f in long.finish_reason]), 40, budgets=(12, 40))
    assert by["12"] == short.finish_reason.count("eos") / len(short.finish_reason)
    assert 0 < by["12"] < by["40"], "the organism needs more than 12 tokens for some samples"


def test_the_truncation_message_says_what_the_last_doubling_bought():
    flat = {"256": 0.55, "512": 0.72, "1024": 0.73}
    check = check_truncation({"base": 0.27, "rl": 0.0}, by_budget={"base": flat, "rl": {"512": 1.0, "1024": 1.0}})
    assert "base's budget 512 -> 1024 tokens finished 72.0% -> 73.0%" in check["message"]
    assert "a larger budget will not finish them" in check["message"] and "rl's budget" not in check["message"]
    rising = check_truncation({"base": 0.27}, by_budget={"base": {"512": 0.5, "1024": 0.73}})["message"]
    assert "50.0% -> 73.0%" in rising and "will not finish" not in rising
    assert budget_note("base", {"1024": 0.7}) is None and budget_note("base", {"600": 0.2, "1024": 0.7}) is None
    odd = budget_note("base", {"128": 0.5, "256": 0.80, "300": 0.81})  # a budget that is not a power of two
    assert "128 -> 300 tokens" in odd and "will not finish" not in odd, "compared over at least a doubling"


def _results(claims: list[dict], truncation: dict) -> dict:
    return {"question": "q?", "task": "math:f.jsonl", "pair": {"base": "b", "rl": "r", "variants": []},
            "claims": claims, "headline": {"truncated_share": truncation["truncated_share"]},
            "truncation": truncation, "stages": {"steer": "steer/metrics.json"},
            "sae": {"hook_name": "blocks.0.hook_resid_post", "l0": 1.0, "fvu": 0.1, "dead_fraction": 0.0,
                    "ce_loss_increase": 0.0, "n_pruned_3x": 0, "top_pruned": []}}


def test_the_report_flags_the_breadth_claims_when_a_model_is_truncated(tmp_path):
    base, rl = _metrics(BASE_DISTINCT, UNKNOWN), _metrics(RL_DISTINCT, UNKNOWN)
    c4 = C.claim_breadth(base, rl)
    c2 = C.Claim("C2", "forks", "holds", {"name": "share", "value": 0.6, "ci": [0.55, 0.65], "units": "", "resampled": ""},
                 "rule")
    uses = claim_models(["runs/rl-x"])
    trunc = check_truncation({"base": 0.78, "rl": 0.01})
    trunc["claims_flagged"] = flag_truncation([c2, c4], trunc, uses)
    assert trunc["claims_flagged"] == ["C2", "C4"] and "base 78.0%" in c4.flags[-1]
    assert c4.flags[-1].startswith("token budget (base):") and "test-half samples" in c2.flags[-1]
    assert "lack solution_counts" in c4.flags[0], "these metrics predate solution_counts: C4 says it is not matched"
    report = write_report(_results([c2.to_dict(), c4.to_dict()], trunc), tmp_path / "report.md").read_text()
    assert "## Warning: samples cut off by the token budget" in report and "Claims flagged: C2, C4." in report
    row = next(x for x in report.splitlines() if x.startswith("| C4:"))
    assert "(flagged: see its caveats)" in row and f"| **{c4.status}** |" in row
    assert "**Caveat:** token budget (base):" in report

    def claim(cid):
        return C.Claim(cid, "s", "holds", {"name": "x", "value": 0.0, "ci": [0, 0], "units": "", "resampled": ""}, "r")

    only_variant = check_truncation({"base": 0.0, "rl": 0.0, "rl-x": 0.5})
    assert flag_truncation([claim("C4"), claim("C5"), claim("C6")], only_variant, uses) == ["C6"], \
        "a truncated variant flags only the claim that reads it"
    only_goal = check_truncation({"base": 0.0, "rl": 0.0, "rl steered (goal)": 0.4})
    assert flag_truncation([claim("C2"), claim("C4"), claim("C5"), claim("C6")], only_goal, uses) == ["C5"]
    quiet = check_truncation({"base": 0.02, "rl": None})
    c4b = C.claim_breadth(base, rl)
    assert flag_truncation([c4b], quiet, uses) == [] and not any("token budget" in f for f in c4b.flags)
    report = write_report(_results([c4b.to_dict()], {**quiet, "claims_flagged": []}), tmp_path / "r2.md").read_text()
    assert "Warning" not in report and "**Caveat:** token budget" not in report


def test_rarefied_distinct_is_the_expected_distinct_count_of_m_draws():
    import itertools

    counts = [3, 1, 1]  # five correct samples: one solution three times, two once
    pool = [0, 0, 0, 1, 2]
    for m in range(1, 6):
        draws = list(itertools.combinations(pool, m))
        want = sum(len(set(d)) for d in draws) / len(draws)
        assert rarefied_distinct(counts, m) == pytest.approx(want)
    assert rarefied_distinct([1] * 7, 4) == pytest.approx(4.0), "all different: m draws are m solutions"
    assert rarefied_distinct([6], 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="m=6"):
        rarefied_distinct(counts, 6)
    assert solution_counts(["a", None, "b", "a", None, "a"]) == [3, 1]


def test_matched_distinct_removes_the_advantage_of_more_correct_samples():
    # RL solves each problem 8 times with 2 templates; the base 2 times, always differently: the paired
    # distinct-correct mean says RL is broader (2 vs 2 here, 2 vs 4 with 4 templates), matched counts say the base is
    base = {"n_correct": [2, 2, 0], "distinct_correct": [2, 2, 0], "distinct_eligible": [True, True, False],
            "solution_counts": [[1, 1], [1, 1], []]}
    rl = {"n_correct": [8, 8, 8], "distinct_correct": [4, 4, 4], "distinct_eligible": [True, True, True],
          "solution_counts": [[5, 1, 1, 1], [5, 1, 1, 1], [2, 2, 2, 2]]}
    br = compare_breadth({"base": {"n_samples": 16, "per_problem": base}, "rl": {"n_samples": 16, "per_problem": rl}})
    assert br["distinct_correct_mean"] == {"base": 2.0, "rl": 4.0}, "the paired subset favours the model with more correct samples"
    matched = br["distinct_correct_matched"]
    assert matched["n_problems"] == 2 and matched["per_problem_m_mean"] == 2, "problem 3: the base has no 2 correct"
    want_rl = rarefied_distinct([5, 1, 1, 1], 2)  # 1 - C(3,2)/C(8,2) + 3 (1 - C(7,2)/C(8,2)) = 1 - 3/28 + 3 * 7/28
    assert want_rl == pytest.approx(1 - 3 / 28 + 3 * 7 / 28)
    assert matched["mean"] == {"base": 2.0, "rl": pytest.approx(want_rl)} and want_rl < 2
    assert matched_distinct({"base": base["solution_counts"], "rl": None}) is None
    del base["solution_counts"]
    assert compare_breadth({"base": {"n_samples": 16, "per_problem": base},
                            "rl": {"n_samples": 16, "per_problem": rl}})["distinct_correct_matched"] is None


def test_c4_on_a_task_that_cannot_count_solutions_compares_at_matched_correct_counts():
    # the base solves problems 0-1 twice each, two ways; RL 8 times each, mostly one template: paired means say
    # RL is broader (4 vs 2), matched counts (m = 2) say it is narrower
    base, rl = _metrics([2, 2, 0, 0, 0, 0, 0, 0], UNKNOWN), _metrics([4, 4, 0, 0, 0, 0, 0, 0], UNKNOWN)
    base["per_problem"]["solution_counts"] = [[1, 1], [1, 1]] + [[]] * 6
    rl["per_problem"]["solution_counts"] = [[5, 1, 1, 1], [5, 1, 1, 1]] + [[]] * 6
    c4 = C.claim_breadth(base, rl)
    want = rarefied_distinct([5, 1, 1, 1], 2) - 2.0
    assert c4.effect["value"] == pytest.approx(want) and want < 0, "matched counts, not the paired mean (+2)"
    assert "same number of correct samples" in c4.effect["name"] and "at matched counts" in c4.reason
    ev = c4.evidence
    assert ev["distinct_correct_paired"]["base"] == 2.0 and ev["distinct_correct_paired"]["rl"] == 4.0
    assert ev["distinct_correct_mean"]["n_problems"] == 2 and "matched numbers" in ev["distinct_correct_mean"]["subset"]
    assert ev["distinct_correct_mean"]["relative_change"] == pytest.approx(want / 2.0)
    assert "per_problem" not in ev["distinct_correct_matched"], "the evidence keeps the summary only"
    rule = [True] * 8  # a task that counts its solutions keeps the paired mean (Countdown's shipped C4)
    base2, rl2 = _metrics([2, 2, 0, 0, 0, 0, 0, 0], rule), _metrics([4, 4, 0, 0, 0, 0, 0, 0], rule)
    base2["per_problem"]["solution_counts"] = base["per_problem"]["solution_counts"]
    rl2["per_problem"]["solution_counts"] = rl["per_problem"]["solution_counts"]
    assert C.claim_breadth(base2, rl2).effect["value"] == pytest.approx(0.5), "paired mean over 8 problems: (8 - 4) / 8"

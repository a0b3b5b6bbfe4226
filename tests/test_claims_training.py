"""C3b (the two-phase order) and C6 (training regime vs inference compute) on hand-made inputs, and
the compute-matched pass@k arithmetic against brute force."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from experiments.study.claims_training import claim_phases, claim_regime, hinge_change_point
from probe.metrics.compute_match import compute_multiplier, multiplier_text
from probe.metrics.outcomes import Outcomes


# --- C3b -----------------------------------------------------------------------------------------
def _log(tmp_path, plan, exe):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps({"step": i, "planning_entropy_mean": p, "execution_entropy_mean": e})
                              for i, (p, e) in enumerate(zip(plan, exe))))
    return str(path)


def test_hinge_change_point_finds_the_kink_of_a_noiseless_v():
    y = torch.tensor([abs(t - 30) * 0.1 for t in range(100)], dtype=torch.float64)
    tau, before, after = hinge_change_point(y, margin=5)
    assert tau == 30 and before == pytest.approx(-0.1) and after == pytest.approx(0.1)


def test_claim_phases_holds_only_for_the_predicted_order(tmp_path):
    steps = range(200)
    # the seed's prediction: execution falls then flattens; planning falls, then rises after step 80
    exe = [0.01 * math.exp(-s / 15) + 0.002 for s in steps]
    plan = [0.3 * math.exp(-0.01 * min(s, 80)) * math.exp(0.006 * max(0, s - 80)) for s in steps]
    held = claim_phases(_log(tmp_path, plan, exe))
    assert held.status == "holds", held.reason
    assert abs(held.evidence["change_point_step"] - 80) <= 3, "the change point sits at the kink"
    assert held.effect["ci"][0] > 0.1 and held.evidence["execution_consolidated_first"]["holds"]
    # the shipped pattern: planning falls all the way, execution rises: the direction is absent
    falls = claim_phases(_log(tmp_path, [0.3 * 0.996 ** s for s in steps], [0.002 * 1.002 ** s for s in steps]))
    assert falls.status == "fails" and falls.effect["ci"][1] < 0.1, falls.reason
    # a late rise, but execution moves only late (it did not consolidate first): not the predicted order
    exe_late = [0.002 if s < 120 else 0.002 * math.exp(0.03 * (s - 120)) for s in steps]
    late = claim_phases(_log(tmp_path, plan, exe_late))
    assert late.status == "inconclusive" and "did not consolidate first" in late.reason
    assert claim_phases(None).status == "inconclusive"
    short = claim_phases(_log(tmp_path, plan[:6], exe[:6]))  # a quick run's log: too short for a change point
    assert short.status == "inconclusive" and "needs at least 8" in short.reason


# --- compute-matched pass@k ----------------------------------------------------------------------
def _outcomes(rates, n, problems, seed):
    rnd = random.Random(seed)
    return Outcomes([[("s" if rnd.random() < rates[i % len(rates)] else None) for _ in range(n)]
                     for i in range(problems)], [True] * problems)


def _pass_at_k(o: Outcomes, k: int) -> float:  # Chen et al., by math.comb
    n = o.n
    return sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in o.correct.sum(1).tolist()) / o.n_problems


def test_compute_multiplier_equals_brute_force_and_is_one_for_a_model_against_itself():
    ref, oth = _outcomes([0.4, 0.2, 0.05], 12, 30, 0), _outcomes([0.9, 0.3, 0.0], 12, 30, 1)
    m = compute_multiplier(ref, oth, ks=[1, 2, 3, 4, 6, 12], n_boot=50)
    for row in m["rows"]:
        target = _pass_at_k(ref, row["k"])
        need = next((kp for kp in range(1, 13) if _pass_at_k(oth, kp) >= target - 1e-12), None)
        assert row["pass_at_k_reference"] == pytest.approx(target)
        assert row["samples_needed"] == need, f"k={row['k']}: smallest k' with pass_other(k') >= pass_ref(k)"
        assert (row["more_than"] is None) == (need is not None)
        if need is None:
            assert row["more_than"] == pytest.approx(12 / row["k"]) and "more than" in multiplier_text(row)
    same = compute_multiplier(ref, ref, n_boot=50)
    assert all(r["multiplier"] == 1.0 and r["multiplier_ci"] == [1.0, 1.0] for r in same["rows"]), \
        "a model needs exactly its own budget to match itself, in every replicate"
    with pytest.raises(ValueError, match="outside 1..n"):
        compute_multiplier(ref, oth, ks=[13])


# --- C6 ------------------------------------------------------------------------------------------
def _cells(models: dict[str, Outcomes], seeds=(1000, 1001)):
    cells = []
    for name, o in models.items():
        fam, spec = (("reference", {"model": name}) if name in ("base", "rl") else ("variant", {"method": name}))
        for s in seeds:
            cells.append({"id": f"test|s{s}|{name}", "half": "test", "seed": s, "family": fam, "spec": spec,
                          "outcomes": o.to_json()})
    return cells


def test_claim_regime_holds_when_the_collapsed_model_never_catches_up_and_fails_when_it_does():
    n, p = 64, 40
    broad = _outcomes([0.3], n, p, 0)  # every problem solvable: pass@8 ~ 0.94
    collapsed = _outcomes([0.9, 0.0], n, p, 1)  # half the problems never solved: pass@64 = 0.5
    c6, matches = claim_regime(_cells({"base": broad, "rl": collapsed, "rl-keep": broad}), ["runs/rl-keep"], n_boot=200)
    assert c6.status == "holds", c6.reason
    assert c6.effect["value"] is None and c6.effect["cap"] == 8 and "more than x8" in c6.reason
    assert c6.evidence["k_ref"] == 8 and set(matches) == {"rl-keep", "base"}
    rev, _ = claim_regime(_cells({"base": broad, "rl": broad, "rl-keep": collapsed}), ["rl-keep"], n_boot=200)
    assert rev.status == "fails" and rev.effect["ci"][1] <= 1, rev.reason
    none, _ = claim_regime(_cells({"base": broad, "rl": collapsed}), [], n_boot=200)
    assert none.status == "inconclusive" and "no entropy-preserving" in none.reason

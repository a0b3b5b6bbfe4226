"""`forksight replicate`: pair specs, the best-regime rule, pooling over training seeds, and the command."""

from __future__ import annotations

import json
import math
import re

import pytest

from experiments.study import replicate as R
from experiments.study.replicate_report import closing_note, replication_section
from probe.stats import mean_ci


def _claim(cid, status, value, ci=None, cap=None):
    e = {"name": cid, "value": value, "ci": ci or [value, value], "units": "", "resampled": ""}
    if cap is not None:
        e["cap"] = cap
    return {"id": cid, "status": status, "effect": e}


def _pair(name, group, seed, claims):
    return {"name": name, "group": group, "depth": 4, "train_seed": seed, "claims": claims}


def test_pair_spec_parses_and_bad_specs_say_how_to_write_them():
    p = R.PairSpec.parse("d4-s1=/m/base,/m/rl,/m/v1,/m/v2")
    assert (p.name, p.base, p.rl, p.variants) == ("d4-s1", "/m/base", "/m/rl", ("/m/v1", "/m/v2"))
    with pytest.raises(ValueError, match="NAME=BASE,RL"):
        R.PairSpec.parse("no-dirs=/m/base")
    with pytest.raises(ValueError, match="NAME=BASE,RL"):
        R.ReplicateConfig(pairs=("=/a,/b",))


def test_best_variant_rule_takes_the_broadest_regime_within_the_pass_at_1_floor():
    collapsed = {"pass_at_1": 0.70}
    regimes = {"a": {"pass_at_1": 0.60, "distinct_correct_mean": 3.5},  # broadest but below the floor 0.65
               "b": {"pass_at_1": 0.66, "distinct_correct_mean": 3.0},
               "c": {"pass_at_1": 0.72, "distinct_correct_mean": 2.0}}
    best, table = R.choose_best_variant(collapsed, regimes)
    assert best == "b" and table["pass_at_1_floor"] == pytest.approx(0.65) and not table["regimes"]["a"]["eligible"]
    assert R.choose_best_variant(collapsed, {"a": regimes["a"]})[0] is None, "no regime within the floor: none chosen"


def test_pool_uses_a_student_t_interval_over_training_seeds_and_each_claims_bar():
    vals = [0.8, 0.7, 0.9]
    pairs = [_pair(f"s{i}", "g4", i, [_claim("C2", "holds", v), _claim("C6", "holds", None, [3.0, None], cap=8.0)])
             for i, v in enumerate(vals)]
    pairs.append(_pair("d8", "g8", 0, [_claim("C2", "inconclusive", 0.55, [0.45, 0.65])]))
    pairs.append(_pair("d6", "g6", 0, [_claim("C1", "holds", 0.55, [0.45, 0.65])]))  # C1's own rule: point R^2
    rows = {(r["group"], r["claim"]): r for r in R.pool(pairs)}
    c2 = rows[("g4", "C2")]
    m, h = mean_ci(vals)
    sd = math.sqrt(sum((v - 0.8) ** 2 for v in vals) / 2)
    assert m == pytest.approx(0.8) and h == pytest.approx(4.302653 * sd / math.sqrt(3)), "t(0.975, df=2) * sd / sqrt(n)"
    assert c2["ci"] == pytest.approx([0.8 - h, 0.8 + h]) and c2["holds_on"] == 3 and c2["n_seeds"] == 3
    assert c2["status"] == "holds", "C2's bar: the pooled lower bound > 0.5"
    c6 = rows[("g4", "C6")]
    assert c6["censored"] == 3 and c6["mean"] == 8.0 and c6["status"] == "holds", "censored multipliers enter at the cap"
    one = rows[("g8", "C2")]
    assert one["n_seeds"] == 1 and one["ci"] == [0.45, 0.65] and "one pair" in one["interval"]
    assert one["status"] == "inconclusive"
    assert rows[("g6", "C1")]["status"] == "holds", "a group of one pair keeps that pair's status by its own rule"


def test_the_replication_section_has_a_row_per_claim_and_the_closing_note_counts_pairs():
    pairs = [_pair(f"s{i}", "g4", i, [_claim("C1", "holds" if i else "fails", 0.5 + 0.1 * i)]) for i in range(3)]
    res = {"pairs": pairs, "pooled": R.pool(pairs), "pooled_rule": R.POOLED_RULE}
    text = "\n".join(replication_section(res, "figures/depth.png"))
    assert "| C1 | fails (0.50) | holds (0.60) | holds (0.70) |" in text and "![" in text
    assert closing_note(res).startswith("C1 holds on 2 of 3 pairs; pooled over g4's 3 training seed(s): 0.600")


@pytest.mark.slow
def test_replicate_quick_runs_two_pairs_and_writes_the_pooled_report(tmp_path):
    from experiments.cli import main
    from experiments.paths import ORGANISMS_DIR as O

    out = tmp_path / "rep"
    pairs = [f"a={O / 'base'},{O / 'rl-none'},{O / 'rl-clip-cov'}", f"b={O / 'base'},{O / 'rl-clip-cov'}"]
    assert main(["replicate", "--quick", "--out", str(out), "--pairs", *pairs]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in res["pairs"]] == ["a", "b"]
    assert {c["id"] for c in res["pairs"][0]["claims"]} == {"C1", "C2", "C3", "C3b", "C4", "C5", "C6"}
    assert {r["claim"] for r in res["pooled"]} == {"C1", "C2", "C3", "C3b", "C4", "C5", "C6"}
    assert all(r["interval"] == "Student-t over training seeds" for r in res["pooled"] if r["claim"] != "C6")
    assert (out / "figures" / "depth.png").stat().st_size > 0 and "Closing note" in (out / "report.md").read_text()
    from probe.environment import describe, environment

    assert res["environment"] == environment() and f"Environment: {describe(environment())}." in \
        (out / "report.md").read_text(), "results.json records the versions that made it and the report prints them"


def test_shipped_replication_covers_the_seeds_regimes_and_depths_within_budget():
    from experiments.paths import REPLICATE_DIR

    res = json.loads((REPLICATE_DIR / "results.json").read_text())
    assert not re.search(r'"/[^"]', json.dumps(res)), "no absolute path in the shipped results"
    seeds = {p["depth"]: [] for p in res["pairs"]}
    for p in res["pairs"]:
        seeds[p["depth"]].append(p["train_seed"])
        assert {c["id"] for c in p["claims"]} == {"C1", "C2", "C3", "C3b", "C4", "C5", "C6"}
    assert sorted(seeds[4]) == [0, 1, 2] and len(seeds) >= 3, "vanilla GRPO at three seeds, and two more depths"
    regimes = {r["intervention"] for r in res["organisms"]}
    assert {"none", "clip-cov", "nsr", "w-reinforce", "pass-at-k", "vpo-distinct"} <= regimes
    for r in res["organisms"]:  # RL runs <= 20 minutes here: wall time, or CPU time where the wall includes
        # waiting on other jobs of the shared 2-core machine (CPU time of a 2-thread run counts both threads)
        took = min(r["train_seconds"], r.get("train_cpu_seconds") or float("inf"))
        assert took <= 20 * 60, f"{r['model']}: {took:.0f} s"
    bases = list((REPLICATE_DIR / "organisms").glob("d*-base/metrics.json"))
    assert len(bases) >= 2 and all(json.loads(b.read_text())["train_seconds"] <= 45 * 60 for b in bases)

"""The shipped organisms: their metrics.json numbers are reproduced from the weights, and meet
the Foundation and RL issues' targets (base: capable and diverse; rl-none: collapsed)."""

import json

import pytest

from experiments.paths import ORGANISMS_DIR
from experiments.study.eval_stage import EvalConfig, evaluate_checkpoint

BASE, RL = ORGANISMS_DIR / "base", ORGANISMS_DIR / "rl-none"
KEYS = ("pass_at_1", "pass_at_64", "distinct_correct_mean", "planning_entropy_mean", "execution_entropy_mean")


def _metrics(path):
    return json.loads((path / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("path", [BASE, RL, ORGANISMS_DIR / "rl-clip-cov"], ids=["base", "rl-none", "rl-clip-cov"])
def test_shipped_metrics_are_reproduced_from_the_weights(path):
    shipped = _metrics(path)
    fresh = evaluate_checkpoint(path, EvalConfig(n=shipped["n_samples"], seed=shipped["seed"], device="cpu"))
    for k in KEYS:
        assert fresh[k] == pytest.approx(shipped[k], abs=0.01), f"{path.name}: {k} is not what the weights give"


def test_base_meets_the_foundation_targets():
    m = _metrics(BASE)
    assert m["n_samples"] == 64 and m["temperature"] == 1.0 and m["n_problems"] == 256
    assert m["pass_at_1"] >= 0.5 and m["pass_at_64"] >= 0.9
    assert m["distinct_correct_mean"] >= 2.5
    assert m["planning_entropy_mean"] > m["execution_entropy_mean"]
    assert m["train_seconds"] <= 20 * 60


def test_vanilla_grpo_collapses_the_base():
    base, rl = _metrics(BASE), _metrics(RL)
    assert rl["pass_at_1"] >= base["pass_at_1"] + 0.05, "RL must gain pass@1"
    assert rl["planning_entropy_mean"] <= 0.5 * base["planning_entropy_mean"], "planning entropy must halve"
    assert rl["distinct_correct_mean"] <= 0.6 * base["distinct_correct_mean"], "distinct-correct must fall 40%"
    assert set(rl["pass_at_k"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert rl["train_seconds"] <= 20 * 60
    log = [json.loads(x) for x in (RL / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(len(log)))
    assert {"reward_mean", "pass_at_1", "entropy_mean", "planning_entropy_mean", "execution_entropy_mean",
            "intervened_frac"} <= log[0].keys()


def test_the_preserving_variant_keeps_half_the_lost_planning_entropy():
    base, none, cc = _metrics(BASE), _metrics(RL), _metrics(ORGANISMS_DIR / "rl-clip-cov")
    h_base, h_none, h_cc = (m["planning_entropy_mean"] for m in (base, none, cc))
    assert h_cc - h_none >= 0.5 * (h_base - h_none), "clip-cov must keep half of what vanilla lost"
    assert abs(cc["pass_at_1"] - none["pass_at_1"]) <= 0.05, "at a pass@1 within 0.05 of vanilla"
    assert cc["rl_config"]["steps"] == none["rl_config"]["steps"], "after the same number of steps"
    assert cc["train_seconds"] <= 20 * 60

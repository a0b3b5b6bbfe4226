"""`--engine vllm` end to end on the shipped Countdown organism, against the HF engine (the oracle).

Runs in .venv-vllm only (`make test-vllm`; marker `vllm`, deselected elsewhere by tests/conftest.py).
vLLM draws its own samples (same distribution, other draws), so sampled numbers are compared within
noise: per problem, the two engines' solve rates differ by sampling alone, and the mean difference must
lie within 4 standard errors computed from the pooled per-problem rates. Greedy, exact parity is
tests/test_vllm_engine.py's.
"""

from __future__ import annotations

import json
import math

import pytest

import experiments.cli as cli
from experiments.paths import ORGANISMS_DIR
from experiments.study.sweep import SweepConfig, run_sweep

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE, RL = str(ORGANISMS_DIR / "base"), str(ORGANISMS_DIR / "rl-none")
SMALL_KV = ["--vllm-kv-cache-gib", "0.05"]  # the organism's 64-token context needs a few MiB, not vLLM's 4 GiB


def agree_within_noise(hf: list[int], vllm: list[int], n: int, what: str) -> float:
    """Assert the mean solve rates of two engines' per-problem correct counts (n samples each) agree
    within 4 standard errors of their difference; returns the difference."""
    assert len(hf) == len(vllm), f"{what}: the engines must be scored on the same problems"
    pooled = [(a + b) / (2 * n) for a, b in zip(hf, vllm)]
    se = math.sqrt(sum(2 * p * (1 - p) / n for p in pooled)) / len(pooled)
    diff = (sum(hf) - sum(vllm)) / (n * len(hf))
    assert abs(diff) <= 4 * se + 1e-12, f"{what}: pass@1 HF {sum(hf) / (n * len(hf)):.3f} vs vLLM " \
                                        f"{sum(vllm) / (n * len(vllm)):.3f}, difference {diff:+.3f} > 4 x {se:.3f}"
    return diff


def test_eval_on_vllm_agrees_with_the_hf_engine(tmp_path):
    recs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        args = ["eval", "--engine", engine, "--model", RL, "--n", "16", "--problems", "64", "--out", str(out)]
        assert cli.main(args + SMALL_KV) == 0
        recs[engine] = json.loads((out / "metrics.json").read_text())
    hf, vl = recs["hf"], recs["vllm"]
    assert (hf["engine"], vl["engine"]) == ("hf", "vllm"), "metrics.json must say which engine sampled"
    assert 0.2 < hf["pass_at_1"] < 0.98, "vacuous: pass@1 must leave room for sampling noise"
    agree_within_noise(hf["per_problem"]["n_correct"], vl["per_problem"]["n_correct"], 16, "forksight eval")
    assert vl["planning_entropy_mean"] is None and hf["planning_entropy_mean"] > 0, \
        "vLLM gives no per-token entropy: None there, a measured number on the HF engine"
    assert hf["n_problems"] == vl["n_problems"] == 64 and hf["n_samples"] == vl["n_samples"] == 16


def test_sweep_on_vllm_runs_a_steered_cell_inside_vllm_and_agrees_with_hf(tmp_path):
    """The same small sweep on both engines: every cell (base, RL, temperature, a global vector with gate
    `always` that vLLM runs as worker hooks) agrees within noise, and the steered cell is far from the
    unsteered RL one (steering ran inside vLLM, not silently skipped); each checkpoint's engine starts once."""
    rows, metrics = {}, {}
    for engine in ("hf", "vllm"):
        cfg = SweepConfig(base=BASE, rl=RL, variants=(), out=str(tmp_path / engine), methods=("dom-global",),
                          layers=("0+1+2+3",), coefs=(1.0,), gates=("always",), fractions=(0.5,), temperatures=(1.5,),
                          patch_layers=(), restore_layers=(), problems=32, n=16, test_seeds=1, derive_problems=32,
                          engine=engine, vllm_kv_cache_gib=0.05)
        metrics[engine] = run_sweep(cfg)
        rows[engine] = {c["id"]: c for c in json.loads((tmp_path / engine / "sweep.json").read_text())["cells"]}
    assert rows["hf"].keys() == rows["vllm"].keys(), "both engines evaluate the same cells"
    assert {c["engine"] for c in rows["vllm"].values()} == {"vllm"}, "every cell of this sweep runs on vLLM"
    for cid, hf in rows["hf"].items():
        agree_within_noise(hf["per_problem"]["n_correct"], rows["vllm"][cid]["per_problem"]["n_correct"], 16, cid)
    steered = next(c for c in rows["vllm"].values() if c["family"] == "vector")
    rl = next(c for c in rows["vllm"].values() if c["spec"] == {"model": "rl"} and c["half"] == "selection")
    assert steered["pass_at_1"] < rl["pass_at_1"] - 0.3, \
        f"vacuous: coef 1 at every block must change the RL model's answers (steered {steered['pass_at_1']:.3f}, " \
        f"RL {rl['pass_at_1']:.3f}); equal numbers would mean the hooks never ran"
    starts = [s["checkpoint"] for s in metrics["vllm"]["engines"]["vllm_starts"]]
    assert starts == [BASE, RL], f"one engine per checkpoint, base first, then RL for every remaining cell: {starts}"
    assert metrics["vllm"]["engines"]["cells"] == {"vllm": len(rows["vllm"])}

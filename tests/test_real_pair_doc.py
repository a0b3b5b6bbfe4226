"""docs/real-pair.md's numbers are the shipped measurements: the token-budget table is
experiments/results/real-budget/metrics.json, the training tables are the runs' train_log.jsonl."""

from __future__ import annotations

import pytest

from probe.metrics.breadth import TRUNCATION_LIMIT


def test_the_real_pairs_budget_table_is_the_shipped_measurement():
    import json

    from experiments.paths import RESULTS_DIR

    metrics = json.loads((RESULTS_DIR / "real-budget" / "metrics.json").read_text())["metrics"]
    names = {"SmolLM2-135M-Instruct.Q4_1.gguf": "base", "rl-none": "RL (rl-none)"}
    doc = (RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text()
    for key, name in names.items():
        by = metrics[key]["eos_by_budget"]
        row = f"| {name} finished at eos | " + " | ".join(f"{100 * by[b]:.1f}%" for b in ("64", "128", "256", "512", "1024"))
        assert row + " |" in doc, f"docs/real-pair.md's budget table differs from real-budget/metrics.json: {row}"
    base = metrics["SmolLM2-135M-Instruct.Q4_1.gguf"]["eos_by_budget"]
    assert base["1024"] < 1 - TRUNCATION_LIMIT, "the doc says no budget brings the base to 90%"
    assert base["1024"] - base["512"] < base["512"] - base["256"], "... and that each doubling buys less"


def test_the_real_runs_tables_are_their_shipped_logs():
    from experiments.paths import REAL_DIR, RESULTS_DIR
    from experiments.training.log_table import log_table, read_log

    doc = (RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text()
    for run in ("rl-none", "rl-clip-cov"):
        table = "\n".join(log_table(read_log(REAL_DIR / run / "train_log.jsonl")))
        assert table in doc, f"docs/real-pair.md's table of {run} differs from its train_log.jsonl; paste log_table again"
    with pytest.raises(ValueError, match="window"):
        log_table([], window=10)

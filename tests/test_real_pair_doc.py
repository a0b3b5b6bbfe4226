"""docs/real-pair.md's numbers are the shipped measurements: the token-budget table is
experiments/results/real-budget/metrics.json, the training tables are the runs' train_log.jsonl."""

from __future__ import annotations

import pytest


def test_the_real_runs_tables_are_their_shipped_logs():
    from experiments.paths import REAL_DIR, RESULTS_DIR
    from experiments.training.log_table import log_table, read_log

    doc = (RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text()
    for run in ("rl-none", "rl-clip-cov"):
        table = "\n".join(log_table(read_log(REAL_DIR / run / "train_log.jsonl")))
        assert table in doc, f"docs/real-pair.md's table of {run} differs from its train_log.jsonl; paste log_table again"
    with pytest.raises(ValueError, match="window"):
        log_table([], window=10)

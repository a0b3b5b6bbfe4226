"""`forksight eval` on several models: paired breadth, C4, and per-model results reused on a rerun."""

from __future__ import annotations

import json

import pytest

import experiments.cli as cli
from experiments.paths import ORGANISMS_DIR

BASE, RL = str(ORGANISMS_DIR / "base"), str(ORGANISMS_DIR / "rl-none")
ARGS = ["--n", "4", "--problems", "8", "--batch-size", "64"]


@pytest.mark.slow
def test_eval_pair_writes_c4_and_reuses_models(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    cli.main(["eval", "--model", BASE, "--model", RL, *ARGS, "--out", str(out)])
    rec = json.loads((out / "metrics.json").read_text())
    c4 = rec["C4"]["by_model"]["rl-none"]
    assert c4["id"] == "C4" and c4["status"] in ("holds", "fails", "inconclusive")
    paired = c4["evidence"]["distinct_correct_mean"]
    assert paired["n_problems"] == rec["breadth"]["distinct_correct_n_problems"], "C4 uses the paired subset"
    assert set(rec["metrics"]) == {"base", "rl-none"} and all("truncated_share" in m for m in rec["metrics"].values())

    calls = []
    real = cli.evaluate_checkpoint
    monkeypatch.setattr(cli, "evaluate_checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cli.main(["eval", "--model", BASE, "--model", RL, *ARGS, "--out", str(out)])
    assert calls == [], "a rerun with the same models and config must reuse both evaluations"
    cli.main(["eval", "--model", BASE, "--model", RL, *ARGS, "--seed", "1", "--out", str(out)])
    assert calls == [BASE, RL], "a changed config must evaluate again"

"""The README's findings table is computed from the shipped sweep, so it cannot drift from it."""

from __future__ import annotations

import json

from experiments.paths import RESULTS_DIR
from experiments.study.sweep_report import findings_table

REPO_ROOT = RESULTS_DIR.parents[1]


def test_readme_findings_table_is_the_shipped_sweeps():
    metrics = json.loads((RESULTS_DIR / "steer-sweep" / "metrics.json").read_text())
    rows = findings_table(metrics)
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [r for r in rows if r not in readme]
    assert not missing, ("README.md's findings table differs from experiments/results/steer-sweep/metrics.json; "
                         "paste findings_table(metrics) again. Missing rows:\n" + "\n".join(missing))
    assert len(rows) >= 6, "best, the learned pick, the other families, temperature and the variants"


def test_findings_table_states_each_cell_with_its_intervals():
    cell = {"family": "learned", "spec": {"method": "m", "layer": [0, 1]}, "fraction": 0.25, "restoration_distinct": 0.5,
            "restoration_distinct_ci": [0.4, 0.6], "pass_at_1_change": -0.01, "pass_at_1_change_ci": [-0.02, 0.0],
            "frontier_excess": -0.1, "frontier_excess_ci": [-0.2, 0.05]}
    rows = findings_table({"best": cell, "picks": {"vector": {"restoration": {"test": None}}}})
    assert rows[2] == ("| `best` (excess rule, every family) | learned: method=m layer=0+1 | 0.25 | 0.500 [+0.400, +0.600] "
                       "| -0.010 [-0.020, +0.000] | -0.100 [-0.200, +0.050] |")
    assert len(rows) == 3, "families without a test pick are left out"

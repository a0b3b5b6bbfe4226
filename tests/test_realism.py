"""The realism table (experiments.study.realism) reads each study's numbers from its claims."""

from __future__ import annotations

import json
import math

from experiments.paths import RESULTS_DIR
from experiments.study.realism import PUBLISHED, realism_row, realism_table


def test_the_organism_row_is_the_shipped_claims_evidence():
    results = json.loads((RESULTS_DIR / "study" / "results.json").read_text())
    row = realism_row(results)
    c = {x["id"]: x for x in results["claims"]}
    assert row["pass_at_1_gain"] == c["C4"]["evidence"]["pass_at_1"]["gain"]
    assert row["crossover_k"] == c["C4"]["evidence"]["crossover_k_base_overtakes_rl"] == 2
    assert row["distinct_change"] < 0 and row["fork_share"] == c["C2"]["effect"]["value"]
    assert math.isclose(math.log1p(row["planning_entropy_change"]), c["C3"]["evidence"]["planning"]["log_change"])
    table = realism_table({"organism (Countdown)": row})
    assert table.count("\n") == 2 + len(PUBLISHED), "header, rule, our row, one row per published pair"
    assert "| organism (Countdown) | +0.048 [" in table and "not published" in table


def test_the_readme_table_is_the_shipped_studies():
    from experiments.study.realism import shipped_rows

    rows = shipped_rows()
    assert "organism (Countdown)" in rows, "the organism's study ships with the repository"
    readme = (RESULTS_DIR.parents[1] / "README.md").read_text()
    assert realism_table(rows) in readme, ("README.md's realism table differs from the shipped results.json files; "
                                           "paste realism_table(shipped_rows()) again")


def test_the_report_puts_the_run_beside_published_pairs(tmp_path):
    from experiments.study.report import write_report

    results = json.loads((RESULTS_DIR / "study" / "results.json").read_text())
    text = write_report(results, tmp_path / "report.md").read_text()
    assert "## This pair beside others" in text and realism_table({"this run": realism_row(results)}) in text
    assert all(name in text for name in PUBLISHED)

"""Realism, side by side: the character organism, the real pair and published pairs in one table.

What it is: `realism_row(results)` reads the five quantities a reader compares across pairs out of a
study's `results.json` (computed by the claims, never typed in): the RL pass@1 gain with its
interval (C4), the k at which the base's pass@k overtakes RL's (C4), the relative change of
distinct-correct in C4's measure (over the paired subset, or at matched numbers of correct samples
on a math file), the share of the entropy change on the base's forks
(C2), and the relative change of planning-token entropy over the RL log (C3, first vs last window).
`PUBLISHED` holds what papers report for real pairs, each with its source (docs/published-pairs.md
quotes them); a quantity no paper publishes is None and shows as "not published".
`realism_table(rows)` renders the markdown table for the README and the report; `shipped_rows()`
reads the rows of the studies this repository ships (the organism's, and the real pair's once its
`results.json` exists), the README's table.

What it is not: a new statistic (each number is a claim's evidence), or a judgement of which
findings transfer: the table only puts them next to each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from experiments.paths import RESULTS_DIR
from probe.stats import format_interval

SHIPPED = {"organism (Countdown)": "study", "real pair (SmolLM2-135M-Instruct, GRPO LoRA)": "real"}
"""Row name -> the directory under experiments/results/ whose results.json holds that study."""

COLUMNS = ("RL pass@1 gain", "pass@k crossover k", "distinct-correct change", "entropy change on forks",
           "planning-entropy change")

PUBLISHED: dict[str, dict[str, Any]] = {
    "Qwen2.5-32B -> DAPO-32B (AIME24, avg@32)": {
        "pass_at_1_gain": 51.25 / 100 - 18.12 / 100, "crossover_k": None, "distinct_change": None,
        "fork_share": None, "planning_entropy_change": None,
        "source": "Wu et al., arXiv:2507.14843, Table 5"},
    "Qwen3-4B-Base -> GRPO (AIME24)": {
        "pass_at_1_gain": 24.9 / 100 - 9.4 / 100, "crossover_k": None, "distinct_change": None, "fork_share": None,
        "planning_entropy_change": None, "source": "H. Wang et al. (HICRA), arXiv:2509.03646, Table 1"},
    "Qwen2.5-32B vs SimpleRL-Zoo (Minerva)": {
        "pass_at_1_gain": None, "crossover_k": "tens to hundreds (base +9 points at k = 128)", "distinct_change": None,
        "fork_share": None, "planning_entropy_change": None,
        "source": "Yue et al., arXiv:2504.13837, section 3.1"},
}
"""Published base / RL pairs (values as the papers state them; None = not published)."""


def _claims(results: dict) -> dict[str, dict]:
    return {c["id"]: c for c in results["claims"]}


def realism_row(results: dict) -> dict[str, Any]:
    """The five quantities of one study (`results.json` content); None where a claim could not compute
    one or the results lack it."""
    c = _claims(results)
    ev4, ev3 = (c.get("C4") or {}).get("evidence") or {}, (c.get("C3") or {}).get("evidence") or {}
    distinct = ev4.get("distinct_correct_mean") or {}
    planning = (ev3.get("planning") or {}).get("log_change")
    p1 = ev4.get("pass_at_1") or {}
    return {
        "pass_at_1_gain": p1.get("gain"), "pass_at_1_gain_ci": p1.get("gain_ci"),
        "crossover_k": ev4.get("crossover_k_base_overtakes_rl") if ev4 else "n/a",  # no C4: not measured
        "distinct_change": distinct.get("relative_change"), "distinct_subset_n": distinct.get("n_problems"),
        "fork_share": ((c.get("C2") or {}).get("effect") or {}).get("value"),
        "planning_entropy_change": math.expm1(planning) if planning is not None else None,
    }


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "not published" if kind == "published" else "n/a"
    if isinstance(value, str):
        return value
    return f"{value:+.0%}" if kind == "relative" else (f"{value:+.3f}" if kind == "gain" else f"{value:.2f}")


def realism_table(rows: dict[str, dict[str, Any]], published: dict[str, dict[str, Any]] = PUBLISHED) -> str:
    """Markdown table: one row per studied pair (`realism_row`), then the published pairs with sources."""
    lines = ["| pair | " + " | ".join(COLUMNS) + " | source |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, r, kind in [*((n, r, "ours") for n, r in rows.items()), *((n, r, "published") for n, r in published.items())]:
        missing = "published" if kind == "published" else "ours"
        gain = _fmt(r["pass_at_1_gain"], "gain" if r["pass_at_1_gain"] is not None else missing)
        if kind == "ours" and r.get("pass_at_1_gain_ci"):
            gain += " " + format_interval(r["pass_at_1_gain_ci"], signed=True)
        k = r["crossover_k"]
        k = (f"{k}" if isinstance(k, (int, str)) else ("none within n" if kind == "ours" else "not published"))
        cells = [gain, k, _fmt(r["distinct_change"], "relative" if r["distinct_change"] is not None else missing),
                 _fmt(r["fork_share"], "share" if r["fork_share"] is not None else missing),
                 _fmt(r["planning_entropy_change"], "relative" if r["planning_entropy_change"] is not None else missing)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.get('source', 'this repository')} |")
    return "\n".join(lines)


def shipped_rows(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """`realism_row` of each shipped study (`SHIPPED`) whose results.json exists, in `SHIPPED` order."""
    paths = {name: Path(results_dir) / sub / "results.json" for name, sub in SHIPPED.items()}
    return {name: realism_row(json.loads(p.read_text())) for name, p in paths.items() if p.is_file()}

"""A GRPO run's `train_log.jsonl` as a markdown table of means over windows of steps.

What it is: `log_table(rows, window, budget)` turns the per-step records `experiments.training.grpo`
logs (reward, token entropy, completion length, share cut off at the budget, held-out pass@1 where
evaluated) into the table docs/real-pair.md shows for each shipped run, so that the document is
computed from the shipped log (tests compare them) rather than typed in.

What it is not: a plot or a statistic; the claims about the log (C1's law, C3b's phases) live in
`experiments.study.claims_training`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("steps", "reward", "token entropy (nats)", "completion tokens", "cut off at {budget}", "held-out pass@1")


def read_log(path: str | Path) -> list[dict]:
    """The records of a `train_log.jsonl`, one per step."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def log_table(rows: Sequence[dict], window: int = 10, budget: int = 64) -> list[str]:
    """Markdown lines: a header and one row per `window` consecutive steps with the means of
    `reward_mean`, `entropy_mean`, `completion_tokens` and `truncated_share` (a percentage of the
    `budget`-token cut), and every held-out `pass_at_1` logged in the window with its step."""
    if window < 1 or not rows:
        raise ValueError(f"window={window} must be >= 1 and the log must have rows (got {len(rows)})")
    head = [c.format(budget=budget) for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(0, len(rows), window):
        w = rows[i : i + window]
        mean = {k: sum(r[k] for r in w) / len(w) for k in ("reward_mean", "entropy_mean", "completion_tokens",
                                                            "truncated_share")}
        evals = ", ".join(f"{r['pass_at_1']:.3f} (step {r['step']})" for r in w if r.get("pass_at_1") is not None)
        lines.append(f"| {w[0]['step']}-{w[-1]['step']} | {mean['reward_mean']:.3f} | {mean['entropy_mean']:.2f} | "
                     f"{mean['completion_tokens']:.1f} | {mean['truncated_share']:.0%} | {evals or '-'} |")
    return lines

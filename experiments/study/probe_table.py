"""The probe stage's entropies by token role as a markdown table, for docs that show a shipped probe.

What it is: `role_table(metrics)` reads a probe `metrics.json` (`experiments.study.probe_stage`):
for each set of trajectories (the base's samples, the RL model's), each model's mean entropy over
all answer tokens, planning tokens, execution tokens and the base's forks, teacher-forced on the
same tokens, plus the share of RL's entropy drop that falls on the base's forks with its interval.
docs/real-pair.md pastes it; a test keeps them equal.

What it is not: a claim (C2 and C3 of `experiments.study.claims` judge these numbers).
"""

from __future__ import annotations

from probe.stats import format_interval

SOURCES = {"on_base_samples": "base's samples", "on_rl_samples": "RL's samples"}
ROLES = ("entropy_mean", "planning_entropy_mean", "execution_entropy_mean", "fork_entropy_mean")


def role_table(metrics: dict) -> list[str]:
    """Markdown lines: header, rule, one row per (trajectories, model) with entropies in nats, and
    the share of the entropy drop on the base's forks (once per trajectories)."""
    lines = ["| trajectories | model | all answer tokens | planning | execution | base's forks | share of the drop on "
             "base's forks |", "|---|---|---|---|---|---|---|"]
    for key, label in SOURCES.items():
        rec = metrics[key]
        change = rec["entropy_change"]
        share = f"{change['share_on_base_forks']:.2f} {format_interval(change['share_on_base_forks_ci'], 2)}"
        for name, model in (("base", "base"), ("rl", "RL")):
            m = rec["models"][name]
            lines.append(f"| {label} | {model} | " + " | ".join(f"{m[r]:.2f}" for r in ROLES)
                         + f" | {share if name == 'rl' else ''} |")
    return lines

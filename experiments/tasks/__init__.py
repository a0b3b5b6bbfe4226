"""The tasks a study runs on, by name: `load_task("countdown")`.

Each task implements the `probe.task.Task` protocol (verify, canonical, n_solutions, token_roles)
plus what a study needs to draw problems: `heldout_prompts(limit)`, `train_prompts(seed, count)`,
`max_new_tokens` and `check_tokenizer(tokenizer)`.
"""

from __future__ import annotations

TASKS = ("countdown",)


def load_task(spec: str):
    """The task named by `spec`: "countdown" (the embedded organism's task)."""
    if spec == "countdown":
        from experiments.tasks.countdown import Countdown

        return Countdown()
    raise ValueError(f"task {spec!r} is unknown; allowed: {', '.join(TASKS)}. Fix: pass --task countdown")

"""The tasks a study runs on, by name: `load_task("countdown")`, `load_task("math:problems.jsonl")`.

Each task implements the `probe.tasks.protocol.Task` protocol (verify, canonical, n_solutions, token_roles)
plus what a study needs to draw problems: `heldout_prompts(limit)`, `train_prompts(seed, count,
start)`, `max_new_tokens` and `check_tokenizer(tokenizer)` (every stage calls it before drawing
prompts). The organism trainers also use `sft_stream(seed, start)` (Countdown, word problems).

- `countdown`: the embedded Countdown organism's task (`probe.tasks.countdown`).
- `math:PATH[,train=PATH][,chat][,max_new_tokens=N]`: problems with final answers in a JSONL file,
  verified with math-verify (`probe.tasks.math_task`, where the options are explained).
- `wordproblems`: the word-problem organism's generator (`probe.tasks.wordproblems`); its
  held-out split is shipped as a `math:` file, which is how a study should name it.
"""

from __future__ import annotations

TASKS = ("countdown", "math:PATH", "wordproblems")


def load_task(spec: str):
    """The task named by `spec` (see the module docstring); ValueError naming the allowed specs."""
    if spec == "countdown":
        from probe.tasks.countdown import Countdown

        return Countdown()
    if spec.startswith("math:"):
        from probe.tasks.math_task import MathTask

        return MathTask.from_spec(spec)
    if spec == "wordproblems":
        from probe.tasks.wordproblems import WordProblems

        return WordProblems()
    raise ValueError(f"task {spec!r} is unknown; allowed: {', '.join(TASKS)}. Fix: pass --task countdown, or "
                     "--task math:problems.jsonl for a JSONL file of {\"prompt\", \"answer\"} rows")

"""Which claims of `forksight run` a truncated model flags (issue #23).

What it is: the share of each model's samples that ended at the token budget, per model the
claims read (base, RL, each variant over the sweep's test-half cells; the steered,
matched-temperature and patched cells C5 reads, from the sweep's metrics.json), and the flag each
claim gets when a model whose samples it reads is over `probe.metrics.breadth.TRUNCATION_LIMIT`.

`mean_or_none` and `mean_by_key` (a mean that stays unknown when any value is) serve the report's
pooled rows too.

What it is not: the check itself (`probe.metrics.breadth.check_truncation`) or the report
(`experiments.study.report`).
"""

from __future__ import annotations

from pathlib import Path

BREADTH_CLAIMS = ("C2", "C4", "C5", "C6")
"""Claims whose numbers read sampled completions (flagged when a model they read is truncated):
C2 the base's samples (both models teacher-forced on them), C4 base and RL, C5 also the steered,
matched-temperature and patched cells, C6 RL and the entropy-preserving variants (`claim_models`)."""
STEERED = {"best": "rl steered (best)", "best_goal": "rl steered (goal)", "temperature_baseline": "rl at matched T",
           "patching_upper_bound": "rl patched (upper bound)"}
"""The sweep's test-half measurements whose truncated share joins the base's, RL's and the variants'."""


def mean_or_none(xs: list) -> float | None:
    """The mean of `xs`; None if it is empty or any value is unknown (None)."""
    return None if not xs or any(x is None for x in xs) else sum(xs) / len(xs)


def mean_by_key(dicts: list[dict | None]) -> dict[str, float] | None:
    """Key-wise mean of dicts with the same keys; None if any is missing (cells from before the key)."""
    if not dicts or any(d is None for d in dicts):
        return None
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def truncation_by_model(cells: list[dict], variants: list[str] | tuple[str, ...],
                        steer: dict | None = None) -> tuple[dict, dict]:
    """({model: share of samples that ended at the token budget}, {model: `eos_by_budget` dict}) per
    model (base, rl, each variant by directory name), over the sweep's test-half cells and seeds
    (means), plus the steered and matched-temperature test measurements of `steer` (the sweep's
    metrics.json: `STEERED`, shares only) that exist; None where a cell does not record it."""
    specs = {"base": ("reference", {"model": "base"}), "rl": ("reference", {"model": "rl"}),
             **{Path(v).name: ("variant", {"method": Path(v).name}) for v in variants}}
    shares, budgets = {}, {}
    for name, (family, spec) in specs.items():
        rows = [c for c in cells if c["half"] == "test" and c["family"] == family and c["spec"] == spec]
        shares[name] = mean_or_none([c.get("truncated_share") for c in rows])
        budgets[name] = mean_by_key([c.get("eos_by_budget") for c in rows])
    for key, name in STEERED.items():
        if (steer or {}).get(key):
            shares[name] = steer[key].get("truncated_share")
    return shares, budgets


def claim_models(variants: list[str] | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Claim id -> the models (`truncation_by_model` names) whose samples its numbers read."""
    return {"C2": ("base",), "C4": ("base", "rl"), "C5": ("base", "rl", *STEERED.values()),
            "C6": ("rl", *(Path(v).name for v in variants))}


def flag_truncation(claims: list, truncation: dict, uses: dict[str, tuple[str, ...]]) -> list[str]:
    """Add the truncation warning to every claim in `BREADTH_CLAIMS` that reads a model over the
    limit (`uses`: `claim_models`); returns the ids flagged. C2's shares are the sweep's test-half
    samples of the same models at the same budget (the probe's own samples record none)."""
    over = set(truncation["over_limit"])
    flagged = [c for c in claims if c.id in BREADTH_CLAIMS and over & set(uses.get(c.id, ()))]
    for c in flagged:
        who = ", ".join(m for m in uses[c.id] if m in over)
        c.flags.append(f"token budget ({who}): {truncation['message']}"
                       + (" (shares measured on the sweep's test-half samples)" if c.id == "C2" else ""))
    return [c.id for c in flagged]

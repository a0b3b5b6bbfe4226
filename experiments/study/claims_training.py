"""The claims about training that `forksight run` adds to C1-C5: the two-phase order (C3b) and
training regime against inference compute (C6). Same contract as `experiments.study.claims`:
plain dicts in, a `Claim` with an effect size, a 95% bootstrap interval and a status by a stated rule.

- C3b `claim_phases`: the direction and order the two-phase view predicts (execution entropy
  consolidates first, then planning-token entropy *rises* in a late phase and becomes the
  bottleneck), tested on the RL log separately from C3 ("the two roles move differently"). The
  late phase starts at a change point tau of log planning entropy: the step minimising the squared
  error of a continuous two-segment linear fit (a hinge at tau; tau searched over the steps that
  leave a full window on either side). Windows of `window` of the log: first, at tau, last.
  Effect: log(H_plan[last] / H_plan[at tau]), the planning entropy's change over the late phase.
  Interval: steps resampled within each window (tau fixed at its full-log estimate).
  Holds: its lower bound > +0.1 (planning entropy rises by more than ~10% after tau) and execution
  entropy consolidated first (the interval of |log change of execution entropy before tau| minus
  |after tau| has a lower bound > 0). Fails: the upper bound < +0.1 (planning entropy does not rise
  in the late phase: the predicted direction is not there). Otherwise inconclusive.
- C6 `claim_regime`: a model trained to keep exploring beats a collapsed one given many more
  samples. From the steering sweep's test-half cells (`sweep.json`, per-sample outcomes pooled
  over the test seeds): for each budget k, the samples the collapsed RL model needs to match the
  designated entropy-preserving RL model's pass@k (`probe.metrics.compute_match`: the compute multiplier,
  "more than n / k" when it never does), interval by resampling problems with their seeds.
  Effect: the multiplier at k_ref = n / 8 (8 of 64 samples). Holds: its lower bound >= 2 (the
  collapsed model needs at least twice the samples). Fails: its upper bound <= 1 (the collapsed
  model matches with no more samples). Otherwise inconclusive; no preserving model: inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.study.claims import N_BOOT, Claim, effect_record, role_entropies
from probe.stats import format_interval, percentile_interval, resample_indices

RISE = 0.1
"""C3b: the least log change of planning entropy over the late phase that counts as a rise (~10%)."""
MULTIPLIER_HOLDS = 2.0
MIN_LOG_STEPS = 8  # C3b needs this many logged steps for a change point with windows on either side
"""C6: the lower bound of the compute multiplier above which the claim holds."""


# --- C3b -----------------------------------------------------------------------------------------
def hinge_change_point(y: torch.Tensor, margin: int) -> tuple[int, float, float]:
    """tau minimising the squared error of the continuous fit y ~ a + b t + c max(0, t - tau) over
    tau in margin..n - margin; returns (tau, slope before, slope after) (per step)."""
    n = y.numel()
    t = torch.arange(n, dtype=torch.float64)
    best = None
    for tau in range(margin, n - margin + 1):
        X = torch.stack([torch.ones(n, dtype=torch.float64), t, (t - tau).clamp(min=0)], 1)
        coef = torch.linalg.lstsq(X, y.double()[:, None]).solution[:, 0]
        sse = ((X @ coef - y.double()) ** 2).sum().item()
        if best is None or sse < best[0] - 1e-15:
            best = (sse, tau, coef[1].item(), (coef[1] + coef[2]).item())
    if best is None:
        raise ValueError(f"{n} logged steps leave no change point with {margin} steps on either side")
    return best[1], best[2], best[3]


def claim_phases(train_log: str | None, window: float = 0.1, seed: int = 0) -> Claim:
    """C3b from the RL training log's `planning_entropy_mean` / `execution_entropy_mean` per step."""
    rule = (f"tau = change point of log planning entropy (continuous two-segment linear fit); effect = log(H_plan[last "
            f"{window:.0%} of the log] / H_plan[{window:.0%} window at tau]); holds: its 95% interval lies above +{RISE} "
            "(planning entropy rises in the late phase) and execution entropy moved more before tau than after (interval "
            f"of |its log change before| - |after| above 0); fails: the interval lies below +{RISE} (no late rise of "
            "planning entropy: the predicted direction is absent); else inconclusive")
    statement = ("The order the two-phase view predicts: execution entropy consolidates first, then planning-token "
                 "entropy rises in a late phase.")
    name = "log change of planning entropy over the late phase (change point to end)"
    if not train_log:
        return Claim("C3b", statement, "inconclusive", effect_record(name, None, None, "log ratio", "logged steps"), rule, {},
                     "no RL training log with per-role entropies")
    plan, exe = role_entropies(train_log, min_rows=0)
    n = plan.numel()
    if n < MIN_LOG_STEPS:
        return Claim("C3b", statement, "inconclusive", effect_record(name, None, None, "log ratio", "logged steps"), rule,
                     {"n_steps": n}, f"the RL log has {n} steps with per-role entropies; a change point needs at "
                     f"least {MIN_LOG_STEPS} (log more often, e.g. a longer run)")
    w = min(max(2, int(round(window * n))), n // 4)
    tau, slope_before, slope_after = hinge_change_point(plan.clamp_min(1e-12).log(), margin=w)
    starts = {"first": 0, "tau": min(max(0, tau - w // 2), n - w), "last": n - w}
    draws = resample_indices(w, N_BOOT, seed, strata=len(starts))  # (windows, N_BOOT, w)
    idx = {k: torch.cat([torch.arange(w)[None], draws[i]]) for i, k in enumerate(starts)}

    def mean(v: torch.Tensor, where: str) -> torch.Tensor:  # (1 + N_BOOT,): full sample, then replicates
        return v[starts[where]:starts[where] + w][idx[where]].mean(-1).clamp_min(1e-12)

    d_plan_late = (mean(plan, "last") / mean(plan, "tau")).log()
    d_exe_early = (mean(exe, "tau") / mean(exe, "first")).log()
    d_exe_late = (mean(exe, "last") / mean(exe, "tau")).log()
    order = d_exe_early.abs() - d_exe_late.abs()
    ci, order_ci = list(percentile_interval(d_plan_late[1:])), list(percentile_interval(order[1:]))
    effect, first_order = d_plan_late[0].item(), order_ci[0] > 0
    d_plan_all = math.log(plan[n - w:].mean().item() / max(plan[:w].mean().item(), 1e-12))
    d_exe_all = math.log(exe[n - w:].mean().item() / max(exe[:w].mean().item(), 1e-12))
    where = (f"change point at step {tau} of {n}; planning entropy x{math.exp(effect):.2f} after it "
             f"{format_interval(ci)} (log), execution x{math.exp(d_exe_early[0].item()):.2f} before and "
             f"x{math.exp(d_exe_late[0].item()):.2f} after; over the whole log planning x{math.exp(d_plan_all):.2f}, "
             f"execution x{math.exp(d_exe_all):.2f}")
    if ci[0] > RISE and first_order:
        status, why = "holds", f"the predicted order replicates: {where}"
    elif ci[1] < RISE:
        status, why = "fails", f"no late rise of planning entropy, the direction the seed predicts is absent: {where}"
    else:
        status, why = "inconclusive", (f"{where}; " + ("a late rise, but execution did not consolidate first"
                                                         if ci[0] > RISE else "the late-phase interval straddles the bar"))
    ev = {"n_steps": n, "window_steps": w, "change_point_step": tau,
          "log_slope_per_100_steps": {"before": 100 * slope_before, "after": 100 * slope_after},
          "planning": {"first": plan[:w].mean().item(), "at_change_point": mean(plan, "tau")[0].item(),
                       "last": plan[n - w:].mean().item(), "log_change_late": effect, "log_change_whole": d_plan_all},
          "execution": {"first": exe[:w].mean().item(), "at_change_point": mean(exe, "tau")[0].item(),
                        "last": exe[n - w:].mean().item(), "log_change_early": d_exe_early[0].item(),
                        "log_change_late": d_exe_late[0].item(), "log_change_whole": d_exe_all},
          "execution_consolidated_first": {"value": order[0].item(), "ci": order_ci, "holds": first_order},
          "predicted": "planning rises after tau (log change > +0.1) while execution moved mostly before tau"}
    return Claim("C3b", statement, status, effect_record(name, effect, ci, "log ratio", "logged steps within each window"),
                 rule, ev, why)


def plot_phases(train_log: str, claim: Claim, path: str | Path) -> Path:
    """Planning and execution entropy over the RL log with C3b's change point and windows marked."""
    from probe.figures import new_figure, save_figure_atomic

    roles = dict(zip(("planning", "execution"), role_entropies(train_log, min_rows=MIN_LOG_STEPS)))
    ev = claim.evidence
    n, w, tau = ev["n_steps"], ev["window_steps"], ev["change_point_step"]
    fig = new_figure(8, 3.4)
    for i, (role, values) in enumerate(roles.items()):
        ax = fig.add_subplot(1, 2, i + 1)
        y = values.numpy()
        ax.plot(range(n), y, lw=1, color=f"C{i}")
        ax.axvline(tau, color="k", ls="--", lw=1, label=f"change point (step {tau})")
        for start in (0, min(max(0, tau - w // 2), n - w), n - w):  # the first, at-tau and last windows
            ax.axvspan(start, start + w, color="gray", alpha=0.15, lw=0)
        ax.set_title(f"{role} tokens", fontsize=9)
        ax.set_xlabel("RL step")
        ax.set_ylabel("mean entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure_atomic(fig, path)


# --- C6 ------------------------------------------------------------------------------------------
def test_outcomes(cells: Sequence[dict], family: str, spec: dict) -> tuple[Any, list[int], list[int]] | None:
    """The stacked test-half outcomes of the cell (family, spec) over its test seeds, the problem
    id of each stacked row, and the seeds; None when the sweep has no such test cell."""
    from experiments.study.selection import outcomes_of

    rows = sorted((c for c in cells if c.get("half") == "test" and c.get("family") == family and c.get("spec") == spec),
                  key=lambda c: c["seed"])
    if not rows:
        return None
    o, clusters = outcomes_of(rows)
    return o, clusters, [r["seed"] for r in rows]


def regime_inputs(cells: Sequence[dict], variants: Sequence[str]) -> dict[str, tuple]:
    """{"base", "rl", variant names...} -> test outcomes (as `test_outcomes`), variants in the given order."""
    out = {m: test_outcomes(cells, "reference", {"model": m}) for m in ("base", "rl")}
    for v in variants:
        out[Path(v).name] = test_outcomes(cells, "variant", {"method": Path(v).name})
    return {k: v for k, v in out.items() if v is not None}


def claim_regime(cells: Sequence[dict], variants: Sequence[str], seed: int = 0,
                 n_boot: int = N_BOOT) -> tuple[Claim, dict[str, dict]]:
    """C6 from the sweep's cells (`sweep.json["cells"]`) and the variant directories (the first with
    test cells is the designated preserving model). Returns the claim and every model's compute
    match against the collapsed RL model (name -> `compute_multiplier` dict), for the figure."""
    from probe.metrics.compute_match import compute_multiplier, multiplier_text

    rule = (f"for each k, samples the collapsed RL model needs to match the preserving model's pass@k (pooled over "
            f"the test seeds); effect = that over k at k_ref = n/8; holds: lower bound >= {MULTIPLIER_HOLDS:g} (the "
            "collapsed model needs at least twice the samples); fails: upper bound <= 1 (it matches with no more "
            "samples); else inconclusive")
    statement = ("Training regime beats inference compute: a model trained to keep exploring outperforms the collapsed "
                 "one given many more samples.")
    name = "compute multiplier at k_ref: samples the collapsed model needs / k_ref"
    data = regime_inputs(cells, variants)
    pres = [k for k in data if k not in ("base", "rl")]
    if "rl" not in data or not pres:
        why = "no test-half cells of the collapsed model" if "rl" not in data else "no entropy-preserving RL model in the sweep"
        return Claim("C6", statement, "inconclusive", effect_record(name, None, None, "x samples", "problems (with their seeds)"),
                     rule, {}, why), {}
    rl, clusters, seeds = data["rl"]
    matches = {m: compute_multiplier(data[m][0], rl, clusters=clusters, n_boot=n_boot, seed=seed)
               for m in [*pres, "base"] if m in data}
    n = rl.n
    k_ref = max(1, n // 8)
    top = pres[0]
    row = next(r for r in matches[top]["rows"] if r["k"] == k_ref)
    lo, hi = row["multiplier_ci"]
    value = row["multiplier"]
    text = f"{multiplier_text(row)} at k_ref={k_ref} ({row['samples_needed'] or f'more than {n}'} samples of rl vs {k_ref} of {top})"
    if lo is None or lo >= MULTIPLIER_HOLDS:
        status, why = "holds", f"the collapsed model needs {text}"
    elif hi is not None and hi <= 1:
        status, why = "fails", f"the collapsed model matches {top} with no more samples: {text}"
    else:
        status, why = "inconclusive", f"{text}: the interval reaches below x{MULTIPLIER_HOLDS:g}"
    ev = {"designated_preserving_model": top, "k_ref": k_ref, "n_samples": n, "test_seeds": seeds,
          "more_than": row["more_than"], "censored_fraction": row["censored_fraction"],
          **{f"{m}_vs_rl": [{"k": r["k"], f"pass_at_k_{m}": r["pass_at_k_reference"],
                             "rl_samples_needed": r["samples_needed"], "multiplier": multiplier_text(r)}
                            for r in mt["rows"]] for m, mt in matches.items()}}
    effect = effect_record(name, value, None, "x samples (None: more than n / k_ref)", "problems (with their seeds)")
    effect["ci"] = [lo, hi]  # None = censored: the collapsed model never matched within its n samples
    effect["cap"] = n / k_ref  # the most a multiplier at k_ref can show with n samples
    return Claim("C6", statement, status, effect, rule, ev, why), matches

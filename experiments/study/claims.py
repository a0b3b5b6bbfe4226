"""The five claims `forksight run` tests, each with an effect size, a 95% bootstrap interval (drawn
and printed by `probe.stats`) and a status computed from the data by a stated rule ("holds",
"fails" or "inconclusive").

Inputs are the stage outputs of `experiments.study.run` (plain dicts read back from JSON), so a
claim can be recomputed from a finished run directory without sampling again.

- C1 `claim_law`: performance saturates as entropy falls. R = -a exp(H) + b fit to the RL log;
  effect R^2, interval by resampling logged steps. Holds: a > 0 (its whole interval) and R^2 >= 0.5.
  Fails: a < 0 (whole interval) or R^2's upper bound < 0.2. Otherwise inconclusive.
- C2 `claim_forks`: a minority of tokens are forks and RL changes entropy mostly there. Effect: the
  share of |H_rl - H_base| on the base model's forks (top `rho` of answer tokens by base entropy),
  interval by resampling problems. Holds: lower bound > 0.5. Fails: upper bound < 0.5.
- C3 `claim_roles`: planning and execution entropy follow different trajectories during RL. Effect:
  log(H_last / H_first) of planning tokens minus that of execution tokens (first / last `window`
  of the logged steps), interval by resampling steps within each window. Holds: the interval lies
  outside +-0.1. Fails: the interval lies inside +-0.1 (the same relative change within ~10%).
- C4 `claim_breadth`: RL gains pass@1 and loses breadth. Effect: distinct correct solutions per
  problem, RL minus base, over the same problems for both (`probe.metrics.breadth.compare_breadth`: the
  task's n_solutions >= 3 rule where it counts solutions, else the problems both models solved;
  the evidence names the subset and its size, and reports beside it distinct-correct over every
  problem with unsolved = 0 and coverage at k = pass@k), interval paired over problems. On a task
  that cannot count its solutions (a math file, where distinct-correct tracks the number of correct
  samples) the effect is distinct solutions among the same number m of correct samples per problem
  (`probe.metrics.breadth.matched_distinct`, rarefaction; `distinct_measure` says which). Holds:
  the pass@1 gain's lower bound > 0, the distinct change's upper bound < 0, and pass@k at the
  largest k is lower for RL (its change's upper bound < 0, or the base catches up at some k and
  ends strictly above). Fails: pass@1 falls (upper bound < 0) or distinct-correct rises (lower
  bound > 0). No problem eligible for both: no effect (None), inconclusive.
- C5 `claim_recovery`: the lost breadth is latent and can be elicited beyond what a base/RL mixture
  gives. Effect: the frontier excess (restoration of distinct-correct minus the mixture's at the same
  pass@1, `probe.metrics.frontier`) of the sweep's `best` cell (RL model alone, pass@1 within the tolerance,
  chosen on the selection half, measured on the test half at unseen seeds), interval by resampling
  problems with their seeds. Needs a breadth gap (base minus RL distinct-correct, lower bound > 0),
  else inconclusive (the gap is the best cell's own frontier comparison's, `distinct_gap`: the same
  rows and measure its restoration divides by, the paired subset or matched numbers of correct
  samples where the task cannot count its solutions; without a best cell, or from a sweep written
  before it recorded the gap, `breadth_gap` over the pooled test rows, flagged if its measure differs).
  Holds (elicitation): excess lower bound > 0, restoration lower bound > 0.1 and the fork detector
  reads the base model's forks off the RL residual better than token identity.
  Fails: excess upper bound < 0 (a mixture gives more), or neither the cell (upper bound) nor
  cross-model patching restores more than 0.1. Otherwise inconclusive (on the frontier: recovery
  that only matches a mixture, said so in the reason).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.study.breadth_gap import breadth_gap, per_problem_of
from experiments.study.sweep_report import spec_text
from probe.law import read_log_keys
from probe.metrics.breadth import COVERAGE_NOTE
from probe.metrics.passk import crossover_k
from probe.stats import (
    format_interval,
    format_number,
    paired_ci,
    percentile_interval,
    resample_indices,
)

ROLE_KEYS = ("planning_entropy_mean", "execution_entropy_mean")
"""The RL log's per-step mean entropy of planning and of execution tokens (C3, C3b)."""


def role_entropies(train_log: str | Path, min_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(planning, execution) mean entropy per logged step of an RL `train_log.jsonl`, shape (n_steps,)
    each; fewer than `min_rows` steps with both is an error naming the keys the log has."""
    cols = read_log_keys(train_log, ROLE_KEYS, min_rows=min_rows)
    return cols[ROLE_KEYS[0]], cols[ROLE_KEYS[1]]

STATUSES = ("holds", "fails", "inconclusive")
N_BOOT = 1000


@dataclass
class Claim:
    """One tested claim: what it says, its effect size with interval, and the computed status."""

    id: str
    statement: str
    status: str
    """"holds", "fails" or "inconclusive", from `rule` applied to the numbers below."""
    effect: dict[str, Any]
    """{"name", "value", "ci" ([lo, hi], 95% percentile bootstrap), "units", "resampled"}."""
    rule: str
    evidence: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    """Why the status came out as it did, in words (with the numbers that decided it)."""
    figures: list[str] = field(default_factory=list)
    """Figure paths relative to the run directory."""
    flags: list[str] = field(default_factory=list)
    """Caveats the status does not account for (e.g. samples cut off by the token budget), in words."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}; allowed {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effect_record(name: str, value: float | None, ci: Sequence[float] | None, units: str, resampled: str) -> dict:
    """A claim's `effect`: {"name", "value", "ci" ([lo, hi] as floats, or None), "units", "resampled"}."""
    return {"name": name, "value": value, "ci": None if ci is None else [float(ci[0]), float(ci[1])],
            "units": units, "resampled": resampled}


# --- C1 ------------------------------------------------------------------------------------------
def claim_law(law: dict | None) -> Claim:
    """C1 from the probe's `law` record (`forksight probe` metrics.json, with its bootstrap)."""
    rule = ("holds: a > 0 over its whole 95% interval and R^2 >= 0.5; fails: a < 0 over its whole interval or "
            "R^2's upper bound < 0.2; else inconclusive")
    statement = "Performance saturates as entropy falls: R = -a*exp(H) + b fits the RL training log."
    if not law or not law.get("available"):
        why = (law or {}).get("reason", "no law fit was run")
        return Claim("C1", statement, "inconclusive", effect_record("R^2 of the law fit", None, None, "", "logged RL steps"),
                     rule, {}, f"no RL training log: {why}")
    boot = law.get("bootstrap") or {}
    a_ci, r2_ci = boot.get("a"), boot.get("r2")
    r2 = law["r2"]
    if a_ci is None or r2_ci is None:
        return Claim("C1", statement, "inconclusive", effect_record("R^2 of the law fit", r2, None, "fraction of variance",
                                                              "logged RL steps"), rule, {}, "no bootstrap resample could be fitted")
    if a_ci and a_ci[0] > 0 and r2 is not None and r2 >= 0.5:
        status, why = "holds", f"a in {format_interval(a_ci)} > 0 and R^2 = {format_number(r2)} >= 0.5"
    elif (a_ci and a_ci[1] < 0) or (r2_ci and r2_ci[1] < 0.2):
        status, why = "fails", f"a in {format_interval(a_ci)}, R^2 interval {format_interval(r2_ci)}"
    else:
        status, why = "inconclusive", f"a in {format_interval(a_ci)}, R^2 = {format_number(r2)}"
    ev = {k: law.get(k) for k in ("a", "b", "r2", "ceiling", "n_steps", "reward_key")}
    ev.update(a_ci=a_ci, b_ci=boot.get("b"), ceiling_ci=boot.get("ceiling"),
              extrapolation_mae=(law.get("extrapolation") or {}).get("mae"))
    return Claim("C1", statement, status, effect_record("R^2 of the law fit", r2, r2_ci, "fraction of variance", "logged RL steps"),
                 rule, ev, why)


# --- C2 ------------------------------------------------------------------------------------------
def claim_forks(on_base: dict, rho: float) -> Claim:
    """C2 from the probe's `on_base_samples` record (both models teacher-forced on base samples)."""
    rule = ("holds: the lower bound of the share of |dH| on base forks > 0.5 (forks are the top rho of tokens); "
            "fails: its upper bound < 0.5; else inconclusive")
    ec, ov = on_base["entropy_change"], on_base["fork_overlap"]
    share, ci = ec["share_on_base_forks"], ec.get("share_on_base_forks_ci")
    if share is None or ci is None:
        status, why = "inconclusive", "no entropy change between the models on these trajectories"
    elif ci[0] > 0.5:
        status, why = "holds", f"{format_number(ec['fork_token_fraction'])} of tokens carry {format_number(share)} of |dH| (interval {format_interval(ci)})"
    elif ci[1] < 0.5:
        status, why = "fails", f"forks carry only {format_number(share)} of |dH| (upper bound {format_number(ci[1])} < 0.5)"
    else:
        status, why = "inconclusive", f"share {format_number(share)}, interval {format_interval(ci)} straddles 0.5"
    roles = on_base["models"]["base"].get("roles", {})
    ev = {"rho": rho, "fork_token_fraction": ec["fork_token_fraction"], "share_on_rl_forks": ec["share_on_rl_forks"],
          "share_on_base_forks_signed": ec["share_on_base_forks_signed"], "fork_jaccard": ov["jaccard"],
          "base_forks_that_are_rl_forks": ov["base_forks_that_are_rl_forks"],
          "fork_share_by_role": {r: v.get("fork_share") for r, v in roles.items()} if roles else None,
          "entropy_mean": {m: on_base["models"][m]["entropy_mean"] for m in ("base", "rl")}}
    return Claim("C2", "A minority (~20%) of tokens are forks, and RL changes entropy mostly there.", status,
                 effect_record("share of |H_rl - H_base| on base forks", share, ci, "fraction", "problems"), rule, ev, why)


# --- C3 ------------------------------------------------------------------------------------------
def claim_roles(train_log: str | None, window: float = 0.1, seed: int = 0) -> Claim:
    """C3 from the RL training log's `planning_entropy_mean` / `execution_entropy_mean` per step."""
    rule = ("effect = log(H_last/H_first) of planning minus execution tokens (first/last windows of the log); "
            "holds: its 95% interval lies outside +-0.1 (relative changes differ by more than ~10%); fails: the "
            "interval lies within +-0.1; else inconclusive")
    statement = "Planning-token and execution-token entropy follow different trajectories during RL."
    name = "log change of planning entropy minus that of execution entropy"
    if not train_log:
        return Claim("C3", statement, "inconclusive", effect_record(name, None, None, "log ratio", "logged steps"), rule, {},
                     "no RL training log with per-role entropies")
    plan, exe = role_entropies(train_log, min_rows=4)
    n = plan.numel()
    w = max(2, int(round(window * n)))
    w = min(w, n // 2)

    def change(v: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
        first, last = v[:w][i0].mean(-1), v[n - w:][i1].mean(-1)
        return (last.clamp_min(1e-12) / first.clamp_min(1e-12)).log()

    whole = torch.arange(w)
    d_plan, d_exe = change(plan, whole, whole).item(), change(exe, whole, whole).item()
    i0, i1 = resample_indices(w, N_BOOT, seed, strata=2)  # steps of the first and of the last window
    boot = change(plan, i0, i1) - change(exe, i0, i1)
    ci = list(percentile_interval(boot))
    effect = d_plan - d_exe
    if ci[0] > 0.1 or ci[1] < -0.1:
        status, why = "holds", (f"planning entropy x{math.exp(d_plan):.2f}, execution x{math.exp(d_exe):.2f} "
                                f"(difference of log changes {format_number(effect)}, interval {format_interval(ci)})")
    elif -0.1 <= ci[0] and ci[1] <= 0.1:
        status, why = "fails", f"both roles change alike (interval {format_interval(ci)} within +-0.1)"
    else:
        status, why = "inconclusive", f"interval {format_interval(ci)} overlaps +-0.1"
    ev = {"n_steps": n, "window_steps": w,
          "planning": {"first": plan[:w].mean().item(), "last": plan[n - w:].mean().item(), "log_change": d_plan},
          "execution": {"first": exe[:w].mean().item(), "last": exe[n - w:].mean().item(), "log_change": d_exe}}
    return Claim("C3", statement, status, effect_record(name, effect, ci, "log ratio", "logged steps within each window"),
                 rule, ev, why)


# --- C4 ------------------------------------------------------------------------------------------
def claim_breadth(base: dict, rl: dict, seed: int = 0) -> Claim:
    """C4 from held-out metrics of base and RL on the same problems (with `per_problem`)."""
    rule = ("distinct-correct is compared over the problems both models are eligible on, or, where the task cannot count "
            "its solutions (a math file: nearly every correct completion is worded differently, so distinct-correct "
            "tracks the number of correct samples), at matched numbers of correct samples per problem (rarefaction). "
            "holds: pass@1 gain lower bound > 0, distinct-correct change upper bound < 0, and pass@k at the largest k "
            "lower for RL (upper bound < 0, or the base catches up at some k and ends above); fails: pass@1 falls (upper bound "
            "< 0) or distinct-correct rises (lower bound > 0); else inconclusive")
    pb, pr = per_problem_of(base), per_problem_of(rl)
    n = int(base["n_samples"])
    if len(pb["n_correct"]) != len(pr["n_correct"]) or n != int(rl["n_samples"]):
        raise ValueError("base and RL were evaluated on different problems or sample counts; re-run the eval stage")
    p1 = ([c / n for c in pb["n_correct"]], [c / n for c in pr["n_correct"]])
    pk = ([float(c > 0) for c in pb["n_correct"]], [float(c > 0) for c in pr["n_correct"]])
    diff = lambda x: (x[:, 1] - x[:, 0]).mean()  # noqa: E731  RL minus base
    gain, gain_ci = sum(p1[1]) / len(p1[1]) - sum(p1[0]) / len(p1[0]), paired_ci(p1, diff, seed)
    d_pk, d_pk_ci = sum(pk[1]) / len(pk[1]) - sum(pk[0]) / len(pk[0]), paired_ci(pk, diff, seed)
    g = breadth_gap(base, rl, seed)
    br, matched, use_matched, uncountable = g["breadth"], g["matched"], g["measure"] == "matched", g["uncountable"]
    gap, gap_ci, over = g["gap"], g["gap_ci"], g["over"]
    measure = ("distinct correct solutions among the same number of correct samples per problem, RL minus base"
               if use_matched else "distinct correct solutions per problem (same problems for both), RL minus base")
    d_dc = None if gap is None else -gap  # None: no problem is eligible for both (e.g. none both solved)
    d_dc_ci = (None, None) if gap_ci is None else (-gap_ci[1], -gap_ci[0])
    cross = crossover_k(rl["pass_at_k"], base["pass_at_k"])  # base catches up with RL after trailing it
    overtakes = cross is not None and d_pk < 0  # ... and ends strictly above it at the largest k (not a tie)
    if gain_ci[0] > 0 and d_dc_ci[1] is not None and d_dc_ci[1] < 0 and (d_pk_ci[1] < 0 or overtakes):
        status = "holds"
        why = (f"pass@1 +{format_number(gain)} {format_interval(gain_ci)}, distinct-correct {format_number(d_dc, 2)} "
               f"{format_interval(d_dc_ci, 2)}{over}, pass@{n} {format_number(d_pk)}, base overtakes RL at k={cross}")
    elif gain_ci[1] < 0 or (d_dc_ci[0] is not None and d_dc_ci[0] > 0):
        status, why = "fails", f"pass@1 change {format_number(gain)} {format_interval(gain_ci)}, distinct change {format_number(d_dc, 2)}{over}"
    else:
        status, why = "inconclusive", (f"pass@1 change {format_number(gain)} {format_interval(gain_ci)}, distinct change "
                                       f"{format_number(d_dc, 2)}{over}, pass@{n} change {format_number(d_pk)}")
    paired, used = g["paired"], g["used"]
    ev = {"pass_at_1": {"base": base["pass_at_1"], "rl": rl["pass_at_1"], "gain": gain, "gain_ci": list(gain_ci)},
          f"pass_at_{n}": {"base": base["pass_at_k"][str(n)], "rl": rl["pass_at_k"][str(n)], "change": d_pk,
                           "change_ci": list(d_pk_ci)},
          "distinct_correct_mean": {**used,  # the effect's measure and problems: the same for both
                                    "relative_change": d_dc / used["base"] if used["base"] and d_dc is not None else None},
          "distinct_correct_paired": paired,  # over the paired subset, unmatched (the effect's measure on countable tasks)
          "distinct_correct_matched": None if matched is None else {k: v for k, v in matched.items() if k != "per_problem"},
          "distinct_correct_all_problems": {**br["distinct_correct_all_mean"], "unsolved": "counts 0",
                                            "n_problems": br["n_problems"]},
          "distinct_correct_own_subsets": {  # what each model's own metrics.json says: not comparable
              **{m: br["distinct_correct_own_mean"][m] for m in ("base", "rl")},
              **{f"n_problems_{m}": br["distinct_correct_own_n_problems"][m] for m in ("base", "rl")}},
          "solved_problems": {**br["solved"], "of": br["n_problems"]},
          "coverage_at_k": {"k": [int(k) for k in base["pass_at_k"]],
                            **{m: [br["coverage_at_k"][m].get(k) for k in base["pass_at_k"]] for m in ("base", "rl")},
                            "note": COVERAGE_NOTE},
          "crossover_k_base_overtakes_rl": cross, "n_problems": len(pb["n_correct"]), "n_samples": n,
          "truncated_share": br["truncated_share"],
          "distinct_measure": "matched" if use_matched else "paired", "n_problems_distinct": used["n_problems"]}
    flags = ([] if use_matched or not uncountable else
             ["distinct-correct over the paired subset: the task cannot count its solutions but the metrics lack "
              "solution_counts (written before they were recorded), so the comparison is not at matched numbers of "
              "correct samples. Fix: re-evaluate (forksight eval / the steer stage) with this version"])
    return Claim("C4", "The collapsed policy gains pass@1 but loses breadth: distinct-correct falls, and at large k "
                 "pass@k approaches or falls below the base.", status,
                 effect_record(measure, d_dc, None if gap_ci is None else d_dc_ci, "solutions", "problems"), rule, ev, why,
                 flags=flags)


# --- C5 ------------------------------------------------------------------------------------------
def _cell(m: dict | None) -> dict | None:
    keep = ("family", "spec", "fraction", "params", "pass_at_1", "pass_at_1_change", "pass_at_1_change_ci",
            "restoration_distinct", "restoration_distinct_ci", "frontier_restoration", "frontier_excess",
            "frontier_excess_ci", "restoration_pass_at_64", "distinct_minus_rl", "distinct_minus_rl_ci",
            "distinct_correct_subset", "pass_at_k",
            "fork_entropy_mean", "truncated_share")
    return None if m is None else {k: m.get(k) for k in keep}


def claim_recovery(steer: dict, base: dict, rl: dict, detector: dict | None, seed: int = 0) -> Claim:
    """C5 from the steering sweep's `metrics.json` (test-half measurements of the cells chosen on the
    selection half, against the base/RL mixture frontier), the pooled test-half base and RL rows
    (with `per_problem`, for the breadth gap) and the probe's fork detector."""
    tol = steer["config"]["tolerance"]
    rule = ("needs a breadth gap (base minus RL distinct-correct, the denominator of the best cell's restoration: its "
            "frontier comparison's, over the paired subset or at matched numbers of correct samples where the task "
            "cannot count its solutions), lower bound > 0, else inconclusive. `best` = the "
            f"RL-alone cell with the most frontier excess at pass@1 >= RL - {tol}, chosen on the selection half, measured "
            "on the test half at unseen seeds. holds (elicitation beyond the mixture): its frontier excess has a lower "
            "bound > 0, its restoration a lower bound > 0.1, and the fork detector beats token identity; fails: its excess "
            "has an upper bound < 0 (sampling the base part of the time gives more), or neither it (upper bound) nor "
            "cross-model patching restores more than 0.1; inconclusive otherwise (e.g. on the frontier: it restores "
            "breadth, but no more than a mixture at the same pass@1)")
    best = steer.get("best")
    g = breadth_gap(base, rl, seed)
    gap, gap_ci, measure, flags = g["gap"], g["gap_ci"], g["measure"], []
    from_best = bool(best and best.get("distinct_gap_ci") is not None)
    if from_best:  # the gap the best cell's restoration divides by, same rows and measure
        gap, gap_ci, measure = best["distinct_gap"], best["distinct_gap_ci"], best["distinct_measure"]
    elif best and best.get("distinct_measure", "paired") != g["measure"]:
        flags.append(f"the sweep's restoration uses {best.get('distinct_measure', 'paired')} distinct-correct (written "
                     f"before matched counts) but the gap here is {g['measure']}: re-run the sweep stage with this version")
    r, r_ci = (best or {}).get("restoration_distinct"), (best or {}).get("restoration_distinct_ci")
    x, x_ci = (best or {}).get("frontier_excess"), (best or {}).get("frontier_excess_ci")
    patch = steer.get("patching_upper_bound") or {}
    r_patch = patch.get("restoration_distinct")
    det_auc = det_tok = None
    if detector:
        det_auc = detector["layers"][str(detector["best_layer"])]["auroc_test"]
        det_tok = (detector.get("token_baseline") or {}).get("auroc_test")
    latent = det_auc is not None and det_tok is not None and det_auc > det_tok
    what = "" if best is None else (f"{best['family']} {spec_text(best['spec'])}" + (f" on {best['fraction']:g} of the samples"
                                                                          if (best.get("fraction") or 1) < 1 else ""))
    if gap_ci is None or gap_ci[0] <= 0:
        over = f" ({measure}, the sweep's test half)" if from_best else g["over"]
        status, why = "inconclusive", (f"no breadth gap to restore: base minus RL distinct-correct{over} "
                                       f"{format_number(gap, 2)} {format_interval(gap_ci, missing='[n/a]')}")
    elif best is None or x_ci is None or r_ci is None:
        sel_gap = (steer.get("selection") or {}).get("distinct_gap")
        status, why = "inconclusive", (
            f"the selection half showed no breadth gap to restore (base minus RL {format_number(sel_gap, 2)}), so no "
            "cell was chosen" if sel_gap is not None and sel_gap <= 0 else
            f"no RL-alone cell kept pass@1 within {tol} of RL on the selection half")
    elif x_ci[0] > 0 and r_ci[0] > 0.1 and latent:
        status = "holds"
        why = (f"elicitation beyond the mixture: {what} restores {format_number(r, 2)} {format_interval(r_ci, 2)} of the distinct-correct gap at "
               f"pass@1 {best['pass_at_1_change']:+.3f}, {format_number(x, 2)} {format_interval(x_ci, 2)} above the base/RL mixture at that "
               f"pass@1; detector AUROC {format_number(det_auc)} vs token baseline {format_number(det_tok)}")
    elif x_ci[1] < 0 or (r_ci[1] <= 0.1 and (r_patch is None or r_patch <= 0.1)):
        status = "fails"
        why = (f"{what} restores {format_number(r, 2)} {format_interval(r_ci, 2)}, {format_number(x, 2)} {format_interval(x_ci, 2)} relative to the mixture at its "
               "pass@1: sampling the base part of the time gives more breadth than anything the RL network gave alone")
        if x_ci[1] >= 0:  # decided by the patching bound: say where it was measured
            why += (f"; cross-model patching restores at most {format_number(r_patch, 2)} (the "
                    f"{steer.get('curves_half', 'test')} half)")
    else:
        status = "inconclusive"
        why = (f"{what} restores {format_number(r, 2)} {format_interval(r_ci, 2)} at pass@1 {best['pass_at_1_change']:+.3f}, frontier excess "
               f"{format_number(x, 2)} {format_interval(x_ci, 2)}: " + ("on the mixture frontier, recovery but no elicitation beyond what "
                                                   "sampling the base part of the time gives" if x_ci[0] <= 0 <= x_ci[1]
                                                   else "above the frontier but the detector or restoration bar is not met"))
    curve = steer.get("frontier") or []
    near = None
    if curve:
        from probe.metrics.frontier import frontier_at

        rl_p1 = max(c["pass_at_1"] for c in curve if c["m"] == 0)
        near = {f"{d:.3f}": frontier_at(curve, rl_p1 - d) for d in (0.002, 0.005, 0.01, 0.03)}
    ev = {
        "distinct_gap_base_minus_rl": gap, "distinct_gap_ci": gap_ci, "distinct_measure": measure,
        "distinct_gap_source": ("the best cell's frontier comparison (test half, per seed)" if from_best
                                else "the pooled test-half base and RL rows"),
        "distinct_gap_pooled": {"gap": g["gap"], "ci": g["gap_ci"], "measure": g["measure"],
                                "subset": f"{g['used']['n_problems']} problems ({g['used']['subset']})"},
        "frontier_subset": (None if not (best or {}).get("distinct_correct_subset") else
                            f"{best.get('distinct_correct_n_problems')} problems ({best['distinct_correct_subset']})"),
        "frontier_restoration_at_pass_at_1_cost": near,
        "frontier_note": ("the mixture buys breadth steeply near RL's accuracy (a few base samples per problem add new "
                          "solutions), and no mixture exceeds RL's pass@1; so a cell near RL's pass@1 has a wide excess "
                          "interval: replicates where its pass@1 falls slightly below RL's face a much higher frontier"),
        "protocol": (f"chosen on the selection half (seed {steer['protocol']['selection_seed']}), measured on the test "
                     f"half at seeds {steer['protocol']['test_seeds']} no choice used"),
        "best": _cell(best), "best_restoration": _cell(steer.get("best_restoration")),
        "best_goal": _cell(steer.get("best_goal")), "pass_at_1_tolerance": tol,
        "temperature_baseline": _cell(steer.get("temperature_baseline")),
        "entropy_preserving_rl": {k: _cell(v) for k, v in (steer.get("variants") or {}).items()},
        "patching_upper_bound_restoration": r_patch,
        "curves_half": steer.get("curves_half", "test"),
        "patching_curve": [{"layer": c["spec"]["layer"], "restoration_distinct": c["restoration_distinct"],
                            "pass_at_1_change": c["pass_at_1_change"]} for c in steer.get("patching_curve") or [] if c],
        "layer_restore_curve": [{"layer": c["spec"]["layer"], "restoration_distinct": c["restoration_distinct"],
                                 "pass_at_1_change": c["pass_at_1_change"]} for c in steer.get("layer_restore_curve") or [] if c],
        "goals": {k: v["met"] for k, v in (steer.get("goals") or {}).items()},
        "goal": (steer.get("goals") or {}).get("goal"),
        "detector_auroc": det_auc, "detector_token_baseline_auroc": det_tok,
        "detector_best_layer": None if not detector else detector["best_layer"],
    }
    return Claim("C5", "The lost breadth is latent in the RL network and can be elicited without retraining, beyond "
                 "what sampling the base model part of the time gives.", status,
                 effect_record("frontier excess of the best RL-alone cell (its restoration minus the base/RL mixture's at its "
                         "pass@1)", x, x_ci, "fraction of the base-RL distinct-correct gap", "problems (with their seeds)"),
                 rule, ev, why, flags=flags)

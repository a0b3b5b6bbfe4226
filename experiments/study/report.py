"""`results.json` and `report.md` of `forksight run`, assembled from the stage outputs of a run directory.

`build_results` reads the stages' metrics files, draws the two figures no stage draws (role
entropy over the RL log, pass@k of every model), tests the claims (`experiments.study.claims`) and
returns the results dict (schema in README.md, "results.json"). `write_report` renders it as
Markdown; every figure it references is a path relative to the run directory that exists.

Breadth is reported like with like (issue #23): the headline's distinct-correct is C4's paired
subset (named beside it), and `truncation` records the share of each model's test-half samples
(and of the steered, matched-temperature and patched cells C5 reads) that ended at the token budget;
above `probe.metrics.breadth.TRUNCATION_LIMIT` for a model, each claim that reads its samples
(`experiments.study.truncation`: `BREADTH_CLAIMS`, `claim_models`) carries a flag in results.json and the report.
Stage outputs written before `truncated_share` existed leave it unknown (None), flagging nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.run_state import as_json
from experiments.study.claims import (
    claim_breadth,
    claim_forks,
    claim_law,
    claim_recovery,
    claim_roles,
    role_entropies,
)
from experiments.study.claims_training import claim_phases, claim_regime, plot_phases
from experiments.study.realism import realism_row, realism_table
from experiments.study.sweep_report import spec_text
from experiments.study.truncation import (
    claim_models,
    flag_truncation,
    mean_by_key,
    mean_or_none,
    truncation_by_model,
)
from probe.atomic import write_text_atomic
from probe.environment import describe, environment
from probe.metrics.breadth import check_truncation
from probe.metrics.outcomes import Outcomes
from probe.metrics.passk import solution_counts
from probe.models.checkpoint import checkpoint_provenance, own_directory
from probe.stats import format_interval, format_number

SCHEMA_VERSION = 2
QUESTION = ("Does entropy collapse in RL training narrow inference-time search, and can the lost breadth be "
            "recovered from the trained network?")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: its stage did not finish; rerun `forksight run` with the same --out")
    return json.loads(path.read_text())


def _figures(out: Path, log: Path, curves: dict[str, dict]) -> dict[str, str | None]:
    """Draw pass@k of `curves` and, if the RL training `log` has per-role entropies, their trajectories."""
    from probe.metrics.evaluate import plot_pass_at_k
    from probe.plots import plot_role_entropy

    figs: dict[str, str | None] = {"role_entropy": None, "pass_at_k": "figures/pass_at_k.png"}
    (out / "figures").mkdir(exist_ok=True)
    plot_pass_at_k(curves, out / figs["pass_at_k"])
    if log.is_file():
        try:
            roles = dict(zip(("planning", "execution"), role_entropies(log, min_rows=4)))
        except ValueError:
            roles = None
        if roles is not None:
            plot_role_entropy(roles, out / "figures" / "role_entropy.png")
            figs["role_entropy"] = "figures/role_entropy.png"
    return figs


def pooled_references(sweep_json: Path) -> tuple[dict, dict]:
    """The base and RL rows of the sweep's test half, pooled over its test seeds: metrics averaged,
    `per_problem` arrays averaged elementwise (for paired bootstraps over problems), except
    `solution_counts`, counted over every seed's samples of a problem together (from the cells' outcomes)."""
    cells = json.loads(sweep_json.read_text())["cells"]
    out = []
    for model in ("base", "rl"):
        rows = sorted((c for c in cells if c["half"] == "test" and c["family"] == "reference"
                       and c["spec"] == {"model": model}), key=lambda c: c["seed"])
        if not rows:
            raise FileNotFoundError(f"{sweep_json} has no test-half {model} cell: the steer stage did not finish")
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        pooled = {**rows[0], "pass_at_1": mean([r["pass_at_1"] for r in rows]),  # a model that solves nothing has
                  "distinct_correct_mean": mean_or_none([r["distinct_correct_mean"] for r in rows]),  # no mean
                  "pass_at_k": {k: mean([r["pass_at_k"][k] for r in rows]) for k in rows[0]["pass_at_k"]},
                  "seeds": [r["seed"] for r in rows]}
        pp = [r["per_problem"] for r in rows]
        pooled["per_problem"] = {"n_correct": [mean(v) for v in zip(*(x["n_correct"] for x in pp))],
                                 "distinct_correct": [mean(v) for v in zip(*(x["distinct_correct"] for x in pp))],
                                 "distinct_eligible": [any(v) for v in zip(*(x["distinct_eligible"] for x in pp))]}
        if "distinct_rule" in pp[0]:  # the task's rule per problem (same at every seed); absent in older cells
            pooled["per_problem"]["distinct_rule"] = pp[0]["distinct_rule"]
        if all("outcomes" in r for r in rows):  # every seed's samples of a problem together, for matched counts
            keys = [Outcomes.from_json(r["outcomes"]).keys for r in rows]
            pooled["per_problem"]["solution_counts"] = [solution_counts([k for seed in keys for k in seed[p]])
                                                        for p in range(len(keys[0]))]
        pooled["truncated_share"] = mean_or_none([r.get("truncated_share") for r in rows])
        pooled["eos_by_budget"] = mean_by_key([r.get("eos_by_budget") for r in rows])
        pooled.pop("outcomes", None)
        out.append(pooled)
    return out[0], out[1]


def _matched_headline(matched: dict | None) -> dict | None:
    """C4's distinct-correct at matched correct-sample counts, flattened for the headline."""
    if matched is None:
        return None
    return {**{m: matched["mean"][m] for m in ("base", "rl")}, "n_problems": matched["n_problems"],
            "mean_m": matched["per_problem_m_mean"]}


def _goal_headline(goal: dict | None) -> dict | None:
    """The sweep's `goal` (the selection half's goal pick on the test half), flattened."""
    if goal is None:
        return None
    cell, dom = goal.get("cell") or {}, goal.get("pass_at_k_dominance") or {}
    return {"met": goal["met"], "interval_above_zero": goal.get("interval_above_zero"),
            **{k: cell.get(k) for k in ("family", "spec", "fraction", "frontier_excess", "frontier_excess_ci",
                                        "pass_at_1_change", "pass_at_1_change_ci", "truncated_share")},
            "pass_at_k_dominance": dom.get("met"), "pass_at_k_worst_k": dom.get("worst_k"),
            "pass_at_k_worst_margin": dom.get("worst_margin")}


def build_results(cfg, stage_cfgs: dict, out: str | Path) -> dict[str, Any]:
    """Claims, headline numbers and pointers of a finished run directory (every stage done)."""
    out = Path(out)
    base_dir, rl_dir, variants = cfg.pair()
    probe = _read(out / "probe" / "metrics.json")
    sae = _read(out / "sae" / "metrics.json")
    diff = _read(out / "sae" / "diff" / "metrics.json")
    steer = _read(out / "steer" / "metrics.json")
    base, rl = pooled_references(out / "steer" / "sweep.json")
    curves = {"base": base, "rl": rl, **{k: v for k, v in steer["variants"].items() if v}}
    if steer.get("best"):
        curves["rl steered (best)"] = steer["best"]
    log = own_directory(rl_dir) / "train_log.jsonl"
    figs = _figures(out, log, curves)
    c1 = claim_law(probe.get("law"))
    c1.figures = ["probe/law_fit.png"] if probe.get("law", {}).get("available") else []
    c2 = claim_forks(probe["on_base_samples"], probe["rho"])
    c2.figures = ["probe/entropy_hist.png", "probe/entropy_heatmap.png"]
    c3 = claim_roles(str(log) if figs["role_entropy"] else None, seed=cfg.seed)
    c3.figures = [figs["role_entropy"]] if figs["role_entropy"] else []
    c3b = claim_phases(str(log) if figs["role_entropy"] else None, seed=cfg.seed)
    if "change_point_step" in c3b.evidence:
        c3b.figures = [str(plot_phases(str(log), c3b, out / "figures" / "phases.png").relative_to(out))]
    c4 = claim_breadth(base, rl, seed=cfg.seed)
    c4.figures = [figs["pass_at_k"]]
    c5 = claim_recovery(steer, base, rl, probe.get("detector"), seed=cfg.seed)
    c5.figures = ["steer/pareto.png", "steer/pareto_selection.png", "steer/patching_curve.png", "steer/pass_at_k.png",
                  "sae/diff/fork_frequencies.png"]
    cells = json.loads((out / "steer" / "sweep.json").read_text())["cells"]
    c6, matches = claim_regime(cells, variants, seed=cfg.seed)
    if matches:
        from probe.metrics.compute_match import plot_compute_match

        curves = {m: mt["pass_at_k_reference"] for m, mt in matches.items()}
        curves["rl"] = next(iter(matches.values()))["pass_at_k_other"]  # every k' = 1..n
        plot_compute_match(curves, matches, out / "figures" / "compute_match.png", collapsed="rl")
        c6.figures = ["figures/compute_match.png"]
    shares, by_budget = truncation_by_model(cells, variants, steer)
    truncation = check_truncation(shares, by_budget=by_budget)
    truncation["claims_flagged"] = flag_truncation([c1, c2, c3, c3b, c4, c5, c6], truncation, claim_models(variants))
    claims = [c.to_dict() for c in (c1, c2, c3, c3b, c4, c5, c6)]
    for c in claims:
        missing = [f for f in c["figures"] if not (out / f).is_file()]
        c["figures"] = [f for f in c["figures"] if f not in missing]
    best = steer.get("best") or {}
    ev5 = c5.evidence
    n = int(base["n_samples"])
    headline = {
        "pass_at_1": {"base": base["pass_at_1"], "rl": rl["pass_at_1"]},
        f"pass_at_{n}": {"base": base["pass_at_k"][str(n)], "rl": rl["pass_at_k"][str(n)]},
        "distinct_correct_mean": {m: c4.evidence["distinct_correct_mean"][m] for m in ("base", "rl")},
        "distinct_correct_subset": (f"{c4.evidence['distinct_correct_mean']['n_problems']} problems, the same for both "
                                    f"({c4.evidence['distinct_correct_mean']['subset']})"),
        "distinct_correct_all_problems": {m: c4.evidence["distinct_correct_all_problems"][m] for m in ("base", "rl")},
        "distinct_measure": c4.evidence["distinct_measure"],
        "distinct_correct_paired": {**{m: c4.evidence["distinct_correct_paired"][m] for m in ("base", "rl")},
                                    "n_problems": c4.evidence["distinct_correct_paired"]["n_problems"],
                                    "subset": c4.evidence["distinct_correct_paired"]["subset"]},
        "distinct_correct_matched": _matched_headline(c4.evidence.get("distinct_correct_matched")),
        "truncated_share": {m: truncation["truncated_share"][m] for m in ("base", "rl")},
        "goal": _goal_headline((steer.get("goals") or {}).get("goal")),
        "entropy_change_share_on_forks": c2.effect["value"],
        "law_r2": c1.effect["value"],
        "detector_auroc": ev5["detector_auroc"],
        "best_rl_alone": {k: best.get(k) for k in ("family", "spec", "fraction", "params")} if best else None,
        "best_restoration_distinct": best.get("restoration_distinct"),
        "best_restoration_distinct_ci": best.get("restoration_distinct_ci"),
        "best_pass_at_1_minus_rl": best.get("pass_at_1_change"),
        "best_frontier_excess": best.get("frontier_excess"),
        "best_frontier_excess_ci": best.get("frontier_excess_ci"),
        "patching_upper_bound_restoration": ev5["patching_upper_bound_restoration"],
        "patching_curves_half": ev5["curves_half"],
        "planning_entropy_late_log_change": c3b.effect["value"],
        "compute_multiplier_k_ref": c6.effect["value"], "compute_multiplier_k_ref_ci": c6.effect["ci"],
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "question": QUESTION,
        "out": str(out),
        "task": getattr(cfg, "task", "countdown"),
        "pair": {"base": base_dir, "rl": rl_dir, "variants": list(variants)},
        "checkpoints": {"base": checkpoint_provenance(base_dir), "rl": checkpoint_provenance(rl_dir),
                        "variants": [checkpoint_provenance(v) for v in variants]},
        "config": {"run": as_json(cfg), **{k: as_json(v) for k, v in stage_cfgs.items()
                                           if k in ("probe", "sae", "sae_diff", "sweep")},
                   "learn": {k: [as_json(x) for x in v] for k, v in stage_cfgs["learn"].items()}},
        "claims": claims,
        "headline": headline,
        "sae": {k: sae.get(k) for k in ("hook_name", "l0", "fvu", "dead_fraction", "ce_loss_increase")} |
               {k: ((sae.get("quality") or {}).get("base") or {}).get(k) for k in ("n_sink_tokens", "sink_variance_share")} |
               {"n_pruned_3x": diff["summary"]["n_pruned_3x"], "top_pruned": [
                   {k: f.get(k) for k in ("feature", "freq_base", "freq_rl", "score")} for f in diff.get("pruned", [])[:5]]},
        "stages": {"probe": "probe/metrics.json", "sae": "sae/metrics.json", "sae_diff": "sae/diff/metrics.json",
                   "steer": "steer/metrics.json", "steer_cells": "steer/sweep.json"},
        "figures": sorted({f for c in claims for f in c["figures"]}),
        "truncation": truncation,
        "engines": stage_engines(steer),
        **replication(cfg, out),
        "environment": environment(),
    }


def stage_engines(steer: dict) -> dict[str, Any]:
    """Which engine sampled each stage: the sweep's record (`Sweep.engine_record`; "hf" for sweeps made
    before the engine was a setting), and the stages that sample on the HF engine whatever --engine says."""
    from experiments.study.engines import HF_STAGES

    return {"steer": steer.get("engines") or {"engine": "hf"},
            **{k: {"engine": "hf", "why": why} for k, why in HF_STAGES.items() if k != "derive"}}


def replication(cfg, out: Path) -> dict[str, Any]:
    """{"replication": ...} from `forksight replicate`'s shipped results when this run studies the
    shipped pair (its depth figure copied into `out/figures/`); {} otherwise."""
    from experiments.paths import REPLICATE_DIR
    from experiments.study.replicate_report import copy_for_run, summary_for_results

    path = REPLICATE_DIR / "results.json"
    if cfg.base or cfg.from_scratch or not path.is_file():
        return {}
    rep = json.loads(path.read_text())
    return {"replication": {**summary_for_results(rep), "source": "experiments/results/replicate/results.json",
                            "figure": copy_for_run(rep, REPLICATE_DIR, out)}}


def _above(e: dict) -> str:
    """How a None of a censored effect (C6's multiplier: more than its cap) reads; "n/a" otherwise."""
    return "n/a" if e.get("cap") is None else f"more than {e['cap']:g}"


def _value(e: dict) -> str:
    return _above(e) if e["value"] is None and e.get("cap") else format_number(e["value"])


SERIES_SHOWN = 8
"""A list of more numbers than this (a pass@k curve over every k) shows as its length and ends in the
report; results.json keeps every value."""


def _inline(v: Any) -> str:
    """One evidence value on one line: a cell's spec as `sweep_report.spec_text`, nested dicts and lists of
    dicts in parentheses, numeric series longer than SERIES_SHOWN as their length and ends."""
    def part(key: Any, x: Any) -> str:
        if key == "spec" and isinstance(x, dict):
            return spec_text(x)
        nested = isinstance(x, dict) or (isinstance(x, list) and x and all(isinstance(y, dict) for y in x))
        return f"({_inline(x)})" if nested else _inline(x)

    if isinstance(v, dict):
        return ", ".join(f"{k} {part(k, x)}" for k, x in v.items())
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return "; ".join(_inline(x) for x in v)
    if isinstance(v, list) and len(v) > SERIES_SHOWN and all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v):
        return f"({len(v)} values: {format_number(v[0])} ... {format_number(v[-1])})"
    if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
        return "[" + ", ".join(part(None, x) for x in v) + "]"
    return format_number(v)


def _evidence_lines(ev: dict, depth: int = 0) -> list[str]:
    lines = []
    for k, v in ev.items():
        if isinstance(v, dict) and depth == 0:
            lines.append(f"- {k}:")
            lines += ["  " + x for x in _evidence_lines(v, 1)]
        else:
            lines.append(f"- {k}: {_inline(v)}")
    return lines


def claims_table(results: dict) -> list[str]:
    """Markdown lines of the claims table (header, rule, one row per claim with status, effect and interval)."""
    lines = ["| claim | status | effect | value | 95% CI |", "|---|---|---|---|---|"]
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731  a literal | would split the table cell
    for c in results["claims"]:
        e = c["effect"]
        flag = " (flagged: see its caveats)" if c.get("flags") else ""
        lines.append(f"| {c['id']}: {cell(c['statement'])}{flag} | **{c['status']}** | {cell(e['name'])} | {_value(e)} | "
                     f"{format_interval(e['ci'], open_bound=_above(e))} |")
    return lines


def write_report(results: dict, path: str | Path) -> Path:
    """Render `results` as Markdown at `path` (atomically)."""
    path = Path(path)
    h = results["headline"]
    L = ["# forksight run: report", "", f"**Question.** {results['question']}", "",
         f"Task: `{results.get('task', 'countdown')}`. "
         f"Pair: base `{results['pair']['base']}`, RL `{results['pair']['rl']}`; entropy-preserving variants: "
         + (", ".join(f"`{v}`" for v in results["pair"]["variants"]) or "none") + ".", "",
         "Each claim is tested on this run's data; its status (holds / fails / inconclusive) comes from the rule "
         "stated under it, applied to the effect size and its 95% bootstrap interval. Nothing here is typed in.", "",
         *claims_table(results)]
    trunc = results.get("truncation") or {}
    if trunc.get("message"):
        L += ["", "## Warning: samples cut off by the token budget", "",
              f"{trunc['message']}. Claims flagged: {', '.join(trunc['claims_flagged']) or 'none'}."]
    L += ["", "## This pair beside others", "",
          "The five quantities a reader compares across base / RL pairs, each read from this run's claims, then "
          "what papers report for real pairs (`experiments.study.realism`):", "",
          realism_table({"this run": realism_row(results)})]
    L += ["", "## Headline numbers", ""]
    L += [f"- {k}: " + (format_interval(v) if isinstance(v, list) and len(v) == 2 else _inline(v)) for k, v in h.items()]
    for c in results["claims"]:
        e = c["effect"]
        L += ["", f"## {c['id']}: {c['statement']}", "",
              f"**Status: {c['status']}.** {c['reason']}", "",
              *[x for f in c.get("flags") or [] for x in (f"**Caveat:** {f}.", "")],
              f"Effect: {e['name']} = {_value(e)} {format_interval(e['ci'], open_bound=_above(e))} ({e['units']}; bootstrap over "
              f"{e['resampled']}).", "",
              f"Rule: {c['rule']}.", "", "Evidence:", ""]
        L += _evidence_lines(c["evidence"])
        for f in c["figures"]:
            L += ["", f"![{c['id']}: {Path(f).stem}]({f})"]
    if results.get("replication"):
        from experiments.study.replicate_report import replication_section

        rep = results["replication"]
        L += [""] + replication_section(rep, rep.get("figure")) + ["", f"Source: `{rep['source']}` (`forksight replicate`)."]
    s = results["sae"]
    L += ["", "## SAE", "", f"{s['hook_name']}: L0 {format_number(s['l0'], 1)}, FVU {format_number(s['fvu'])}, dead fraction "
          f"{format_number(s['dead_fraction'])}, next-token loss increase {format_number(s['ce_loss_increase'])} nats"
          + (f" (attention sinks left out: {s['n_sink_tokens']} tokens, {format_number(s.get('sink_variance_share'))} of "
             "the variance)" if s.get("n_sink_tokens") else "") + "; "
          f"{s['n_pruned_3x']} features are >= 3x weaker at forks under RL (mean activation). Top pruned:", ""]
    L += [f"- feature {f['feature']}: fork frequency base {format_number(f['freq_base'])} -> RL {format_number(f['freq_rl'])} "
          f"(score {format_number(f['score'])})" for f in s["top_pruned"]]
    run = results.get("run", {})
    if run:
        L += ["", "## Run", "", "| stage | seconds |", "|---|---|"]
        L += [f"| {k} | {format_number(v.get('seconds'), 1)} |" for k, v in run.get("stages", {}).items()]
        L += ["", f"Reused from an earlier invocation: {', '.join(run.get('reused_stages', [])) or 'none'}."]
    eng = (results.get("engines") or {}).get("steer") or {}
    if eng.get("engine", "hf") != "hf":
        cells = ", ".join(f"{n} on {e}" for e, n in sorted((eng.get("cells") or {}).items()))
        L += ["", f"Sampling engine: {eng['engine']} for the sweep's cells ({cells}; families sampled on the HF "
              f"engine instead: {', '.join(eng.get('on_hf_instead') or {}) or 'none'}); probe, SAE and learned "
              "edits on the HF engine (per-token entropy, activations, gradients). Entropy means of cells sampled "
              "on vLLM are not measured."]
    L += ["", "## Environment", "", describe(results.get("environment")) + ". Each stage's metrics.json records "
          "its own (a stage reused from an earlier invocation may have been made with other versions)."]
    L += ["", "Numbers and their provenance: `results.json` (schema in the README), stage folders "
          + ", ".join(f"`{v}`" for v in results["stages"].values()) + "."]
    write_text_atomic(path, "\n".join(L) + "\n")
    return path

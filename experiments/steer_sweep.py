"""`forksight steer sweep`: layer x coefficient x gate x temperature, baselines, patching curve.

Two stages on the held-out split, one sampling seed for every cell (common random numbers):
1. *screen* on the first `screen_problems` problems: base, RL, RL at higher temperatures, the
   entropy-preserving RL checkpoint (if present), every steering cell (saved vectors, the RL model
   alone) and cross-model patching (RL sampling, its layer-L residual pulled toward the base's at the
   base model's forks, `base_entropy` gate at the base fork threshold) at each layer and alpha;
2. *confirm* on the full split: base, RL, the `confirm` best screened steering cells, the
   matched-entropy temperature cell and the best patching cell; `best` is chosen there.

Restoration of metric m: (m(cell) - m(RL)) / (m(base) - m(RL)), base and RL evaluated in the same run
on the same problems. Selection rule (SELECTION): highest restoration_distinct among RL-alone
steering cells whose pass_at_1 >= RL's pass_at_1 - `pass_at_1_tolerance`. Matched entropy: the
temperature cell whose fork_entropy_mean (entropy of the sampled distribution, at its temperature)
is nearest the best steered cell's. Resumable: each finished cell is appended to `sweep.json`
(atomically) and read back on restart; vectors are saved under `vectors/` and reused.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.checkpointing import write_json_atomic
from experiments.countdown import Countdown
from experiments.evaluation import heldout_prompts
from experiments.organism import ORGANISMS_DIR
from experiments.steer_study import (
    METHODS,
    RESULTS,
    STUDY_GATES,
    DeriveConfig,
    derive_vectors,
    evaluate_cell,
    one_layer,
    steer_intervention,
)
from probe.checkpoint import load_causal_lm
from steering import SteeringVector, patch

SELECTION = ("highest restoration_distinct among RL-alone steering cells (saved vector, no base model) with "
             "pass_at_1 >= rl.pass_at_1 - {tol}, on the full held-out split")
COLUMNS = ("id", "stage", "kind", "method", "layer", "coef", "gate", "temperature", "n_problems", "n_samples",
           "pass_at_1", "pass_at_64", "distinct_correct_mean", "fork_entropy_mean", "planning_entropy_mean",
           "restoration_pass_at_64", "restoration_distinct", "rl_alone", "seconds")


@dataclass
class SweepConfig:
    """Steering sweep with honest baselines and the cross-model patching curve."""

    base: str = str(ORGANISMS_DIR / "base")
    """Base checkpoint."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """Collapsed RL checkpoint (the model steered)."""
    entropy_rl: str = str(ORGANISMS_DIR / "rl-clip-cov")
    """Entropy-preserving RL checkpoint, a baseline row if the directory exists."""
    out: str = str(RESULTS / "steer-sweep")
    """Output directory (metrics.json, sweep.csv, sweep.json, plots, vectors/)."""
    methods: tuple[str, ...] = ("dom-position", "dom-global")
    """Vector methods (steer_study.METHODS); sae has only the SAE's layer."""
    layers: tuple[int, ...] = (2, 3)
    """Steered layers."""
    coefs: tuple[float, ...] = (0.5, 1.0)
    """Coefficients (normalisation 'none': 1 = the mean base-minus-RL difference at forks)."""
    gates: tuple[str, ...] = ("always", "planning")
    """Gates (steer_study.STUDY_GATES)."""
    steer_temperatures: tuple[float, ...] = (1.0,)
    """Sampling temperatures of steered cells."""
    temperatures: tuple[float, ...] = (1.2, 1.5, 2.0)
    """Temperatures of the unsteered-RL baseline."""
    patch_layers: tuple[int, ...] = (0, 1, 2, 3)
    """Layers of the cross-model patching curve."""
    alphas: tuple[float, ...] = (1.0,)
    """Patching strengths (1 = the base residual)."""
    screen_problems: int = 128
    """Held-out problems of the screening stage."""
    problems: int = 0
    """Held-out problems of the confirm stage (0 = all)."""
    n: int = 64
    """Samples per problem."""
    confirm: int = 2
    """Screened steering cells re-evaluated on the full split."""
    confirm_patch: bool = True
    """Re-evaluate the best patching cell on the full split (else it is reported on the screen split)."""
    pass_at_1_tolerance: float = 0.02
    """Allowed pass@1 drop below RL for `best`."""
    derive_problems: int = 256
    """Training-stream problems the vectors are derived from."""
    detector: str = str(RESULTS / "probe" / "fork_detector.safetensors")
    """Fork detector (gate detector)."""
    seed: int = 0
    """Sampling seed (every cell)."""
    batch_size: int = 1024
    """Rows per forward pass."""

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"method {m!r}; allowed {METHODS}")
        for g in self.gates:
            if g not in STUDY_GATES:
                raise ValueError(f"gate {g!r}; allowed {STUDY_GATES}")
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas {self.alphas} must be in [0, 1]")
        if self.screen_problems < 1 or self.n < 1 or self.confirm < 1:
            raise ValueError("screen_problems, n and confirm must be >= 1")


def restoration(cell: float | None, rl: float | None, base: float | None) -> float | None:
    """(cell - rl) / (base - rl); None when undefined (a missing value or base == rl)."""
    if cell is None or rl is None or base is None or base == rl:
        return None
    return (cell - rl) / (base - rl)


def with_restoration(row: dict, base: dict, rl: dict) -> dict:
    return {**row, "restoration_pass_at_64": restoration(row.get("pass_at_64"), rl.get("pass_at_64"), base.get("pass_at_64")),
            "restoration_distinct": restoration(row.get("distinct_correct_mean"), rl.get("distinct_correct_mean"),
                                                base.get("distinct_correct_mean"))}


def select_best(rows: list[dict], rl: dict, tol: float) -> dict | None:
    """SELECTION applied to `rows` (already carrying restoration)."""
    ok = [r for r in rows if r["kind"] == "steer" and r["rl_alone"] and r["restoration_distinct"] is not None
          and r["pass_at_1"] >= rl["pass_at_1"] - tol]
    return max(ok, key=lambda r: (r["restoration_distinct"], r["id"]), default=None)


def _score(r: dict) -> tuple[float, str]:
    """Sort key: restoration_distinct (None lowest), ties broken by id so a resumed run picks the same cells."""
    return (-float("inf") if r.get("restoration_distinct") is None else r["restoration_distinct"], r["id"])


class Sweep:
    """The cell cache: rows by id, read back from `sweep.json`, written after every new cell."""

    def __init__(self, cfg: SweepConfig):
        import json

        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "sweep.json"
        self.rows: dict[str, dict] = {r["id"]: r for r in json.loads(path.read_text())["cells"]} if path.is_file() else {}
        self.reused = len(self.rows)
        self.rl, self.tok = load_causal_lm(cfg.rl, device="cpu")
        self._base = None
        self.prompts = {s: heldout_prompts(Countdown(), p) for s, p in (("screen", cfg.screen_problems), ("full", cfg.problems))}

    @property
    def base(self):
        if self._base is None:
            self._base = load_causal_lm(self.cfg.base, device="cpu")[0]
        return self._base

    def cell(self, stage: str, kind: str, model=None, intervention=None, *, method="", layer=None, coef=None,
             gate="", temperature=1.0, rl_alone=True) -> dict:
        key = "|".join(map(str, (stage, kind, method, layer, coef, gate, temperature)))
        if key in self.rows:
            return self.rows[key]
        t0, c = time.time(), self.cfg
        m = evaluate_cell(model or self.rl, self.tok, self.prompts[stage], c.n, temperature, c.seed, c.batch_size,
                          intervention() if callable(intervention) else None)
        row = {"id": key, "stage": stage, "kind": kind, "method": method, "layer": layer, "coef": coef, "gate": gate,
               "temperature": temperature, "rl_alone": rl_alone, "seconds": time.time() - t0,
               **{k: m.get(k) for k in ("n_problems", "n_samples", "pass_at_1", "pass_at_64", "distinct_correct_mean",
                                     "fork_entropy_mean", "planning_entropy_mean", "pass_at_k", "pass_at_k_ci")}}
        self.rows[key] = row
        write_json_atomic(self.out / "sweep.json", {"config": asdict(c), "cells": list(self.rows.values())})
        return row

    def table(self) -> list[dict]:
        """Every row with restoration against base and RL of its own stage."""
        ref = {s: (self.rows.get(f"{s}|base||None|None||1.0"), self.rows.get(f"{s}|rl||None|None||1.0"))
               for s in ("screen", "full")}
        return [with_restoration(r, *ref[r["stage"]]) if all(ref[r["stage"]]) else r for r in self.rows.values()]


def vectors(cfg: SweepConfig) -> dict[str, SteeringVector]:
    """The sweep's vectors (all its layers), derived once and saved under `out/vectors/`."""
    vdir = Path(cfg.out) / "vectors"
    paths = {m: vdir / f"{m}.safetensors" for m in cfg.methods}
    if all(p.is_file() for p in paths.values()):
        return {m: SteeringVector.load(p) for m, p in paths.items()}
    dc = DeriveConfig(base=cfg.base, rl=cfg.rl, layers=tuple(cfg.layers), n_problems=cfg.derive_problems,
                      seed=cfg.seed)
    out = derive_vectors(dc, tuple(cfg.methods))
    for m, v in out.items():
        v.save(paths[m])
    return out


def run_sweep(cfg: SweepConfig) -> dict:
    from experiments.steer_plots import plot_pareto, plot_pass_at_k_best, plot_patching

    t0 = time.time()
    sw, vecs = Sweep(cfg), vectors(cfg)
    thr_base = next(iter(vecs.values())).config["fork_threshold_base"]
    S = "screen"
    sw.cell(S, "base", sw.base, rl_alone=False)
    sw.cell(S, "rl")
    for t in cfg.temperatures:
        sw.cell(S, "temperature", temperature=t)
    if Path(cfg.entropy_rl).is_dir():
        sw.cell(S, "entropy_rl", load_causal_lm(cfg.entropy_rl, device="cpu")[0], rl_alone=False)
    for layer in cfg.patch_layers:
        for a in cfg.alphas:
            sw.cell(S, "patch", None, lambda L=layer, a=a: patch(sw.rl, sw.base, L, a, gate="base_entropy", threshold=thr_base),
                    layer=layer, coef=a, gate="base_entropy", rl_alone=False)
    for m, v in vecs.items():
        for layer in (x for x in cfg.layers if x in v.layers):
            vl = one_layer(v, layer)
            for coef in cfg.coefs:
                for gate in cfg.gates:
                    for t in cfg.steer_temperatures:
                        sw.cell(S, "steer", None, lambda vl=vl, c=coef, g=gate: steer_intervention(
                            sw.rl, sw.tok, vl, c, g, cfg.detector), method=m, layer=layer, coef=coef, gate=gate, temperature=t)
    screen = [r for r in sw.table() if r["stage"] == S]
    rl_s = next(r for r in screen if r["kind"] == "rl")
    steer = sorted((r for r in screen if r["kind"] == "steer"),
                   key=lambda r: (r["pass_at_1"] >= rl_s["pass_at_1"] - cfg.pass_at_1_tolerance, _score(r)),
                   reverse=True)[: cfg.confirm]
    patches = [r for r in screen if r["kind"] == "patch"]
    best_patch_s = max(patches, key=_score)  # the upper bound: most restoration, whatever pass@1 costs
    F = "full"
    sw.cell(F, "base", sw.base, rl_alone=False)
    rl_f = sw.cell(F, "rl")
    for r in steer:
        vl = one_layer(vecs[r["method"]], r["layer"])
        sw.cell(F, "steer", None, lambda vl=vl, r=r: steer_intervention(sw.rl, sw.tok, vl, r["coef"], r["gate"], cfg.detector),
                method=r["method"], layer=r["layer"], coef=r["coef"], gate=r["gate"], temperature=r["temperature"])
    if cfg.confirm_patch:
        sw.cell(F, "patch", None, lambda r=best_patch_s: patch(sw.rl, sw.base, r["layer"], r["coef"], gate="base_entropy",
                threshold=thr_base), layer=best_patch_s["layer"], coef=best_patch_s["coef"], gate="base_entropy",
                rl_alone=False)
    full = [r for r in sw.table() if r["stage"] == F]
    best = select_best(full, rl_f, cfg.pass_at_1_tolerance)
    anchor = best or max((r for r in full if r["kind"] == "steer"), key=_score)
    temps = [r for r in screen if r["kind"] == "temperature"]
    t_match = min(temps, key=lambda r: abs((r["fork_entropy_mean"] or 0) - (anchor["fork_entropy_mean"] or 0)))
    sw.cell(F, "temperature", temperature=t_match["temperature"])
    table = sw.table()
    full = [r for r in table if r["stage"] == F]
    def pick(kind: str) -> dict | None:
        row = next((r for r in full if r["kind"] == kind), None)
        if row is None and kind == "patch":  # not confirmed: the screened cell (restoration vs screen base / RL)
            row = next(r for r in table if r["id"] == best_patch_s["id"])
        return row

    write_table(sw.out, table)
    plot_pareto(table, sw.out / "pareto.png")
    plot_patching([r for r in table if r["stage"] == S and r["kind"] == "patch"], sw.out / "patching_curve.png")
    plot_pass_at_k_best({"base": pick("base"), "rl": pick("rl"), "steered (best)": anchor,
                         f"rl T={t_match['temperature']}": pick("temperature")}, sw.out / "pass_at_k.png")
    return write_metrics(cfg, sw, table, best, anchor, pick, t0)


def _brief(r: dict | None) -> dict | None:
    keep = ("method", "layer", "coef", "gate", "temperature", "pass_at_1", "pass_at_64", "distinct_correct_mean",
            "fork_entropy_mean", "planning_entropy_mean", "restoration_pass_at_64", "restoration_distinct",
            "n_problems", "n_samples", "pass_at_k", "id")
    return None if r is None else {k: r.get(k) for k in keep}


def write_metrics(cfg: SweepConfig, sw: Sweep, table, best, anchor, pick, t0) -> dict:
    rl, tb = pick("rl"), pick("temperature")
    screen = [r for r in table if r["stage"] == "screen"]
    tol = cfg.pass_at_1_tolerance
    goal_met = best is not None and best["restoration_distinct"] >= 0.3
    beats = {k: anchor[k] - tb[k] for k in ("restoration_distinct", "restoration_pass_at_64", "pass_at_1")
             if anchor.get(k) is not None and tb.get(k) is not None}
    curve = [{k: r[k] for k in ("layer", "coef", "pass_at_1", "pass_at_64", "distinct_correct_mean",
                                "restoration_pass_at_64", "restoration_distinct")}
             for r in sorted((r for r in table if r["stage"] == "screen" and r["kind"] == "patch"),
                             key=lambda r: (r["layer"], r["coef"]))]
    metrics = {
        "selection_rule": SELECTION.format(tol=tol),
        "best": _brief(best) and {**_brief(best), "coefficient": best["coef"], "vector": f"vectors/{best['method']}.safetensors",
                                  "vector_layer": best["layer"]},
        "best_note": None if best else "no steering cell met the pass@1 constraint on the full split; "
                                       "`best_unconstrained` is the highest restoration_distinct cell",
        "best_unconstrained": _brief(anchor),
        "goal": {"restoration_distinct_min": 0.3, "pass_at_1_min": rl["pass_at_1"] - tol, "met": goal_met},
        "base": _brief(pick("base")), "rl": _brief(rl),
        "temperature_baseline": {**_brief(tb), "matched_on": "fork_entropy_mean nearest the best steered cell's "
                                 "(screen stage), then re-evaluated on the full split"},
        "steering_minus_temperature": beats,
        "steering_beats_temperature": bool(beats.get("restoration_distinct", 0) > 0 and beats.get("pass_at_1", 0) >= -tol),
        "entropy_preserving_rl": _brief(next((r for r in screen if r["kind"] == "entropy_rl"), None)),
        "entropy_preserving_rl_note": "screen split only (its own metrics.json has the full split)",
        "patching_upper_bound": {**_brief(pick("patch")), "alpha": pick("patch")["coef"],
                                 "split": "full" if cfg.confirm_patch else f"first {cfg.screen_problems} held-out problems",
                                 "gate": "base_entropy (base model's forks, threshold from the derive trajectories)"},
        "temperature_screen": [_brief(r) for r in screen if r["kind"] == "temperature"],
        "screen_best_per_method": _per_method(screen, cfg.pass_at_1_tolerance),
        "patching_best_within_tolerance": _brief(select_best([{**r, "kind": "steer", "rl_alone": True} for r in screen
                                                              if r["kind"] == "patch"], next(r for r in screen if r["kind"] == "rl"), tol)),
        "patching_curve": curve, "patching_curve_split": f"first {cfg.screen_problems} held-out problems",
        "n_cells": len(table), "n_cells_reused": sw.reused, "seconds": time.time() - t0,
        "tables": ["sweep.csv", "sweep.json"], "plots": ["pareto.png", "pass_at_k.png", "patching_curve.png"],
        "config": asdict(cfg),
    }
    write_json_atomic(sw.out / "metrics.json", metrics)
    return metrics


def _per_method(screen: list[dict], tol: float) -> dict:
    """Per method: the screened cell SELECTION would pick (None if no cell keeps pass@1)."""
    rl = next(r for r in screen if r["kind"] == "rl")
    out = {}
    for m in sorted({r["method"] for r in screen if r["kind"] == "steer"}):
        b = select_best([r for r in screen if r["kind"] == "steer" and r["method"] == m], rl, tol)
        out[m] = b and {k: b[k] for k in ("layer", "coef", "gate", "pass_at_1", "restoration_distinct",
                                          "restoration_pass_at_64")}
    return out


def write_table(out: Path, table: list[dict]) -> None:
    tmp = out / ".sweep.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    tmp.replace(out / "sweep.csv")


def cmd_sweep(args: argparse.Namespace) -> dict:
    from experiments.cli_args import config_from_args

    m = run_sweep(config_from_args(SweepConfig, args))
    b = m["best"] or m["best_unconstrained"]
    return {"out": m["config"]["out"], "goal_met": m["goal"]["met"], "best": {k: b[k] for k in (
        "method", "layer", "coef", "gate", "pass_at_1", "restoration_distinct", "restoration_pass_at_64")},
        "steering_beats_temperature": m["steering_beats_temperature"]}

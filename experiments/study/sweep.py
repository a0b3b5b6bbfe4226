"""`forksight steer sweep`: layer x coefficient x gate x temperature, baselines, patching curve.

Two stages on the held-out split, one sampling seed for every cell (common random numbers):
1. *screen* on the first `screen_problems` problems: base, RL, RL at higher temperatures, the
   entropy-preserving RL checkpoint (if present), every steering cell (saved vectors, the RL model
   alone) and cross-model patching (RL sampling, its layer-L residual pulled toward the base's at the
   base model's forks, `base_entropy` gate at the base fork threshold) at each layer and alpha;
2. *confirm* on the full split, at `confirm_seeds` sampling seeds whose metrics are averaged (so the
   winner is not picked on one draw's noise): base, RL, the `confirm` best screened steering cells of
   this invocation's methods plus every steering cell confirmed before, the matched-entropy
   temperature cell and the best patching cell; `best` is chosen there. `confirmed.json` holds
   these pooled rows with their per-problem arrays (for paired bootstraps) where every pooled cell
   recorded them (cells cached by an older version of the sweep did not).

Restoration of metric m: (m(cell) - m(RL)) / (m(base) - m(RL)), base and RL evaluated in the same run
on the same problems (pooled over the confirm seeds on the full split). Selection rule (SELECTION): highest restoration_distinct among RL-alone
steering cells whose pass_at_1 >= RL's pass_at_1 - `pass_at_1_tolerance`. Matched entropy: the
temperature cell whose fork_entropy_mean (entropy of the sampled distribution, at its temperature)
is nearest the best steered cell's. Resumable: each finished cell is appended to `sweep.json`
(atomically) and read back on restart; vectors are saved under `vectors/` and reused.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.checkpointing import write_json_atomic
from experiments.paths import ORGANISMS_DIR, RESULTS_DIR
from experiments.study.selection import (
    beats_temperature,
    full_stage,
    parse_layers,
    pool,
    score,
    select_best,
    with_restoration,
)
from experiments.study.steer_stage import (
    STUDY_GATES,
    DeriveConfig,
    derive_vectors,
    evaluate_cell,
    split_method,
    steer_intervention,
)
from experiments.tasks.countdown import Countdown
from probe.checkpoint import load_causal_lm
from steering import SteeringVector, patch

SELECTION = ("highest restoration_distinct among RL-alone steering cells (saved vector, no base model) with "
             "pass_at_1 >= rl.pass_at_1 - {tol}, on the full held-out split (metrics averaged over the confirm seeds)")
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
    out: str = str(RESULTS_DIR / "steer-sweep")
    """Output directory (metrics.json, sweep.csv, sweep.json, plots, vectors/)."""
    methods: tuple[str, ...] = ("dom-position", "dom-global")
    """Vector methods (steer_study.METHODS), each optionally ":pruned" (derived at the base forks RL
    collapsed instead of all base forks); sae has only the SAE's layer."""
    layers: tuple[str, ...] = ("2", "3")
    """Steered layer sets: "2" steers block 2, "0+1+2+3" steers blocks 0-3 at once (coef at each)."""
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
    screen_tolerance: float = 0.05
    """pass@1 drop below RL (screen split) within which screened cells are ranked first for confirmation
    (the screen's half of the problems has a larger base-RL gap, so the full split's tolerance is too strict there)."""
    derive_problems: int = 256
    """Training-stream problems the vectors are derived from."""
    detector: str = str(RESULTS_DIR / "probe" / "fork_detector.safetensors")
    """Fork detector (gate detector)."""
    sae: str = str(RESULTS_DIR / "sae" / "sae")
    """SAE directory (method sae)."""
    sae_diff: str = str(RESULTS_DIR / "sae" / "diff" / "metrics.json")
    """`forksight sae diff` metrics.json listing the pruned features (method sae)."""
    confirm_seeds: int = 2
    """Sampling seeds (seed, seed + 1, ...) of every confirm-stage cell; the full split's metrics are averaged
    over them, so `best` is not chosen on one draw's sampling noise."""
    seed: int = 0
    """Sampling seed (every cell)."""
    batch_size: int = 1024
    """Rows per forward pass."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu (both models, sampling and derivation)."""

    def __post_init__(self) -> None:
        for m in self.methods:
            split_method(m)
        self.layers = tuple(str(x) for x in self.layers)
        for spec in self.layers:
            parse_layers(spec)
        for g in self.gates:
            if g not in STUDY_GATES:
                raise ValueError(f"gate {g!r}; allowed {STUDY_GATES}")
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas {self.alphas} must be in [0, 1]")
        if self.screen_problems < 1 or self.n < 1 or self.confirm < 1 or self.confirm_seeds < 1:
            raise ValueError("screen_problems, n, confirm and confirm_seeds must be >= 1")


CACHE_FINGERPRINT = ("base", "rl", "n", "seed", "screen_problems", "problems", "derive_problems", "batch_size")
"""Settings every cached cell (and vector) depends on but its id does not name: a sweep directory keeps one value
of each (checkpoints compared by directory name, so a moved clone still reuses its shipped cells)."""

class Sweep:
    """The cell cache: rows by id, read back from `sweep.json`, written after every new cell."""

    def __init__(self, cfg: SweepConfig):
        import json

        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "sweep.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        if "config" in old:  # cached cells are keyed by their own settings; these are shared by all of them
            norm = lambda k, v: Path(v).name if k in ("base", "rl") and v else v  # noqa: E731  clones move the repo
            changed = [k for k in CACHE_FINGERPRINT if norm(k, old["config"].get(k)) != norm(k, asdict(cfg)[k])]
            if changed:
                was = ", ".join(f"{k}={old['config'].get(k)!r}" for k in changed)
                raise ValueError(f"{path} holds cells made with other {changed} ({was}); reusing them would mix "
                                 "settings. Use a new --out, or the same values to extend that sweep")
        self.rows: dict[str, dict] = {r["id"]: r for r in old.get("cells", [])}
        # every configuration that added cells to this cache, oldest first (cells are keyed by their own settings)
        self.invocations = [c for c in old.get("invocations", [old["config"]] if "config" in old else []) if c != asdict(cfg)]
        self.invocations.append(asdict(cfg))
        self.reused = len(self.rows)
        self.rl, self.tok = load_causal_lm(cfg.rl, device=cfg.device)
        self._base = None
        self.prompts = {s: Countdown().heldout_prompts(p) for s, p in (("screen", cfg.screen_problems), ("full", cfg.problems))}
        self.full_stages = [full_stage(i) for i in range(cfg.confirm_seeds)]
        self.prompts.update({s: self.prompts["full"] for s in self.full_stages})
        self.seeds = {"screen": cfg.seed, **{s: cfg.seed + i for i, s in enumerate(self.full_stages)}}

    @property
    def base(self):
        if self._base is None:
            self._base = load_causal_lm(self.cfg.base, device=self.cfg.device)[0]
        return self._base

    def cell(self, stage: str, kind: str, model=None, intervention=None, *, method="", layer=None, coef=None,
             gate="", temperature=1.0, rl_alone=True) -> dict:
        key = "|".join(map(str, (stage, kind, method, layer, coef, gate, temperature)))
        if key in self.rows:
            return self.rows[key]
        t0, c = time.time(), self.cfg
        m = evaluate_cell(model or self.rl, self.tok, self.prompts[stage], c.n, temperature, self.seeds[stage], c.batch_size,
                          intervention() if callable(intervention) else None)
        row = {"id": key, "stage": stage, "kind": kind, "method": method, "layer": layer, "coef": coef, "gate": gate,
               "temperature": temperature, "rl_alone": rl_alone, "seconds": time.time() - t0,
               **{k: m.get(k) for k in ("n_problems", "n_samples", "pass_at_1", "pass_at_64", "distinct_correct_mean",
                                     "fork_entropy_mean", "planning_entropy_mean", "pass_at_k", "pass_at_k_ci",
                                     "per_problem")}}
        self.rows[key] = row
        write_json_atomic(self.out / "sweep.json", {"config": asdict(c), "invocations": self.invocations,
                                                    "cells": list(self.rows.values())})
        return row

    def table(self) -> list[dict]:
        """Every row with restoration against base and RL of its own stage."""
        ref = {s: (self.rows.get(f"{s}|base||None|None||1.0"), self.rows.get(f"{s}|rl||None|None||1.0"))
               for s in {r["stage"] for r in self.rows.values()}}
        return [with_restoration(r, *ref[r["stage"]]) if all(ref[r["stage"]]) else r for r in self.rows.values()]

    def confirm_cell(self, kind: str, **kw) -> dict:
        """A full-split cell at every confirm seed, pooled (`pool`); kw as for `cell` / `steer_cell`."""
        if kind == "steer":
            vecs = kw.pop("vecs")
            rows = [self.steer_cell(s, vecs, **kw) for s in self.full_stages]
        else:
            rows = [self.cell(s, kind, **kw) for s in self.full_stages]
        return pool(rows)

    def steer_cell(self, stage: str, vecs: dict[str, SteeringVector], method: str, layer: str, coef: float, gate: str,
                   temperature: float) -> dict:
        vl = vecs[method].at_layers(parse_layers(layer))
        return self.cell(stage, "steer", None, lambda: steer_intervention(self.rl, self.tok, vl, coef, gate, self.cfg.detector),
                         method=method, layer=layer, coef=coef, gate=gate, temperature=temperature)


def vector_path(out: str | Path, spec: str) -> Path:
    return Path(out) / "vectors" / f"{spec.replace(':', '-')}.safetensors"


def vectors(cfg: SweepConfig) -> dict[str, SteeringVector]:
    """The sweep's vectors (method specs over the union of its layer sets), derived once and saved
    under `out/vectors/`; re-derived (deterministically, so existing layers do not change) when a
    file is missing or lacks a layer."""
    layers = sorted({x for spec in cfg.layers for x in parse_layers(spec)})
    paths = {m: vector_path(cfg.out, m) for m in cfg.methods}
    have = {m: SteeringVector.load(p) for m, p in paths.items() if p.is_file()}
    need = [m for m in cfg.methods if m not in have or (split_method(m)[0] != "sae" and not set(layers) <= set(have[m].layers))]
    if need:
        dc = DeriveConfig(base=cfg.base, rl=cfg.rl, layers=tuple(layers), n_problems=cfg.derive_problems, seed=cfg.seed,
                          sae=cfg.sae, sae_diff=cfg.sae_diff, device=cfg.device)
        for m, v in derive_vectors(dc, tuple(need)).items():
            v.save(paths[m])
            have[m] = v
    return have


def run_sweep(cfg: SweepConfig) -> dict:
    from experiments.study.sweep_plots import plot_pareto, plot_pass_at_k_best, plot_patching

    t0 = time.time()
    sw, vecs = Sweep(cfg), vectors(cfg)
    thr_base = next(iter(vecs.values())).config["fork_threshold_base"]
    S = "screen"
    sw.cell(S, "base", sw.base, rl_alone=False)
    sw.cell(S, "rl")
    for t in cfg.temperatures:
        sw.cell(S, "temperature", temperature=t)
    if Path(cfg.entropy_rl).is_dir():
        sw.cell(S, "entropy_rl", load_causal_lm(cfg.entropy_rl, device=cfg.device)[0], rl_alone=False)
    for layer in cfg.patch_layers:
        for a in cfg.alphas:
            sw.cell(S, "patch", None, lambda L=layer, a=a: patch(sw.rl, sw.base, L, a, gate="base_entropy", threshold=thr_base),
                    layer=layer, coef=a, gate="base_entropy", rl_alone=False)
    for m, v in vecs.items():
        for layer in (x for x in cfg.layers if set(parse_layers(x)) <= set(v.layers)):
            for coef in cfg.coefs:
                for gate in cfg.gates:
                    for t in cfg.steer_temperatures:
                        sw.steer_cell(S, vecs, m, layer, coef, gate, t)
    screen = [r for r in sw.table() if r["stage"] == S]
    rl_s = next(r for r in screen if r["kind"] == "rl")
    steer = sorted((r for r in screen if r["kind"] == "steer" and r["method"] in vecs),  # this run's methods
                   key=lambda r: (r["pass_at_1"] >= rl_s["pass_at_1"] - cfg.screen_tolerance, score(r)),
                   reverse=True)[: cfg.confirm]
    patches = [r for r in screen if r["kind"] == "patch"]
    best_patch_s = max(patches, key=score)  # the upper bound: most restoration, whatever pass@1 costs
    # confirm: base, RL, this run's top screened cells and every steered cell confirmed before, at each seed, pooled
    base_p, rl_p = sw.confirm_cell("base", model=sw.base, rl_alone=False), sw.confirm_cell("rl")
    keys = ("method", "layer", "coef", "gate", "temperature")
    earlier = [r for r in sw.rows.values() if r["stage"] == "full" and r["kind"] == "steer" and r["method"] in vecs]
    cands = {tuple(str(r[k]) for k in keys): r for r in [*steer, *earlier]}
    pooled = [with_restoration(sw.confirm_cell("steer", vecs=vecs, **{k: r[k] for k in keys}), base_p, rl_p)
              for r in cands.values()]
    patch_p = None
    if cfg.confirm_patch:
        r = best_patch_s
        patch_p = with_restoration(sw.confirm_cell(
            "patch", intervention=lambda: patch(sw.rl, sw.base, r["layer"], r["coef"], gate="base_entropy", threshold=thr_base),
            layer=r["layer"], coef=r["coef"], gate="base_entropy", rl_alone=False), base_p, rl_p)
    best = select_best(pooled, rl_p, cfg.pass_at_1_tolerance)
    anchor = best or max(pooled, key=score)
    temps = [r for r in screen if r["kind"] == "temperature"]
    t_match = min(temps, key=lambda r: abs((r["fork_entropy_mean"] or 0) - (anchor["fork_entropy_mean"] or 0)))
    temp_p = with_restoration(sw.confirm_cell("temperature", temperature=t_match["temperature"]), base_p, rl_p)
    table = sw.table()
    confirmed = {"base": base_p, "rl": rl_p, "temperature": temp_p, "steer": pooled, "best": best, "anchor": anchor,
                 "patch": patch_p or next(r for r in table if r["id"] == best_patch_s["id"]),
                 "seed0": {k: sw.rows[f"full|{k}||None|None||1.0"] for k in ("base", "rl")}}
    write_json_atomic(sw.out / "confirmed.json", confirmed)
    write_table(sw.out, table)
    plot_pareto(table, sw.out / "pareto.png")
    plot_patching([r for r in table if r["stage"] == S and r["kind"] == "patch"], sw.out / "patching_curve.png")
    plot_pass_at_k_best({"base": base_p, "rl": rl_p, "steered (best)": anchor,
                         f"rl T={t_match['temperature']}": temp_p}, sw.out / "pass_at_k.png")
    return write_metrics(cfg, sw, table, confirmed, t0)


def _brief(r: dict | None) -> dict | None:
    keep = ("method", "layer", "coef", "gate", "temperature", "pass_at_1", "pass_at_64", "distinct_correct_mean",
            "fork_entropy_mean", "planning_entropy_mean", "restoration_pass_at_64", "restoration_distinct",
            "n_problems", "n_samples", "pass_at_k", "id", "seeds", "per_seed")
    return None if r is None else {k: r.get(k) for k in keep if k in r}


def write_metrics(cfg: SweepConfig, sw: Sweep, table, confirmed: dict, t0) -> dict:
    rl, tb, best, anchor, pt = (confirmed[k] for k in ("rl", "temperature", "best", "anchor", "patch"))
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
        "best": _brief(best) and {**_brief(best), "coefficient": best["coef"],
                                  "vector": str(vector_path(".", best["method"])), "layers": parse_layers(best["layer"])},
        "confirm_seeds": [cfg.seed + i for i in range(cfg.confirm_seeds)],
        "confirm_note": "full-split metrics (base, RL, confirmed cells, baselines) are means over the confirm seeds; "
                        "restoration uses the pooled base and RL; `per_seed` lists each seed's values",
        "best_note": None if best else "no steering cell met the pass@1 constraint on the full split; "
                                       "`best_unconstrained` is the highest restoration_distinct cell",
        "best_unconstrained": _brief(anchor),
        "goal": {"restoration_distinct_min": 0.3, "pass_at_1_min": rl["pass_at_1"] - tol, "met": goal_met},
        "base": _brief(confirmed["base"]), "rl": _brief(rl),
        "confirmed": [_brief(r) for r in sorted(confirmed["steer"], key=score, reverse=True)],
        "temperature_baseline": {**_brief(tb), "matched_on": "fork_entropy_mean nearest the best steered cell's "
                                 "(screen stage), then re-evaluated on the full split"},
        "steering_minus_temperature": beats,
        # better on one axis and no worse on the other (restoration exactly; pass@1 within the tolerance)
        "steering_beats_temperature": beats_temperature(beats.get("restoration_distinct"), beats.get("pass_at_1"), tol),
        "steering_beats_temperature_rule": "restoration_distinct higher at pass@1 no more than the tolerance lower, "
                                           "or restoration_distinct no lower at higher pass@1",
        "entropy_preserving_rl": _brief(next((r for r in screen if r["kind"] == "entropy_rl"), None)),
        "entropy_preserving_rl_note": "screen split only (its own metrics.json has the full split)",
        "patching_upper_bound": {**_brief(pt), "alpha": pt["coef"],
                                 "split": "full" if cfg.confirm_patch else f"first {cfg.screen_problems} held-out problems",
                                 "gate": "base_entropy (base model's forks, threshold from the derive trajectories)"},
        "temperature_screen": [_brief(r) for r in screen if r["kind"] == "temperature"],
        "screen_best_per_method": _per_method(screen, cfg.pass_at_1_tolerance),
        "patching_best_within_tolerance": _brief(select_best([{**r, "kind": "steer", "rl_alone": True} for r in screen
                                                              if r["kind"] == "patch"], next(r for r in screen if r["kind"] == "rl"), tol)),
        "patching_curve": curve, "patching_curve_split": f"first {cfg.screen_problems} held-out problems",
        "n_cells": len(table), "n_cells_reused": sw.reused, "seconds": time.time() - t0,
        "tables": ["sweep.csv", "sweep.json", "confirmed.json"], "plots": ["pareto.png", "pass_at_k.png", "patching_curve.png"],
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


def headline(m: dict) -> dict:
    """The JSON line `forksight steer sweep` prints."""
    b = m["best"] or m["best_unconstrained"]
    return {"out": m["config"]["out"], "goal_met": m["goal"]["met"], "best": {k: b[k] for k in (
        "method", "layer", "coef", "gate", "pass_at_1", "restoration_distinct", "restoration_pass_at_64")},
        "steering_beats_temperature": m["steering_beats_temperature"]}

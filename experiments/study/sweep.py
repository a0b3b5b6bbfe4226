"""`forksight steer sweep`: every way to get breadth back, chosen on one half and judged on the other.

The protocol (`experiments.study.protocol`): the held-out split is halved once (selection: even
problems, test: odd). Stage 1, *selection*, at the selection seed: base, RL and every candidate
cell (`experiments.study.candidates`: temperatures, derived vectors, learned edits, SAE-feature
edits, repulsion, the entropy-preserving RL variants, and the diagnostics that need the base at
inference: cross-model patching and layer restoration), plus each RL-alone cell applied to a
fraction of each prompt's samples (row-level, by splicing). Every cell is judged against the base/RL
mixture frontier of the selection half (`probe.metrics.frontier`), and each family's cells are chosen by
`selection.TOLERANCE_RULE` and `selection.GOAL_RULE`. Stage 2, *test*, at `test_seeds` no
selection used: base, RL (hence the mixture frontier), the chosen cells, the temperature matched
to the best cell's fork entropy, the variants, and the patching and layer-restoration curves
(`curves_half="selection"` reads those from the selection half's cells instead); every
reported number (restoration, pass@1 change, frontier excess, with paired problem-bootstrap
intervals that resample a problem with all its seeds) comes from there.

Three rules pick cells, per family and over every RL-alone family (temperature excluded):
`restoration` (TOLERANCE_RULE: most restoration within `tolerance`), `excess` (GOAL_RULE at
`tolerance`: most frontier excess within it) and `goal` (GOAL_RULE at `goal_tolerance`). `best` is
the overall `excess` pick: the RL-alone cell that gives the most a mixture cannot, at a bounded
accuracy cost (C5 of `forksight run` reports it). `metrics.json["goals"]` judges the `goal` pick
on the test half (`sweep_report.goals`), beside issue #12's bars. Resumable: finished cells live in
`sweep.json` (`experiments.study.cells`); vectors are derived once into `vectors/`.

Engines (`--engine`, `experiments.study.engines`): with `vllm` every cell vLLM can apply is sampled
there (one engine per checkpoint, the base's and the variants' cells first so that each starts once,
all shut down at the end) and the rest on the HF engine, each cell recording which
(`metrics.json["engines"]`); vectors are derived on the HF engine either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from experiments.paths import ORGANISMS_DIR, RESULTS_DIR
from experiments.study import candidates as C
from experiments.study.cells import CellCache
from experiments.study.engines import EnginePool, EngineSettings, vllm_config, vllm_refusal
from experiments.study.protocol import HALVES, Half, evaluate_cell, test_seeds
from experiments.study.selection import (
    choose,
    choose_goal,
    judge,
    matched_temperature,
    outcomes_of,
    parse_layers,
    spliced,
)
from experiments.study.steer_stage import STUDY_GATES, DeriveConfig, derive_vectors, split_method
from experiments.study.sweep_report import brief, pass_at_k_every, save_best, write_outputs
from probe.metrics.breadth import warn_if_truncated
from probe.models.checkpoint import checkpoint_present, load_causal_lm
from probe.tasks import load_task
from steering import SteeringVector


@dataclass
class SweepConfig(EngineSettings):
    """Steering sweep under the selection / test protocol, against the mixture frontier."""

    base: str = str(ORGANISMS_DIR / "base")
    """Base checkpoint."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """Collapsed RL checkpoint (the model steered)."""
    variants: tuple[str, ...] = (str(ORGANISMS_DIR / "rl-clip-cov"),)
    """Entropy-preserving RL checkpoints evaluated as baselines (missing directories are skipped)."""
    out: str = str(RESULTS_DIR / "steer-sweep")
    """Output directory (metrics.json, sweep.csv, sweep.json, plots, vectors/)."""
    task: str = "countdown"
    """Task (`probe.tasks.load_task`)."""
    methods: tuple[str, ...] = ("dom-position",)
    """Vector methods (steer_stage.METHODS), each optionally ":pruned"."""
    layers: tuple[str, ...] = ("0+1+2+3",)
    """Vector layer sets: "2" steers block 2, "0+1+2+3" blocks 0-3 at once."""
    coefs: tuple[float, ...] = (0.4, 1.0)
    """Vector coefficients (normalisation 'none': 1 = the mean base-minus-RL difference at forks)."""
    gates: tuple[str, ...] = ("always",)
    """Vector gates (steer_stage.STUDY_GATES)."""
    learned: tuple[str, ...] = ()
    """Learned edit files (`forksight steer learn`), each evaluated at every learned coefficient."""
    learned_coefs: tuple[float, ...] = (1.0,)
    """Coefficients of the learned edits (1 = as trained)."""
    sae_edits: tuple[str, ...] = ()
    """SAE-feature edits "mode:n_features:gate" (modes clamp, add, scale; gates always, entropy, detector)."""
    sae_edit_coefs: tuple[float, ...] = (3.0, 6.0)
    """Coefficients of the SAE-feature edits (clamp / add: times the base model's mean activation at forks)."""
    repulsion: tuple[float, ...] = ()
    """Repulsion strengths (fractions of the residual norm)."""
    repulsion_layers: tuple[int, ...] = (2,)
    """Layers of the repulsion cells."""
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5)
    """Row-level fractions: each RL-alone cell applied to that share of each prompt's samples."""
    temperatures: tuple[float, ...] = (1.2, 1.5)
    """Temperatures of the unsteered-RL baseline."""
    patch_layers: tuple[int, ...] = (0, 1, 2, 3)
    """Layers of the cross-model patching curve (alpha = max(alphas), measured on `curves_half`)."""
    alphas: tuple[float, ...] = (1.0,)
    """Patching strengths (1 = the base residual)."""
    restore_layers: tuple[int, ...] = (0, 1, 2, 3)
    """Blocks of the layer-restoration curve (RL with block L's weights from the base)."""
    curves_half: str = "test"
    """Half the patching and layer-restoration curves are measured on: "test" (at the test seeds,
    sampled again) or "selection" (the selection half's cells, already sampled there: no choice is
    made on the curves, and on a CPU each point of them costs as much as sampling the base)."""
    problems: int = 0
    """Problems per half (0 = the whole half)."""
    n: int = 64
    """Samples per problem."""
    seed: int = 0
    """Selection seed; the test seeds are seed + 1000, seed + 1001, ..."""
    test_seeds: int = 2
    """Number of test seeds (metrics pooled over them)."""
    tolerance: float = 0.03
    """pass@1 drop below RL allowed by the tolerance rule (and for `best`)."""
    goal_tolerance: float = 0.01
    """pass@1 drop below RL allowed by the goal rule (frontier excess)."""
    derive_problems: int = 256
    """Training-stream problems the vectors are derived from."""
    detector: str = str(RESULTS_DIR / "probe" / "fork_detector.safetensors")
    """Fork detector (gate detector)."""
    sae: str = str(RESULTS_DIR / "sae" / "sae")
    """SAE directory (method sae)."""
    sae_diff: str = str(RESULTS_DIR / "sae" / "diff" / "metrics.json")
    """`forksight sae diff` metrics.json listing the pruned features (method sae)."""
    batch_size: int = 1024
    """Rows per forward pass."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for m in self.methods:
            split_method(m)
        self.layers = tuple(str(x) for x in self.layers)
        for spec in self.layers:
            parse_layers(spec)
        for g in self.gates:
            if g not in STUDY_GATES:
                raise ValueError(f"gate {g!r}; allowed {STUDY_GATES}")
        for f in self.fractions:
            if not 0 < f < 1:
                raise ValueError(f"fraction={f} is outside (0, 1): row-level fractions are shares of each prompt's "
                                 "samples (1 is the cell itself)")
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas {self.alphas} must be in [0, 1]")
        if self.curves_half not in HALVES:
            raise ValueError(f"curves_half={self.curves_half!r}; allowed {HALVES}")
        if self.n < 1 or self.test_seeds < 1 or self.problems < 0:
            raise ValueError("n and test_seeds must be >= 1 and problems >= 0")


def vector_path(out: str | Path, spec: str) -> Path:
    return Path(out) / "vectors" / f"{spec.replace(':', '-')}.safetensors"


def vectors(cfg: SweepConfig) -> dict[str, SteeringVector]:
    """The sweep's vectors (method specs over the union of its layer sets), derived once into
    `out/vectors/`; re-derived (deterministically) when a file is missing or lacks a layer."""
    if not cfg.methods:
        return {}
    layers = sorted({x for spec in cfg.layers for x in parse_layers(spec)})
    paths = {m: vector_path(cfg.out, m) for m in cfg.methods}
    have = {m: SteeringVector.load(p) for m, p in paths.items() if p.is_file()}
    need = [m for m in cfg.methods if m not in have or (split_method(m)[0] != "sae" and not set(layers) <= set(have[m].layers))]
    if need:
        dc = DeriveConfig(base=cfg.base, rl=cfg.rl, layers=tuple(layers), n_problems=cfg.derive_problems, seed=cfg.seed,
                          sae=cfg.sae, sae_diff=cfg.sae_diff, device=cfg.device, task=cfg.task, dtype=cfg.dtype)
        for m, v in derive_vectors(dc, tuple(need)).items():
            v.save(paths[m])
            have[m] = v
    return have


class Sweep:
    """Models, halves and the cell cache of one sweep; `cell` evaluates (or reuses) one cell."""

    def __init__(self, cfg: SweepConfig):
        for p in cfg.learned:
            if not Path(p).is_file():
                raise FileNotFoundError(f"learned edit {p!r} does not exist. Fix: train it with `forksight steer learn "
                                        f"--out {p}` or drop it from --learned")
        self.cfg, self.out = cfg, Path(cfg.out)
        self.task = load_task(cfg.task)
        self.cache = CellCache(cfg.out, cfg)
        self.rl, self.tok = load_causal_lm(cfg.rl, device=cfg.device, dtype=cfg.dtype)
        self.task.check_tokenizer(self.tok)
        self._models: dict[str, Any] = {}
        self.halves = {h: Half.of(self.task, h, cfg.problems) for h in HALVES}
        self.seeds = {"selection": [cfg.seed], "test": test_seeds(cfg.seed, cfg.test_seeds)}
        self.pool = EnginePool(vllm_config(cfg, cfg.dtype, cfg.seed)) if cfg.engine == "vllm" else None

    def checkpoint(self, which: str) -> str:
        """The checkpoint spec of a candidate's model ("rl", "base" or a variant's directory)."""
        return {"rl": self.cfg.rl, "base": self.cfg.base}.get(which, which)

    def model(self, which: str):
        if which == "rl":
            return self.rl
        key = self.checkpoint(which)
        if key not in self._models:
            self._models[key] = load_causal_lm(key, device=self.cfg.device, dtype=self.cfg.dtype)[0]
        return self._models[key]

    def cell(self, cand: C.Candidate, half: str, seed: int) -> dict:
        cid = f"{half}|s{seed}|{cand.key}"
        return self.cache.get(cid, lambda: self.evaluate(cand, half, seed, cid),
                              half=half, seed=seed, family=cand.family, spec=cand.spec, rl_alone=cand.rl_alone,
                              params=cand.params)

    def evaluate(self, cand: C.Candidate, half: str, seed: int, cell_id: str = "") -> dict:
        """One cell on the configured engine; on the HF engine, saying why, where vLLM cannot apply it.
        On the HF engine on a CPU the samples are saved part by part under `cache.parts_dir(cell_id)` and resumed from."""
        c = self.cfg
        intervention = cand.make() if cand.make else None
        refusal = vllm_refusal(intervention) if self.pool is not None else None
        engine = self.pool.get(self.checkpoint(cand.model)) if self.pool is not None and refusal is None else None
        model = None if engine is not None else self.model(cand.model)
        # parts on a CPU, where a cell takes up to ~20 min (the real base); on an accelerator a cell is minutes, and parts would
        # split its one forward batch into sequential pieces
        on_cpu = model is not None and next(model.parameters()).device.type == "cpu"
        parts = self.cache.parts_dir(cell_id) if cell_id and on_cpu else None
        row = evaluate_cell(model, self.tok, self.task, self.halves[half], n=c.n, seed=seed,
                            temperature=cand.temperature, batch_size=c.batch_size, intervention=intervention,
                            engine=engine, parts_dir=parts, identity=f"{cell_id}|{Path(self.checkpoint(cand.model)).name}")
        if refusal is not None:
            row["engine_note"] = f"sampled on the HF engine: {refusal}"
        return row

    def engine_record(self) -> dict:
        """`metrics.json["engines"]`: the engine asked for, cells per engine that sampled them, the families
        sampled on the HF engine instead with vLLM's reason, and the vLLM engines started."""
        rows = self.cache.rows.values()
        cells: dict[str, int] = {}
        for r in rows:
            cells[r.get("engine", "hf")] = cells.get(r.get("engine", "hf"), 0) + 1
        instead = {}
        for r in rows:
            if r.get("engine_note"):
                instead.setdefault(r["family"], r["engine_note"])
        return {"engine": self.cfg.engine, "cells": cells, "on_hf_instead": instead,
                "vllm_starts": self.pool.starts if self.pool is not None else [],
                "derive": "hf (vectors are derived from teacher-forced residuals and entropies)"}

    def close(self) -> None:
        """Shut down the vLLM engine, if one runs."""
        if self.pool is not None:
            self.pool.close()


REFERENCE = {"base": C.Candidate("reference", {"model": "base"}, model="base"),
             "rl": C.Candidate("reference", {"model": "rl"})}


def candidates(sw: Sweep) -> list[C.Candidate]:
    cfg = sw.cfg
    vecs = vectors(cfg)
    cands = C.temperature_cells(cfg.temperatures) + C.vector_cells(cfg, vecs, sw.rl, sw.tok)
    cands += C.learned_cells(cfg.learned, cfg.learned_coefs, sw.rl)
    cands += C.sae_edit_cells(cfg.sae_edits, cfg.sae_edit_coefs, sw.rl, cfg.sae, cfg.sae_diff, cfg.detector)
    cands += C.repulsion_cells(cfg.repulsion, cfg.repulsion_layers, sw.rl)
    cands += C.variant_cells([v for v in cfg.variants if checkpoint_present(v)])  # BASE+ADAPTER included
    thr = next(iter(vecs.values())).config["fork_threshold_base"] if vecs else 1.0
    cands += C.patching_cells(cfg.patch_layers, cfg.alphas, sw.rl, sw.model("base"), thr)
    cands += C.restore_cells(cfg.restore_layers, sw.rl, sw.model("base"))
    return cands


def prefetch(sw: Sweep, cands: list[C.Candidate]) -> None:
    """On vLLM: the base's and each variant's cells of both halves first, so that the RL model's engine,
    started next, serves every remaining cell (the pool runs one engine at a time). A no-op on the HF
    engine (cells are cached by id, so the order changes no number)."""
    if sw.pool is None:
        return
    for cand in [REFERENCE["base"], *(c for c in cands if c.family == "variant")]:
        for half in ("selection", "test"):
            for s in sw.seeds[half]:
                sw.cell(cand, half, s)


def select(sw: Sweep, cands: list[C.Candidate]) -> dict[str, Any]:
    """Stage 1: every candidate (and its row-level fractions) judged on the selection half; the picks."""
    s0 = sw.seeds["selection"][0]
    base, rl = (sw.cell(REFERENCE[k], "selection", s0) for k in ("base", "rl"))
    warn_if_truncated({k: r.get("truncated_share") for k, r in (("base", base), ("rl", rl))},
                      "steer sweep (selection half, before any cell)",
                      by_budget={k: r.get("eos_by_budget") for k, r in (("base", base), ("rl", rl))})
    rows = []
    for cand in tqdm(cands, desc="sweep: selection half", unit="cell"):
        row = sw.cell(cand, "selection", s0)
        rows.append({**row, "candidate": cand, "fraction": 1.0, **judge([row], [base], [rl], n_boot=200)})
        if cand.rl_alone and cand.family != "temperature":
            for f in sw.cfg.fractions:
                sp = {**spliced(row, rl, f), "id": f"{row['id']}|f{f}", "family": cand.family, "spec": cand.spec}
                rows.append({**sp, "candidate": cand, "fraction": f, **judge([sp], [base], [rl], n_boot=200)})
    tol, gtol = sw.cfg.tolerance, sw.cfg.goal_tolerance

    def three(rs: list[dict]) -> dict[str, dict | None]:
        return {"restoration": choose(rs, tol), "excess": choose_goal(rs, tol), "goal": choose_goal(rs, gtol)}

    fams = sorted({r["family"] for r in rows if r["candidate"].rl_alone})
    picks = {f: three([r for r in rows if r["family"] == f]) for f in fams}
    overall = three([r for r in rows if r["candidate"].rl_alone and r["family"] != "temperature"])
    anchor = overall["excess"] or overall["restoration"]
    full = next((r for r in rows if anchor and r["id"] == anchor["id"].split("|f")[0]), anchor)
    temp = matched_temperature([r for r in rows if r["family"] == "temperature"], full) if full else None
    return {"base": base, "rl": rl, "rows": rows, "picks": picks, "best_restoration": overall["restoration"],
            "best": overall["excess"], "best_goal": overall["goal"], "temperature": temp}


def test(sw: Sweep, sel: dict[str, Any], cands: list[C.Candidate]) -> dict[str, Any]:
    """Stage 2: the chosen cells and the baselines on the test half at the test seeds, pooled."""
    seeds = sw.seeds["test"]
    base = [sw.cell(REFERENCE["base"], "test", s) for s in seeds]
    rl = [sw.cell(REFERENCE["rl"], "test", s) for s in seeds]

    def rows_of(pick: dict) -> list[dict]:
        """The pick's test-half rows, one per test seed (a row-level fraction: spliced with RL's)."""
        rows = [sw.cell(pick["candidate"], "test", s) for s in seeds]
        if pick["fraction"] < 1:
            return [{**spliced(r, q, pick["fraction"]), "seed": r["seed"]} for r, q in zip(rows, rl)]
        return rows

    def measure(pick: dict | None) -> dict | None:
        if pick is None:
            return None
        rows = rows_of(pick)
        extra = {"mixture_at_fraction": mixture_at(base, rl, pick["fraction"])} if pick["fraction"] < 1 else {}
        return {**{k: pick.get(k) for k in ("family", "spec", "fraction", "params")}, "id": pick["id"],
                "fork_entropy_mean": _mean(rows, "fork_entropy_mean"),
                "truncated_share": _mean(rows, "truncated_share"), **judge(rows, base, rl), **extra}

    picks = {f: {rule: {"selection": brief(p), "test": measure(p)} for rule, p in d.items()} for f, d in sel["picks"].items()}
    by = lambda fam: [c for c in cands if c.family == fam]  # noqa: E731
    whole = lambda c: {"candidate": c, "fraction": 1.0, "family": c.family, "spec": c.spec, "id": c.key}  # noqa: E731

    def curve(fam: str) -> list[dict | None]:
        """A diagnostic curve on `curves_half`: measured again at the test seeds, or the selection cells."""
        alpha = max(sw.cfg.alphas) if sw.cfg.alphas else None
        cs = [c for c in by(fam) if fam != "patching" or c.spec["alpha"] == alpha]
        if sw.cfg.curves_half == "test":
            return [measure(whole(c)) for c in cs]
        s0 = sw.seeds["selection"][0]
        rows = [sw.cell(c, "selection", s0) for c in cs]
        return [{**{k: v for k, v in whole(c).items() if k != "candidate"}, "params": None, "half": "selection",
                 "fork_entropy_mean": r.get("fork_entropy_mean"), "truncated_share": r.get("truncated_share"),
                 **judge([r], [sel["base"]], [sel["rl"]])}
                for c, r in zip(cs, rows)]

    return {
        "base": base, "rl": rl, "picks": picks,
        **{k: measure(sel[k]) for k in ("best", "best_restoration", "best_goal")},
        "pass_at_k_every": {k: sel[k] and pass_at_k_every(rows_of(sel[k]), base, rl) for k in ("best", "best_goal")},
        "temperature": measure(sel["temperature"] and {**sel["temperature"], "fraction": 1.0}),
        "variants": {c.spec["method"]: measure(whole(c)) for c in by("variant")},
        "patching_curve": curve("patching"), "restore_curve": curve("layer_restore"),
    }


def mixture_at(base: list[dict], rl: list[dict], fraction: float) -> dict:
    """The base/RL mixture at the same fraction as a row-level cell (base samples where it steers)."""
    from probe.metrics.frontier import m_of_q, mixture_curve

    b, clusters = outcomes_of(base)
    r, _ = outcomes_of(rl)
    point = mixture_curve(b, r, ms=[m_of_q(fraction, b.n)], clusters=clusters)[0]
    return {k: point[k] for k in ("q", "pass_at_1", "restoration_distinct", "restoration_pass_at_64")}


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r.get(key) for r in rows]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def run_sweep(cfg: SweepConfig) -> dict:
    t0 = time.time()
    sw = Sweep(cfg)
    try:
        cands = candidates(sw)
        prefetch(sw, cands)
        sel = select(sw, cands)
        tst = test(sw, sel, cands)
    finally:
        sw.close()
    return write_outputs(sw, sel, tst, time.time() - t0, save_best(sw, sel["best"]))


def headline(m: dict) -> dict:
    """The JSON line `forksight steer sweep` prints."""
    b = m["best"] or {}
    return {"out": m["config"]["out"], "goals": m["goals"],
            "best": {k: b.get(k) for k in ("family", "spec", "fraction", "pass_at_1_change", "restoration_distinct",
                                            "frontier_excess")}}

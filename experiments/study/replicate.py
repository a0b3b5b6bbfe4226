"""`forksight replicate`: the claims of `forksight run` over several base / RL pairs, pooled over
training seeds, so that an effect of RL can be told from an accident of one run.

A *pair* is a base checkpoint, an RL checkpoint trained from it and, optionally, entropy-preserving
RL variants trained from the same base (`NAME=BASE,RL[,VARIANT...]`). Pairs with the same base
form a *group* (e.g. depth 4: the shipped base with vanilla GRPO at seeds 0, 1, 2); the RL
checkpoint's training seed is read from its `metrics.json`, the depth from its `config.json`.

Per pair, in `OUT/pairs/NAME/` (resumable, `run_state.json` as in `forksight run`): the probe stage,
the learned edits of `forksight run` (their recipe, at every block of the pair's depth; only up to
`learned_max_depth`, as their training cost grows ~8x per doubling of depth on a CPU), and a lean
steering sweep (one vector layer set = every block, one coefficient, the learned edits, one
temperature, the variants, the patching and layer-restoration curves at up to `curve_points`
blocks, the mixture frontier), all under the selection / test protocol. The SAE stage is skipped (no sweep cell of the
lean sweep reads an SAE). Then the seven claims (C1-C6, C3b) of `forksight run`, each by its rule.

Pooled, per group: each claim's effect averaged over the group's pairs (training seeds) with a 95%
Student-t interval over those seeds (the spread between RL runs, not the bootstrap over problems
inside one), the pooled status by the claim's own thresholds applied to that interval (`POOLED`),
and on how many pairs the claim holds. Groups of one pair keep that pair's bootstrap interval and
say so and its status. Outputs: `results.json`, `report.md`, `figures/depth.png` (fork share, law R^2, distinct
drop, patching curve and best RL-alone restoration against depth).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from experiments.paths import EXPERIMENTS_DIR, ORGANISMS_DIR, REPLICATE_DIR
from experiments.run_state import portable, write_json_atomic
from experiments.study.engines import EngineSettings, engine_fields
from experiments.study.replicate_report import plot_depth, write_replicate_report
from probe.environment import environment
from probe.stats import mean_ci

REPLICATE_ORGANISMS = REPLICATE_DIR / "organisms"
CANDIDATE_VARIANTS = ("rl-clip-cov", "rl-nsr", "rl-w-reinforce", "rl-pass-at-k", "rl-vpo-distinct")
"""The entropy-preserving regimes trained from the shipped base at seed 0 (rl-clip-cov is shipped in
`experiments/organisms/countdown`, the others in `experiments/results/replicate/organisms`)."""
DEPTHS = (2, 6)
"""The other model sizes, base and vanilla GRPO by the shipped recipe (SFT 3500 steps x 128, GRPO 250
steps x 32 x 16). Width grows with depth (32 * depth), so the cost per step grows ~depth^3: depth 8 takes
1.6 s per SFT step on one core of the 2-core CPU here (93 min for the recipe, over the 45-minute budget
per base), depth 6 fits the budget with the recipe unchanged, so depth 6 is the larger size."""
PASS_AT_1_SLACK = 0.05
BEST_RULE = (f"among the entropy-preserving regimes trained from the shipped base (seed 0), the one with the most "
             f"distinct-correct on the trainer's held-out evaluation (256 problems, 64 samples) whose pass@1 is at "
             f"least the collapsed model's (rl-none) minus {PASS_AT_1_SLACK}; ties by pass@1")
POOLED = {  # claim id -> (holds(lo, hi), fails(lo, hi)) on the pooled interval: each claim's own bar
    "C1": (lambda lo, hi: lo >= 0.5, lambda lo, hi: hi < 0.2),
    "C2": (lambda lo, hi: lo > 0.5, lambda lo, hi: hi < 0.5),
    "C3": (lambda lo, hi: lo > 0.1 or hi < -0.1, lambda lo, hi: -0.1 <= lo and hi <= 0.1),
    "C3b": (lambda lo, hi: lo > 0.1, lambda lo, hi: hi < 0.1),
    "C4": (lambda lo, hi: hi < 0, lambda lo, hi: lo > 0),
    "C5": (lambda lo, hi: lo > 0, lambda lo, hi: hi < 0),
    "C6": (lambda lo, hi: lo >= 2, lambda lo, hi: hi <= 1),
}
POOLED_RULE = ("the claim's effect averaged over the group's training seeds, 95% Student-t interval over the seeds; "
               "status by the claim's own bar on that interval (C1: R^2 >= 0.5 / < 0.2; C2: share > 0.5 / < 0.5; C3: "
               "outside / inside +-0.1; C3b: above / below +0.1; C4: distinct change < 0 / > 0; C5: frontier excess > 0 "
               "/ < 0; C6: multiplier >= 2 / <= 1); the parts of a rule that are not the effect (C1's sign of a, C3b's "
               "order, C4's pass@1 gain, C5's breadth gap and detector) are counted per pair in 'holds on'. A censored C6 "
               "multiplier (never matched) enters the mean at its cap n/k_ref, a lower bound; a group of one pair keeps that "
               "pair's bootstrap interval and its status by the claim's own rule")


@dataclass
class PairSpec:
    """One base / RL pair (with its variants) of the replication."""

    name: str
    base: str
    rl: str
    variants: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> PairSpec:
        """"NAME=BASE,RL[,VARIANT...]" (directories, absolute or relative to the repository root)."""
        name, _, dirs = spec.partition("=")
        parts = [p.strip() for p in dirs.split(",") if p.strip()]
        if not name or len(parts) < 2:
            raise ValueError(f"pair {spec!r}: write NAME=BASE,RL[,VARIANT...], e.g. d4-s1=runs/base,runs/rl-s1")
        root = EXPERIMENTS_DIR.parent
        full = [str(p if Path(p).is_absolute() or Path(p).exists() else root / p) for p in parts]
        return cls(name, full[0], full[1], tuple(full[2:]))

    @property
    def depth(self) -> int:
        return int(json.loads((Path(self.rl) / "config.json").read_text())["num_hidden_layers"])

    @property
    def train_seed(self) -> int | None:
        m = Path(self.rl) / "metrics.json"
        return json.loads(m.read_text()).get("train_seed") if m.is_file() else None

    @property
    def group(self) -> str:
        return f"depth {self.depth} ({Path(self.base).name})"


def _rel(path: str | Path) -> str:
    """`path` as results.json records it: relative to the repository root (`portable`)."""
    return portable(str(path), EXPERIMENTS_DIR.parent)


def _organism(name: str) -> Path:
    """A seed-0 organism of the shipped set: the shipped directory if there, else the replication's."""
    shipped = ORGANISMS_DIR / name
    return shipped if shipped.is_dir() else REPLICATE_ORGANISMS / name


def choose_best_variant(collapsed: dict, variants: dict[str, dict]) -> tuple[str | None, dict]:
    """`BEST_RULE` over {name: metrics.json} of the regimes; returns (name or None, the table)."""
    floor = collapsed["pass_at_1"] - PASS_AT_1_SLACK
    table = {k: {"pass_at_1": m["pass_at_1"], "distinct_correct_mean": m["distinct_correct_mean"],
                 "eligible": m["pass_at_1"] >= floor} for k, m in variants.items()}
    ok = [k for k, v in table.items() if v["eligible"]]
    best = max(ok, key=lambda k: (table[k]["distinct_correct_mean"], table[k]["pass_at_1"]), default=None)
    return best, {"rule": BEST_RULE, "pass_at_1_floor": floor, "regimes": table, "best": best}


def best_variant() -> tuple[str | None, dict]:
    """The best entropy-preserving regime by `BEST_RULE`, from the shipped metrics."""
    trained = {v: _organism(v) / "metrics.json" for v in CANDIDATE_VARIANTS}
    have = {v: json.loads(p.read_text()) for v, p in trained.items() if p.is_file()}
    return choose_best_variant(json.loads((ORGANISMS_DIR / "rl-none" / "metrics.json").read_text()), have)


def default_pairs() -> list[PairSpec]:
    """The shipped replication set: depth 4 at training seeds 0-2 (vanilla GRPO with the best
    preserving regime of the same seed; seed 0 also carries every other regime), and base + vanilla GRPO at each of `DEPTHS`."""
    best, _ = best_variant()
    R = REPLICATE_ORGANISMS
    seed0 = [str(_organism(best))] if best else []
    seed0 += [str(_organism(v)) for v in CANDIDATE_VARIANTS if v != best and _organism(v).is_dir()]
    pairs = [PairSpec("d4-s0", str(ORGANISMS_DIR / "base"), str(ORGANISMS_DIR / "rl-none"), tuple(seed0))]
    for s in (1, 2):
        var = (str(R / f"{best}-s{s}"),) if best and (R / f"{best}-s{s}").is_dir() else ()
        pairs.append(PairSpec(f"d4-s{s}", str(ORGANISMS_DIR / "base"), str(R / f"rl-none-s{s}"), var))
    for d in DEPTHS:
        pairs.append(PairSpec(f"d{d}", str(R / f"d{d}-base"), str(R / f"d{d}-rl-none")))
    return [p for p in pairs if Path(p.rl).is_dir() and Path(p.base).is_dir()]


@dataclass
class ReplicateConfig(EngineSettings):
    """The claims of `forksight run` over several base / RL pairs, pooled over training seeds."""

    out: str = str(REPLICATE_DIR)
    """Output directory (results.json, report.md, figures/, pairs/NAME/ per pair)."""
    pairs: tuple[str, ...] = ()
    """Pairs "NAME=BASE,RL[,VARIANT...]" ("" = the shipped replication set: depth 4 at seeds 0-2, the depths in `DEPTHS`)."""
    learned: bool = True
    """Train and sweep the learned edits of `forksight run` (off: vectors, temperature, variants, patching)."""
    learned_recipes: tuple[str, ...] = ("lowrank-distill",)
    """Recipes of `forksight run`'s learned edits (`learn_stage.RECIPES`) trained per pair (default: the one
    the shipped sweep picked as `best`); kind "sae" needs an SAE, which the lean replication does not train."""
    learned_max_depth: int = 6
    """Learned edits only for pairs up to this depth (on a CPU their training cost grows ~depth^3: ~5 min at depth 4,
    ~15 min at depth 6 on one core here)."""
    curve_points: int = 4
    """Blocks of the patching / layer-restoration curves: all when depth <= this, else this many spread evenly."""
    quick: bool = False
    """A small configuration (for tests and a first look); numbers are noisy."""
    seed: int = 0
    """Seed of every stage."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""

    def __post_init__(self) -> None:
        super().__post_init__()  # the engine settings (`--engine`, vLLM's)
        self.out = str(Path(self.out))
        self.pairs = tuple(str(p) for p in self.pairs)
        for p in self.pairs:
            PairSpec.parse(p)
        from experiments.study.learn_stage import RECIPES

        self.learned_recipes = tuple(self.learned_recipes)
        bad = [r for r in self.learned_recipes if r not in RECIPES or RECIPES[r].get("kind") == "sae"]
        if bad:
            ok = [r for r, v in RECIPES.items() if v.get("kind") != "sae"]
            raise ValueError(f"learned_recipes {bad}: choose among {ok} (kind 'sae' needs an SAE the replication "
                             "does not train)")
        if self.curve_points < 1 or self.learned_max_depth < 0:
            raise ValueError(f"curve_points={self.curve_points} must be >= 1 and learned_max_depth="
                             f"{self.learned_max_depth} >= 0")

    def pair_list(self) -> list[PairSpec]:
        pairs = [PairSpec.parse(p) for p in self.pairs] if self.pairs else default_pairs()
        names = [p.name for p in pairs]
        if len(set(names)) != len(names) or not pairs:
            raise ValueError(f"pair names {names} must be unique and at least one; name each NAME=...")
        return pairs


def pair_stage_configs(pair: PairSpec, cfg: ReplicateConfig) -> tuple[Any, dict]:
    """The RunConfig of one pair and its stage configs: `forksight run`'s, made lean and sized to the depth."""
    from experiments.study.run import RunConfig, stage_configs

    rc = RunConfig(out=str(Path(cfg.out) / "pairs" / pair.name), base=pair.base, rl=pair.rl, variants=pair.variants,
                   quick=cfg.quick, seed=cfg.seed, device=cfg.device, **engine_fields(cfg))
    sc = stage_configs(rc)
    d = pair.depth
    blocks = tuple(range(d))
    learn = {}
    for name, (stage, lc) in (sc["learn"].items() if cfg.learned and d <= cfg.learned_max_depth else ()):
        if name in cfg.learned_recipes:
            learn[name] = (stage, replace(lc, layers=blocks))
    sweep = sc["sweep"]
    k = min(d, cfg.curve_points)
    curve = tuple(sorted({round((i + 1) * d / k) - 1 for i in range(k)}))  # d=8, k=4: blocks 1, 3, 5, 7
    over = {"layers": ("+".join(map(str, blocks)),), "patch_layers": (0,) if cfg.quick else curve,
            "restore_layers": (0,) if cfg.quick else curve, "learned": tuple(s.out for s, _ in learn.values()),
            "fractions": (0.25,) if cfg.quick else (0.25, 0.5)}
    over.update({k: () for k in ("sae_edits",) if k in {f.name for f in fields(sweep)}})  # no SAE in the lean sweep
    sc["learn"], sc["sweep"] = learn, replace(sweep, **over)
    return rc, sc


def run_pair(pair: PairSpec, cfg: ReplicateConfig) -> dict:
    """The probe, learn and steer stages of one pair (resumable), then its claims."""
    from tqdm.auto import tqdm

    from experiments.study.probe_stage import run_probe
    from experiments.study.run import Run, learn_edits
    from experiments.study.sweep import run_sweep

    rc, sc = pair_stage_configs(pair, cfg)
    run = Run(rc)
    with tqdm(total=3, unit="stage", desc=f"replicate {pair.name}") as bar:
        run.stage("probe", lambda: run_probe(sc["probe"]), sc["probe"], bar)
        run.stage("learn", lambda: learn_edits(sc["learn"]), {k: list(v) for k, v in sc["learn"].items()}, bar)
        run.stage("steer", lambda: run_sweep(sc["sweep"]), sc["sweep"], bar)
    seconds = {k: v.get("seconds") for k, v in run.state["stages"].items()}
    claims, matches = pair_claims(pair, Path(rc.out), cfg.seed)
    figure = None
    if matches:  # every preserving model (and the base) against the collapsed one: pass@k and the multiplier
        from probe.metrics.compute_match import plot_compute_match

        curves = {m: mt["pass_at_k_reference"] for m, mt in matches.items()}
        curves["rl"] = next(iter(matches.values()))["pass_at_k_other"]
        figure = f"figures/{pair.name}_compute_match.png"
        plot_compute_match(curves, matches, Path(cfg.out) / figure, collapsed="rl")
    return {"name": pair.name, "group": pair.group, "depth": pair.depth, "train_seed": pair.train_seed,
            "base": _rel(pair.base), "rl": _rel(pair.rl), "variants": [_rel(v) for v in pair.variants], "seconds": seconds,
            "claims": claims, "compute_match_figure": figure, **pair_measures(Path(rc.out))}


def pair_claims(pair: PairSpec, out: Path, seed: int = 0) -> tuple[list[dict], dict]:
    """C1-C6 and C3b of one finished pair directory, by the rules of `forksight run`, and C6's
    compute matches of every preserving model against the collapsed one (for the figure)."""
    from experiments.study import claims as C
    from experiments.study.claims_training import claim_phases, claim_regime
    from experiments.study.report import pooled_references

    probe = json.loads((out / "probe" / "metrics.json").read_text())
    steer = json.loads((out / "steer" / "metrics.json").read_text())
    base, rl = pooled_references(out / "steer" / "sweep.json")
    log = Path(pair.rl) / "train_log.jsonl"
    log_ok = log.is_file()
    cells = json.loads((out / "steer" / "sweep.json").read_text())["cells"]
    c6, matches = claim_regime(cells, pair.variants, seed=seed)
    claims = [C.claim_law(probe.get("law")), C.claim_forks(probe["on_base_samples"], probe["rho"]),
              C.claim_roles(str(log) if log_ok else None, seed=seed), claim_phases(str(log) if log_ok else None, seed=seed),
              C.claim_breadth(base, rl, seed=seed), C.claim_recovery(steer, base, rl, probe.get("detector"), seed=seed), c6]
    return [c.to_dict() for c in claims], matches


def pair_measures(out: Path) -> dict:
    """The depth plots' numbers of one pair: the patching curve, the best RL-alone restoration and
    the variants' test-half summaries (pass@1, pass@k, distinct-correct, planning entropy)."""
    from experiments.study.claims_training import regime_inputs
    from probe.metrics.frontier import summary

    steer = json.loads((out / "steer" / "metrics.json").read_text())
    best = steer.get("best") or {}
    cells = json.loads((out / "steer" / "sweep.json").read_text())["cells"]
    variants = {}
    for name, (o, _, seeds) in regime_inputs(cells, [v["spec"]["method"] for v in cells
                                                     if v.get("family") == "variant" and v["half"] == "test"]).items():
        rows = [c for c in cells if c["half"] == "test" and c.get("spec") in ({"model": name}, {"method": name})]
        plan = [c.get("planning_entropy_mean") for c in rows if c.get("planning_entropy_mean") is not None]
        variants[name] = {**summary(o), "planning_entropy_mean": sum(plan) / len(plan) if plan else None,
                          "test_seeds": seeds}
    return {"patching_curve": [{"layer": c["spec"]["layer"], "restoration_distinct": c["restoration_distinct"]}
                               for c in steer.get("patching_curve") or [] if c],
            "best_rl_alone": {k: best.get(k) for k in ("family", "spec", "fraction", "restoration_distinct",
                                                        "restoration_distinct_ci", "pass_at_1_change", "frontier_excess",
                                                        "frontier_excess_ci")},
            "models": variants}


def _c6_value(c: dict) -> tuple[float | None, bool]:
    e = c["effect"]
    return (e["cap"], True) if e["value"] is None and e.get("cap") else (e["value"], False)


def pool(pairs: list[dict]) -> list[dict]:
    """Per group and claim: the per-pair effects, holds-count, and the mean over training seeds with
    its Student-t interval and pooled status (`POOLED_RULE`)."""
    groups: dict[str, list[dict]] = {}
    for p in pairs:
        groups.setdefault(p["group"], []).append(p)
    out = []
    for group, ps in groups.items():
        ids = [c["id"] for c in ps[0]["claims"]]
        for cid in ids:
            cs = [next(c for c in p["claims"] if c["id"] == cid) for p in ps]
            vals, censored = zip(*[(_c6_value(c) if cid == "C6" else (c["effect"]["value"], False)) for c in cs])
            have = [v for v in vals if v is not None]
            rec = {"group": group, "depth": ps[0].get("depth"), "claim": cid, "pairs": [p["name"] for p in ps],
                   "seeds": [p["train_seed"] for p in ps], "values": list(vals),
                   "statuses": [c["status"] for c in cs], "holds_on": sum(c["status"] == "holds" for c in cs),
                   "n_pairs": len(cs), "censored": sum(censored), "effect": cs[0]["effect"]["name"]}
            if len(have) >= 2:
                m, h = mean_ci(have)
                rec.update(mean=m, ci=[m - h, m + h], interval="Student-t over training seeds", n_seeds=len(have))
            elif have:
                ci = cs[vals.index(have[0])]["effect"]["ci"]
                rec.update(mean=have[0], ci=ci, interval="one pair: its bootstrap interval (problems / steps)", n_seeds=1)
            else:
                rec.update(mean=None, ci=None, interval="no value", n_seeds=0)
            lo_hi = rec["ci"]
            if len(cs) == 1:  # one pair: its own rule (which may test more than the effect's interval)
                rec["status"] = cs[0]["status"]
            elif lo_hi and None not in lo_hi:
                holds, fails = POOLED[cid]
                rec["status"] = "holds" if holds(*lo_hi) else "fails" if fails(*lo_hi) else "inconclusive"
            else:
                rec["status"] = "inconclusive"
            out.append(rec)
    return out


def run_replicate(cfg: ReplicateConfig) -> dict:
    """Every pair (resumable), then the pooled table, figures, results.json and report.md."""
    from experiments.run_state import check_writable
    from experiments.study.run import RunConfig, preflight

    t0 = time.time()
    out = check_writable(cfg.out)
    pairs = cfg.pair_list()
    for p in pairs:  # every pair loadable and compatible before any work
        preflight(RunConfig(out=str(out / "pairs" / p.name), base=p.base, rl=p.rl, variants=p.variants,
                            quick=cfg.quick, seed=cfg.seed, device=cfg.device, **engine_fields(cfg)))
    done = [run_pair(p, cfg) for p in pairs]
    pooled = pool(done)
    _, choice = best_variant()
    results = {"config": {**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "out": _rel(cfg.out)},
               "best_variant": choice, "pairs": done, "pooled": pooled, "pooled_rule": POOLED_RULE,
               "organisms": organism_table(done), "seconds": time.time() - t0, "environment": environment()}
    results["figures"] = [str(plot_depth(results, out / "figures" / "depth.png").relative_to(out))]
    results["figures"] += [p["compute_match_figure"] for p in done if p["compute_match_figure"]]
    write_json_atomic(out / "results.json", results)
    write_replicate_report(results, out / "report.md")
    return results


def organism_table(pairs: list[dict]) -> list[dict]:
    """Every RL checkpoint of the replication with its trainer's held-out metrics and train_seconds."""
    rows, seen = [], set()
    for p in pairs:
        for d in [p["rl"], *p["variants"]]:
            full = EXPERIMENTS_DIR.parent / d  # a relative path is relative to the repository root
            if d in seen or not (full / "metrics.json").is_file():
                continue
            seen.add(d)
            m = json.loads((full / "metrics.json").read_text())
            rows.append({"model": Path(d).name, "pair": p["name"], "depth": p["depth"],
                         "intervention": m.get("intervention"), "train_seed": m.get("train_seed"),
                         **{k: m.get(k) for k in ("pass_at_1", "pass_at_64", "distinct_correct_mean",
                                                  "planning_entropy_mean", "execution_entropy_mean", "train_seconds",
                                                  "train_cpu_seconds")}})
    return rows


def headline(results: dict) -> dict:
    """The JSON line `forksight replicate` prints."""
    summary = {f"{r['group']}|{r['claim']}": f"{r['status']} (holds on {r['holds_on']}/{r['n_pairs']})"
               for r in results["pooled"]}
    return {"out": results["config"]["out"], "pairs": [p["name"] for p in results["pairs"]],
            "best_variant": results["best_variant"]["best"], "pooled": summary,
            "report": str(Path(results["config"]["out"]) / "report.md")}

"""`forksight run`: the end-to-end study that answers the seed question on one base / RL pair.

"Does entropy collapse in RL training narrow inference-time search, and can the lost breadth be
recovered from the trained network?" Stages, each writing into its own folder of `--out`:

0. `organisms` (only with `--from-scratch`): SFT the base organism, then GRPO (vanilla, and
   Clip-Cov as the entropy-preserving variant) from it (`experiments.training.sft`, `experiments.training.grpo`).
1. `probe`: entropy of both models on the same trajectories, forks, the latent fork detector and
   the entropy-law fit of the RL log (`experiments.study.probe_stage`).
2. `sae`: a TopK SAE on the base residual and the features RL pruned at forks (`experiments.study.sae_stage`).
3. `learn`: small learned edits of the RL model's residual stream (`experiments.study.learn_stage`).
4. `steer`: steering vectors (diff of means at the forks RL pruned, SAE decoder directions), SAE-feature
   and learned edits swept with the temperature baseline, cross-model patching and the base/RL mixture
   frontier (`experiments.study.sweep`); the entropy-preserving variants are evaluated on the sweep's
   problems and seed.
5. `report`: the claims (`experiments.study.claims`), `results.json`, `report.md`.

`--engine vllm` samples the sweep's cells on vLLM where it can apply them (`experiments.study.engines`);
the probe, SAE and learn stages sample on the HF engine whatever the flag says (they need per-token
entropy, teacher-forced activations or gradients). results.json's `engines` records which engine
sampled what.

When more than `probe.metrics.breadth.TRUNCATION_LIMIT` of some model's samples end at the token budget
without eos, a `TruncationWarning` goes to stderr as soon as the sweep has sampled base and RL, and
again at the end, and the claims built on breadth are flagged in the report.

Resumable: `run_state.json` records each finished stage; a rerun with the same `--out` and the
same configuration skips finished stages (the steering sweep also reuses finished cells, the
trainers their last save). A different configuration in an existing `--out` is an error, not a
silent mix, with one exception: `--variants` may change (a variant trained after the study started),
which reruns only the steer stage, whose base, RL and intervention cells are reused. Every file is written atomically, so an interrupted stage leaves earlier outputs intact.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from experiments.paths import ORGANISMS_DIR
from experiments.run_state import as_json, portable, write_json_atomic
from experiments.study.engines import ENGINE_DEFAULTS, EngineSettings, engine_fields
from experiments.study.sizes import ORGANISM_VOCAB, size_for
from probe.metrics.breadth import TruncationWarning
from probe.models.checkpoint import parse_dtype

STAGES = ("organisms", "probe", "sae", "learn", "steer", "report")


@dataclass
class RunConfig(EngineSettings):
    """The end-to-end study on a base / RL pair (default: the shipped Countdown organisms)."""

    out: str = "runs/study"
    """Run directory (report.md, results.json, one folder per stage, run_state.json)."""
    base: str = ""
    """Base checkpoint ("" = the shipped organism, or the one trained with --from-scratch)."""
    rl: str = ""
    """RL checkpoint trained from the base ("" = the shipped rl-none)."""
    variants: tuple[str, ...] = ()
    """Entropy-preserving RL checkpoints compared in C5 (default with the shipped pair: rl-clip-cov)."""
    task: str = "countdown"
    """Task: "countdown" (the shipped pair's) or "math:PATH[,train=PATH][,chat][,max_new_tokens=N]" (needs --base/--rl)."""
    quick: bool = False
    """A small configuration (about 20 s on a laptop CPU) for tests and a first look; numbers are noisy."""
    from_scratch: bool = False
    """Retrain the organisms (SFT base, GRPO rl-none and rl-clip-cov) into OUT/organisms first."""
    tolerance: float = 0.03
    """pass@1 drop below RL allowed for the best steered cell (selection rules of the sweep, C5)."""
    seed: int = 0
    """Seed of every stage."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu (probe and SAE; sampling in the sweep runs on the models' device)."""
    profile: str = "auto"
    """Stage sizes: "organism" (the shipped study's), "real" (pretrained models on a CPU), or "auto" (by the base's vocabulary)."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.out = str(Path(self.out))  # "runs/x/" and "runs/x" are one run directory
        self.variants = tuple(str(v) for v in self.variants)
        if bool(self.base) != bool(self.rl):
            raise ValueError("pass both --base and --rl (a pair), or neither for the shipped organisms")
        if self.from_scratch and self.base:
            raise ValueError("--from-scratch trains its own pair; drop --base/--rl, or drop --from-scratch")
        if self.task != "countdown" and not self.base:
            raise ValueError(f"--task {self.task!r} needs the pair that speaks it: pass --base DIR --rl DIR (the shipped "
                             "pair and --from-scratch are Countdown organisms; the word-problem organism is in "
                             "experiments/organisms/wordproblems/)")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance} must be in [0, 1)")
        parse_dtype(self.dtype)
        size_for(self.profile, self.quick, ORGANISM_VOCAB)  # a bad --profile fails here

    def pair(self) -> tuple[str, str, tuple[str, ...]]:
        """(base, rl, variants) directories this run studies."""
        if self.from_scratch:
            org = Path(self.out) / "organisms"
            return str(org / "base"), str(org / "rl-none"), self.variants or (str(org / "rl-clip-cov"),)
        if self.base:
            return self.base, self.rl, self.variants
        shipped = ORGANISMS_DIR / "rl-clip-cov"
        return (str(ORGANISMS_DIR / "base"), str(ORGANISMS_DIR / "rl-none"),
                self.variants or ((str(shipped),) if shipped.is_dir() else ()))


def study_layers(n_layers: int) -> dict[str, Any]:
    """The layers the stages use, spread over the depth: four blocks evenly spaced from the first to
    the last for steering vectors and learned edits, the last three of them for patching and layer
    restoration, the middle block for the SAE. On the 4-block organism: blocks 0-3, 1-3 and 2 (the
    shipped study's choices); on SmolLM2-135M's 30 layers: 0, 10, 19, 29; 10, 19, 29; and 15."""
    spread = sorted({round(i * (n_layers - 1) / 3) for i in range(4)})
    return {"edit": tuple(spread), "later": tuple(spread[1:]) or tuple(spread), "sae": n_layers // 2}


def pair_shape(cfg: RunConfig) -> tuple[int, int]:
    """(layers, vocabulary size) of the run's base, read from its config (the organism's before
    --from-scratch has trained it)."""
    from probe.models.checkpoint import checkpoint_config

    base = cfg.pair()[0]
    if cfg.from_scratch and not Path(base).exists():
        return 4, ORGANISM_VOCAB
    conf = checkpoint_config(base)
    text = conf.get("text_config") or {}
    return int(conf.get("num_hidden_layers") or text["num_hidden_layers"]), int(conf.get("vocab_size") or text["vocab_size"])


def stage_configs(cfg: RunConfig) -> dict[str, Any]:
    """Every stage's own config dataclass, sized by `cfg.quick`."""
    from experiments.study.probe_stage import ProbeConfig
    from experiments.study.sae_stage import SAEDiffConfig, SAETrainConfig
    from experiments.study.sweep import SweepConfig
    from experiments.training.grpo_loss import LossConfig
    from experiments.training.sft import SFTConfig

    out, q, seed = Path(cfg.out), cfg.quick, cfg.seed
    base, rl, variants = cfg.pair()
    depth, vocab = pair_shape(cfg)
    lay, z = study_layers(depth), size_for(cfg.profile, q, vocab)
    org = out / "organisms"
    sft = SFTConfig(out=str(org / "base"), steps=150 if q else 3500, batch_size=64 if q else 128, warmup=20 if q else 100,
                    eval_samples=0, seed=seed, device=cfg.device, save_every=50 if q else 500)
    grpo = dict(base=str(org / "base"), steps=6 if q else 250, prompts_per_step=8 if q else 32, group_size=8 if q else 16,
                eval_problems=8 if q else 64, final_eval_samples=0, save_every=3 if q else 25, seed=seed, device=cfg.device)
    probe = ProbeConfig(base=base, rl=rl, out=str(out / "probe"), n_problems=z.probe_problems, samples=z.probe_samples,
                        seed=seed, device=cfg.device, task=cfg.task, dtype=cfg.dtype)
    sae = SAETrainConfig(base=base, rl=rl, out=str(out / "sae"), train_samples=z.sae_train_samples,
                         n_train_problems=z.sae_train_problems, samples=z.sae_samples, n_eval_problems=z.sae_eval_problems,
                         eval_samples=z.sae_eval_samples, d_sae=z.d_sae, seed=seed, device=cfg.device,
                         task=cfg.task, dtype=cfg.dtype, layer=lay["sae"])
    diff = SAEDiffConfig(base=base, rl=rl, sae=str(out / "sae" / "sae"), out=str(out / "sae" / "diff"),
                         n_problems=z.sae_eval_problems, samples=z.sae_eval_samples, seed=seed, device=cfg.device,
                         task=cfg.task, dtype=cfg.dtype)
    learn = learn_plan(cfg, base, rl, out, q, lay["edit"], z.learn)
    later = lay["later"][-1:] if z.last_layer_only else lay["later"]
    sweep = SweepConfig(
        base=base, rl=rl, variants=variants, out=str(out / "steer"), methods=("dom-position",),
        layers=("+".join(map(str, lay["edit"])),), coefs=z.coefs, gates=("always",),
        learned=tuple(stage.out for stage, _ in learn.values()), learned_coefs=z.learned_coefs,
        fractions=z.fractions, temperatures=z.temperatures, patch_layers=later, alphas=(1.0,), restore_layers=later,
        curves_half=z.curves_half,
        problems=z.problems, n=z.n, test_seeds=1, derive_problems=z.derive_problems,
        detector=str(out / "probe" / "fork_detector.safetensors"), sae=str(out / "sae" / "sae"),
        sae_diff=str(out / "sae" / "diff" / "metrics.json"), tolerance=cfg.tolerance, seed=seed, device=cfg.device,
        task=cfg.task, dtype=cfg.dtype, **engine_fields(cfg))
    return {"sft": sft, "grpo": grpo, "loss": {"none": LossConfig(intervention="none"),
                                                "clip-cov": LossConfig(intervention="clip-cov")},
            "probe": probe, "sae": sae, "sae_diff": diff, "learn": learn, "sweep": sweep}


def learn_plan(cfg: RunConfig, base: str, rl: str, out: Path, quick: bool,
               layers: tuple[int, ...] = (0, 1, 2, 3), overrides: dict | None = None) -> dict[str, tuple]:
    """name -> (LearnStageConfig, LearnConfig) of every learned edit the sweep evaluates: the shipped
    edit when the pair is the shipped one (its recipe and pair match, so it is reused, not retrained),
    else trained into OUT/learn/ on the training stream (`--quick`: a few steps)."""
    from experiments.study.learn_stage import RECIPES, LearnStageConfig, shipped_edit
    from steering.learn import LearnConfig

    plan = {}
    for name, recipe in RECIPES.items():
        lc = LearnConfig(**{**recipe, "layers": layers, **(overrides or {})})
        ship = None if (quick or cfg.from_scratch) else shipped_edit(name, base, rl, lc, cfg.task)
        stage = LearnStageConfig(base=base, rl=rl, out=ship or str(out / "learn" / f"{name}.safetensors"),
                                 sae=str(out / "sae" / "sae"), sae_diff=str(out / "sae" / "diff" / "metrics.json"),
                                 device=cfg.device, task=cfg.task, dtype=cfg.dtype)
        plan[name] = (stage, lc)
    return plan


# --- pre-flight ----------------------------------------------------------------------------------
def preflight(cfg: RunConfig) -> None:
    """Everything that can be checked before any work: a writable --out, no other configuration in
    it, and (unless the pair is trained here) a loadable, compatible pair and variants whose tokenizer
    writes the task and whose context holds its prompts plus the completion budget."""
    from experiments.run_state import check_writable

    out = check_writable(cfg.out)
    state = out / "run_state.json"
    if state.is_file():
        old = json.loads(state.read_text()).get("config")
        new = stored_config(cfg, out)
        if old is not None and stored_config(old, out) != new:
            old = stored_config(old, out)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff != ["variants"]:  # variants only enter the steer stage: adding one reruns that stage alone
                raise ValueError(f"--out {cfg.out!r} holds a run with another configuration (differs in {diff}); "
                                 "use a new --out, or the same flags to resume it (only --variants may change)")
    if cfg.from_scratch:
        return
    from probe.models.pair import load_pair
    from probe.sampling.sampler import check_context
    from probe.tasks import load_task

    base, rl, variants = cfg.pair()
    task = load_task(cfg.task)  # a bad --task fails here
    pair = load_pair(base, rl, device="cpu", dtype=cfg.dtype)  # raises PairMismatchError naming every difference
    task.check_tokenizer(pair.base.tokenizer)
    check_context(pair.base.hf, pair.base.tokenizer, task.heldout_prompts(), task.max_new_tokens)
    for v in variants:
        load_pair(pair.base, v, device="cpu", dtype=cfg.dtype)  # the loaded base is reused; raises on any mismatch


# --- stages --------------------------------------------------------------------------------------
def stored_config(config: Any, out: str | Path) -> Any:
    """`config` as `run_state.json` holds it: JSON values with portable paths (`portable`), so a run
    directory compares equal, and resumes, wherever the repository is cloned."""
    return _drop_defaults(portable(as_json(config), out))


SETTINGS_ADDED = {"dtype": "float32", "profile": "auto", "micro_batch": 0, "curves_half": "test", **ENGINE_DEFAULTS}
"""Settings added after runs were stored, with the value every earlier run used: left out of a stored
configuration at that value, so runs written before the setting existed still resume."""


def _drop_defaults(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_defaults(v) for k, v in obj.items() if not (k in SETTINGS_ADDED and v == SETTINGS_ADDED[k])}
    if isinstance(obj, list):
        return [_drop_defaults(v) for v in obj]
    return obj


class Run:
    """Stage bookkeeping in `run_state.json` (atomically rewritten): the run's configuration, written
    before any stage starts, and per finished stage its own configuration and seconds. A stage is
    reused only if it finished with the same configuration; when one reruns, the stages after it are
    forgotten (their inputs changed)."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "run_state.json"
        self.state = json.loads(path.read_text()) if path.is_file() else {}
        self.state["config"] = stored_config(cfg, self.out)
        self.state.setdefault("stages", {})
        self.reused: list[str] = []
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.out / "run_state.json", self.state)

    def done(self, name: str, config: Any) -> bool:
        rec = self.state["stages"].get(name, {})
        return bool(rec.get("done")) and stored_config(rec.get("config"), self.out) == stored_config(config, self.out)

    def mark(self, name: str, seconds: float, config: Any = None) -> None:
        self.state["stages"][name] = {"done": True, "seconds": seconds, "config": stored_config(config, self.out)}
        self._save()

    def stage(self, name: str, fn, config: Any, bar) -> None:
        bar.set_description(f"forksight run: {name}")
        if self.done(name, config):
            self.reused.append(name)
        else:
            later = STAGES[STAGES.index(name) + 1:]
            self.state["stages"] = {k: v for k, v in self.state["stages"].items() if k not in later and k != name}
            self._save()
            t0 = time.time()
            fn()
            self.mark(name, time.time() - t0, config)
        bar.update(1)


def _train_organisms(sc: dict) -> None:
    from experiments.training.grpo import GRPOConfig, train_grpo
    from experiments.training.sft import train_sft

    sft = sc["sft"]
    if not (Path(sft.out) / "model.safetensors").is_file():
        train_sft(sft)
    for name, loss in sc["loss"].items():
        out = Path(sft.out).parent / f"rl-{name}"
        if not (out / "model.safetensors").is_file():
            train_grpo(GRPOConfig(out=str(out), **sc["grpo"]), loss)


def learn_edits(plan: dict[str, tuple]) -> None:
    """The learn stage: every (stage config, `LearnConfig`) of `plan` that is new or resumable."""
    from experiments.study.learn_stage import run_learn

    for stage, lc in plan.values():
        if not Path(stage.out).is_file() or Path(stage.out + ".state.pt").is_file():  # new, or resumable
            run_learn(stage, lc)


def run_study(cfg: RunConfig) -> dict:
    """Run (or resume) every stage; returns results.json's content."""
    from experiments.study.probe_stage import run_probe
    from experiments.study.sae_stage import run_sae_diff, run_sae_train
    from experiments.study.sweep import run_sweep

    preflight(cfg)
    t0 = time.time()
    run, sc = Run(cfg), stage_configs(cfg)
    todo = [s for s in STAGES if s != "organisms" or cfg.from_scratch]
    with tqdm(total=len(todo), unit="stage") as bar:
        if cfg.from_scratch:
            run.stage("organisms", lambda: _train_organisms(sc), {k: sc[k] for k in ("sft", "grpo", "loss")}, bar)
        run.stage("probe", lambda: run_probe(sc["probe"]), sc["probe"], bar)
        run.stage("sae", lambda: (run_sae_train(sc["sae"]), run_sae_diff(sc["sae_diff"])), [sc["sae"], sc["sae_diff"]], bar)
        run.stage("learn", lambda: learn_edits(sc["learn"]), {k: list(v) for k, v in sc["learn"].items()}, bar)
        run.stage("steer", lambda: run_sweep(sc["sweep"]), sc["sweep"], bar)
        bar.set_description("forksight run: report")
        from experiments.study.report import build_results, write_report

        t_report = time.time()
        results = build_results(cfg, sc, run.out)
        if results["truncation"]["message"]:  # also flagged on the claims in results.json and report.md
            warnings.warn(f"forksight run: {results['truncation']['message']}; claims flagged: "
                          f"{', '.join(results['truncation']['claims_flagged'])}", TruncationWarning, stacklevel=2)
        results["run"] = {"stages": {k: {kk: v[kk] for kk in ("done", "seconds")} for k, v in run.state["stages"].items()
                                     if k != "report"},
                          "reused_stages": run.reused, "seconds_this_invocation": time.time() - t0}
        shipped = portable(results, run.out)  # paths relative to the run directory or the repository
        write_json_atomic(run.out / "results.json", shipped)
        write_report(shipped, run.out / "report.md")
        run.mark("report", time.time() - t_report, None)
        bar.update(1)
    return results


def headline(results: dict) -> dict:
    """The one JSON line `forksight run` prints."""
    c = {x["id"]: x for x in results["claims"]}
    h = results["headline"]
    return {"out": results["out"], "claims": {k: v["status"] for k, v in c.items()}, **h,
            "reused_stages": results["run"]["reused_stages"], "report": str(Path(results["out"]) / "report.md")}

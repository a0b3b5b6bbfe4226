"""`forksight sae train` and `forksight sae diff`: SAE features that RL pruned at forks.

`sae train` samples the base model on *training-distribution* problems of the task (`--task`:
`task.train_prompts`, never the held-out test half; optionally a fraction sampled from the RL model
instead, `--rl-mix`), collects the residual at one site on every real token but attention sinks
(`probe.sae.sinks.sink_mask`), trains a sae-lens SAE
on it (`probe.sae.dictionary.train_sae`) and scores it on trajectories of the selection half of the held-out split, base model (and
RL model when `--rl` is set). It writes `OUT/sae/` (sae-lens format), `metrics.json`,
`sae_training.png` and `feature_density.png`. Training is the long part: once the SAE is trained it
is saved with `OUT/train_state.json` (the config it was trained with and its training record), so a
run interrupted while scoring resumes there with the same config instead of sampling and training again;
before that, the sampled trajectories wait in `OUT/.trajectories-*.safetensors` (removed once trained),
so a run interrupted while collecting activations or training does not sample again.

`sae diff` samples one model (default: base) on the selection half of the held-out split (the
features it ranks are later chosen for steering, so it never sees the test half), teacher-forces both models on
those same trajectories (`probe.entropy.pair_stats`), takes the base model's forks (top-rho answer
tokens by base entropy), encodes both models' residuals at the positions predicting each answer
token, and ranks pruned / amplified features (`probe.sae.diff.sae_fork_diff`) with their top-activating contexts
and decoder logit effects. The same diff over non-fork answer tokens is the control: a pruning that
is specific to forks shows a larger |score| there than off forks. It writes `metrics.json`,
`fork_frequencies.png` and `top_features.png`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from experiments.paths import ORGANISMS_DIR, RESULTS_DIR
from experiments.run_state import as_json, portable, write_json_atomic
from experiments.study.protocol import Half
from probe.environment import environment
from probe.forks import fork_threshold
from probe.metrics.trajectories import load_trajectories, sample_trajectories, save_trajectories
from probe.models.budget import keep_fraction
from probe.models.checkpoint import load_causal_lm, resolve_device
from probe.models.hooks import resolve_hook, site_name
from probe.models.pair import BACKENDS, RESID_POST, Pair, load_pair, wrap
from probe.sae.dictionary import (
    ARCHITECTURES,
    SAESpec,
    collect_activations,
    load_sae,
    save_sae,
    train_sae,
)
from probe.sae.diff import sae_fork_diff
from probe.sae.features import DiffResult, feature_records
from probe.sae.plots import (
    plot_feature_density,
    plot_fork_frequencies,
    plot_sae_training,
    plot_top_features,
)
from probe.sae.quality import reconstruction_stats, sae_quality
from probe.sae.sinks import SINK_NORM_RATIO, find_sinks
from probe.tasks import load_task

FVU_TARGET, L0_TARGET = 0.2, 32
SAE_RESULTS = RESULTS_DIR / "sae"  # the shipped SAE and its diff


@dataclass
class SAETrainConfig:
    """Train an SAE on the base organism's residual stream (training-distribution problems)."""

    base: str = str(ORGANISMS_DIR / "base")
    """Checkpoint whose activations the SAE learns."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """RL checkpoint, for --rl-mix and for scoring the SAE on RL trajectories ("" = none)."""
    out: str = "runs/sae"
    """Output directory (sae/, metrics.json, plots)."""
    task: str = "countdown"
    """Task: "countdown" or "math:PATH[,train=PATH][,chat][,max_new_tokens=N]" (`probe.tasks.load_task`)."""
    layer: int = 2
    """Block whose output is learned (2: best fork-detector AUROC of `forksight probe` on the shipped pair)."""
    site: str = RESID_POST
    """Hook-site template ({L} = layer)."""
    architecture: str = "topk"
    """"topk" or "standard" (ReLU + L1)."""
    d_sae: int = 512
    """Number of features."""
    k: int = 16
    """Active features per token (topk)."""
    l1_coefficient: float = 5.0
    """L1 penalty (standard)."""
    lr: float = 4e-4
    """Adam learning rate."""
    train_samples: int = 2_000_000
    """Activations seen in training (with repetition)."""
    sae_batch_size: int = 1024
    """Activations per SAE step."""
    n_train_problems: int = 1024
    """Training-stream problems sampled for activations."""
    samples: int = 8
    """Completions per problem."""
    rl_mix: float = 0.0
    """Fraction of the training problems whose completions come from the RL model."""
    problem_seed: int = 7
    """Seed of the training-problem stream."""
    n_eval_problems: int = 128
    """Held-out problems for the quality metrics."""
    eval_samples: int = 8
    """Completions per held-out problem."""
    backend: str = "auto"
    """"auto", "transformer_lens" or "nnsight"."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu (models and SAE)."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""
    seed: int = 0
    """Sampling and SAE seed."""
    batch_size: int = 256
    """Trajectories per model forward pass."""
    activation_memory_gb: float = 4.0
    """Memory for the training activations; beyond it a seeded uniform subsample of positions is kept
    (long generations on large models: activations are collected batch by batch, never all at once)."""

    def __post_init__(self) -> None:
        if not self.activation_memory_gb > 0:
            raise ValueError(f"activation_memory_gb={self.activation_memory_gb} must be > 0")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}; allowed {ARCHITECTURES}")
        if not 0 <= self.rl_mix <= 1:
            raise ValueError(f"rl_mix={self.rl_mix} must be in [0, 1] (fraction of problems sampled from RL)")
        if self.rl_mix > 0 and not self.rl:
            raise ValueError(f"rl_mix={self.rl_mix} needs an RL checkpoint; pass --rl DIR or --rl-mix 0")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend={self.backend!r}; allowed 'auto', {', '.join(map(repr, BACKENDS))}")
        for name in ("n_train_problems", "samples", "n_eval_problems", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def spec(self) -> SAESpec:
        return SAESpec(self.architecture, self.d_sae, self.k, self.l1_coefficient, self.lr, self.train_samples,
                       self.sae_batch_size, seed=self.seed, device=str(resolve_device(self.device)))


@dataclass
class SAEDiffConfig:
    """Rank SAE features RL pruned / amplified at base-model forks on held-out problems."""

    base: str = str(ORGANISMS_DIR / "base")
    """Base checkpoint."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """RL checkpoint (trained from the base)."""
    sae: str = str(SAE_RESULTS / "sae")
    """SAE directory (sae-lens format, hook site in its metadata); default: the shipped one."""
    out: str = "runs/sae/diff"
    """Output directory (metrics.json, plots)."""
    task: str = "countdown"
    """Task: "countdown" or "math:PATH[,train=PATH][,chat][,max_new_tokens=N]" (`probe.tasks.load_task`)."""
    n_problems: int = 128
    """Held-out problems (the first N of the fixed split)."""
    samples: int = 8
    """Completions per problem."""
    sample_from: str = "base"
    """Which model samples the shared trajectories: "base" or "rl"."""
    rho: float = 0.2
    """Fork fraction (top-rho answer tokens by base entropy)."""
    min_freq: float = 0.02
    """A ranked feature must fire on >= this fraction of forks (base for pruned, RL for amplified)."""
    top: int = 10
    """Features listed per direction."""
    n_contexts: int = 5
    """Top-activating contexts per listed feature."""
    context_window: int = 24
    """Tokens shown per context."""
    through_final_norm: bool = True
    """Logit effects through the final norm's weight (else straight into the unembedding)."""
    backend: str = "auto"
    """"auto", "transformer_lens" or "nnsight"."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""
    seed: int = 0
    """Sampling seed."""
    batch_size: int = 256
    """Trajectories per forward pass."""

    def __post_init__(self) -> None:
        if self.sample_from not in ("base", "rl"):
            raise ValueError(f"sample_from={self.sample_from!r}; allowed 'base', 'rl'")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho={self.rho} must be in (0, 1]; 0.2 selects the top 20% of tokens")
        if not 0 <= self.min_freq <= 1:
            raise ValueError(f"min_freq={self.min_freq} must be in [0, 1]")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend={self.backend!r}; allowed 'auto', {', '.join(map(repr, BACKENDS))}")
        for name in ("n_problems", "samples", "top", "n_contexts", "context_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def run_sae_train(cfg: SAETrainConfig) -> dict:
    """Collect activations, train, save and score an SAE; writes everything into `cfg.out`."""
    t0, out = time.time(), Path(cfg.out)
    if cfg.rl:
        pair = load_pair(cfg.base, cfg.rl, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype)
        models = dict(pair.items())
    else:
        hf, tok = load_causal_lm(cfg.base, device="cpu", dtype=cfg.dtype)
        models = {"base": wrap(hf, tok, cfg.backend, cfg.device, cfg.base)}
    task = load_task(cfg.task)
    task.check_tokenizer(models["base"].tokenizer)
    hook_name = site_name(cfg.site, cfg.layer)
    for m in models.values():
        resolve_hook(hook_name, m)  # a bad --layer / --site fails before any work
    prompts = task.train_prompts(cfg.problem_seed, cfg.n_train_problems)
    n_rl = round(cfg.rl_mix * len(prompts))
    trained = _trained(cfg, out)
    if trained is not None:  # an interrupted run trained this SAE already: score it
        sae, record = load_sae(out / "sae", device=str(resolve_device(cfg.device))), trained["train"]
    else:
        sae, record = _train(cfg, models, task, prompts, n_rl, hook_name, out)
    for src in ("base", "rl"):  # trained (now or before): train_state.json resumes, the samples are not needed
        (out / f".trajectories-{src}.safetensors").unlink(missing_ok=True)
    history = record["history"]
    heldout = Half.of(task, "selection", cfg.n_eval_problems).prompts  # the protocol: never the test half
    quality, freqs, ntok = {}, {}, {}
    for name, m in models.items():
        traj, pass_rate = sample_trajectories(m, heldout, cfg.eval_samples, cfg.seed, cfg.batch_size, task)
        q, freqs[name] = sae_quality(sae, m, traj.tokens, traj.attention_mask, traj.answer_mask, hook_name, cfg.batch_size)
        quality[name] = {**q, "pass_rate": pass_rate, "n_trajectories": int(traj.tokens.shape[0])}
        ntok[name] = q["n_tokens"]
    plot_sae_training(history, out / "sae_training.png")
    plot_feature_density(freqs, out / "feature_density.png", ntok)
    base_q = quality["base"]
    metrics = {
        "sae": "sae", "hook_name": hook_name, "architecture": cfg.architecture, "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae), "k": cfg.k if cfg.architecture == "topk" else None,
        **{k: base_q[k] for k in ("l0", "fvu", "dead_fraction", "ce_loss_increase", "ce_loss_recovered")},
        "target": {"fvu_max": FVU_TARGET, "l0_max": L0_TARGET,
                   "met": base_q["fvu"] <= FVU_TARGET and base_q["l0"] <= L0_TARGET},
        "quality": quality,
        "quality_note": ("held-out problems; l0/fvu/dead over every real token but attention sinks (sink_mask), "
                         "losses over answer tokens with the sinks left as they are"),
        "train": {**record, "n_problems": len(prompts), "n_problems_from_rl": n_rl,
                  "problems": f"{cfg.task} train_prompts(seed={cfg.problem_seed})",
                  "positions": (f"every real token (prompt and completion) but attention sinks (activation norm > "
                                f"{SINK_NORM_RATIO:g}x the median)"), "steps": cfg.spec().steps,
                  "resumed_after_training": trained is not None},
        "plots": ["sae_training.png", "feature_density.png"],
        "seconds": time.time() - t0, "config": asdict(cfg), "environment": environment(),
    }
    write_json_atomic(out / "metrics.json", metrics, relative_to=out)
    return metrics


TRAIN_STATE = "train_state.json"
"""Written beside `sae/` once the SAE is trained: what an interrupted `sae train` resumes from."""


def sink_threshold_of(sae_dir: str | Path) -> float | None:
    """The attention-sink norm threshold the SAE in `sae_dir` was trained with (`sinks_left_out` of
    the stage's `train_state.json`, which sits beside the `sae/` directory it describes), for the
    edits that must leave those positions alone. None for an SAE the stage did not train (any other
    directory), one trained before sinks were left out, or one whose training found none."""
    sae_dir = Path(sae_dir).resolve()
    state = sae_dir.parent / TRAIN_STATE
    if sae_dir.name != "sae" or not state.is_file():
        return None
    sinks = json.loads(state.read_text()).get("train", {}).get("sinks_left_out") or {}
    return sinks.get("sink_threshold") if sinks.get("n_sinks") else None


def _train(cfg: SAETrainConfig, models: dict, task, prompts: list[str], n_rl: int, hook_name: str,
           out: Path) -> tuple[Any, dict]:
    """Sample, collect activations, train and save the SAE plus `train_state.json`; returns (sae, record)."""
    (out / TRAIN_STATE).unlink(missing_ok=True)  # sae/ is about to change: no stale state may vouch for it
    acts, n_traj, key = [], 0, _train_key(cfg, out)
    for src, part in (("base", prompts[n_rl:]), ("rl", prompts[:n_rl])):
        if part:
            cache = out / f".trajectories-{src}.safetensors"  # until the SAE is trained: no sampling twice
            traj = load_trajectories(cache, _sample_key(cfg, out, src))
            if traj is None:
                traj, _ = sample_trajectories(models[src], part, cfg.samples, cfg.seed, cfg.batch_size, task)
                save_trajectories(cache, traj, _sample_key(cfg, out, src))
            attn, where = traj.attention_mask, traj.attention_mask
            frac = keep_fraction(int(attn.sum()), 4 * models[src].d_model,
                                 int(cfg.activation_memory_gb * 2**30 * len(part) / len(prompts)))
            if frac < 1:  # a seeded uniform subsample of positions fits the budget
                where = attn & (torch.rand(attn.shape, generator=torch.Generator().manual_seed(cfg.seed)) < frac)
            acts.append(collect_activations(models[src], traj.tokens, attn, where, hook_name, cfg.batch_size))
            n_traj += traj.tokens.shape[0]
    x = torch.cat(acts)
    del acts
    sink, sinks = find_sinks(x)  # attention sinks: a huge vector on the first token would be most of the loss
    if sink.any():
        x = x[~sink]
    t_collect = time.time()
    sae, history = train_sae(x, hook_name, cfg.spec(), model_name=portable(cfg.base, out))  # no machine path in cfg.json
    record = {"n_activations": int(x.shape[0]), "sinks_left_out": sinks, "n_trajectories": n_traj,
              "seconds": time.time() - t_collect, "history": history}
    save_sae(sae, out / "sae")
    write_json_atomic(out / TRAIN_STATE, {"config": key, "train": record}, relative_to=out)
    return sae, record


def _sample_key(cfg: SAETrainConfig, out: Path, src: str) -> dict:
    """What one source's training trajectories depend on (not the SAE's own settings: a rerun with
    another memory budget or learning rate reuses them)."""
    fields = ("task", "problem_seed", "n_train_problems", "rl_mix", "samples", "seed", "dtype")
    return portable(as_json({"format": 1, "source": src, "checkpoint": getattr(cfg, src),
                             **{k: getattr(cfg, k) for k in fields}}), out)


def _train_key(cfg: SAETrainConfig, out: Path) -> dict:
    """The config fields that decide the trained SAE (scoring-only and placement fields left out), as
    `train_state.json` stores them (paths portable, relative to `out`)."""
    skip = {"out", "n_eval_problems", "eval_samples", "device", "backend"}
    positions = {"positions": f"real tokens but sinks (norm > {SINK_NORM_RATIO:g}x median)"}  # an SAE trained on all: retrain
    return portable(as_json({**{k: v for k, v in asdict(cfg).items() if k not in skip}, **positions}), out)


def _trained(cfg: SAETrainConfig, out: Path) -> dict | None:
    """The train state of an SAE already trained in `out` with this config, else None."""
    state = out / TRAIN_STATE
    if not (state.is_file() and (out / "sae" / "cfg.json").is_file()):
        return None
    try:
        saved = json.loads(state.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so only a foreign file: train again
    return saved if saved.get("config") == _train_key(cfg, out) else None


def compute_diff(cfg: SAEDiffConfig, pair: Pair, sae) -> DiffResult:
    """`probe.sae.diff.sae_fork_diff` on the first `cfg.n_problems` of the selection half of the
    held-out split (the features are chosen here: never the test half)."""
    task = load_task(cfg.task)
    task.check_tokenizer(pair.base.tokenizer)  # a chat task wraps its prompts with the tokenizer's template
    prompts = Half.of(task, "selection", cfg.n_problems).prompts
    return sae_fork_diff(pair, sae, prompts, task, cfg.samples, cfg.seed, cfg.rho, cfg.min_freq, cfg.batch_size,
                         cfg.sample_from)


def run_sae_diff(cfg: SAEDiffConfig) -> dict:
    """The feature diff at base forks; writes metrics.json and the plots into `cfg.out`."""
    t0, out = time.time(), Path(cfg.out)
    sae = load_sae(cfg.sae, device=str(resolve_device(cfg.device)))  # a bad --sae fails before any work
    pair = load_pair(cfg.base, cfg.rl, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype)
    load_task(cfg.task).check_tokenizer(pair.base.tokenizer)  # fails before any work
    res = compute_diff(cfg, pair, sae)
    lists = feature_records(res, sae, pair.base.hf, pair.base.tokenizer, cfg.top, cfg.n_contexts,
                            cfg.context_window, cfg.through_final_norm)
    diff, ctrl, elig = res.diff, res.control, res.diff.freq_base >= cfg.min_freq
    recon = {n: {"all_answer": reconstruction_stats(sae, r)[0], "forks": reconstruction_stats(sae, r[res.at_fork])[0]}
             for n, r in res.resid.items()}
    shown = {d: [f["feature"] for f in v] for d, v in lists.items()}
    plot_fork_frequencies(diff, shown["pruned"], shown["amplified"], out / "fork_frequencies.png")
    plot_top_features(diff, shown["pruned"], shown["amplified"], out / "top_features.png")
    metrics = {
        "base": cfg.base, "rl": cfg.rl, "sae": cfg.sae, "hook_name": res.hook_name,
        "sae_architecture": sae.cfg.architecture(), "d_sae": int(sae.cfg.d_sae),
        "n_problems": cfg.n_problems, "n_samples": cfg.samples, "sample_from": cfg.sample_from,
        "pass_rate": res.pass_rate, "temperature": 1.0, "seed": cfg.seed, "rho": cfg.rho,
        "n_answer_tokens": int(res.at_fork.numel()), "n_forks": int(res.at_fork.sum()),
        "fork_threshold_base": fork_threshold(res.stats.h_base, res.stats.mask, cfg.rho),
        "reconstruction": recon,
        "summary": {
            "min_freq": cfg.min_freq, "n_features_active_at_base_forks": int(elig.sum()),
            "n_lower_in_rl": len(res.ranked["pruned"]), "n_higher_in_rl": len(res.ranked["amplified"]),
            "n_pruned_3x": int(((diff.score <= -0.5) & elig).sum()),
            "n_fully_pruned": int(((diff.freq_rl == 0) & elig).sum()),
            "n_amplified_3x": int(((diff.score >= 0.5) & (diff.freq_rl >= cfg.min_freq)).sum()),
            "mean_abs_score_forks": diff.score[elig].abs().mean().item() if elig.any() else None,
            "mean_abs_score_non_forks": ctrl.score[elig].abs().mean().item() if elig.any() else None,
        },
        "score": "(mean_rl - mean_base) / (mean_rl + mean_base) at base forks; -1 = silent in RL",
        "logit_effect": "unit decoder direction x unembedding" + (" through the final norm weight" if cfg.through_final_norm
                                                                 else "") + ", centred over the vocabulary; direct path only",
        **lists,
        "plots": ["fork_frequencies.png", "top_features.png"], "seconds": time.time() - t0, "config": asdict(cfg),
        "environment": environment(),
    }
    write_json_atomic(out / "metrics.json", metrics, relative_to=out)
    return metrics


def train_headline(m: dict) -> dict:
    """The JSON line `forksight sae train` prints."""
    return {"out": m["config"]["out"], "hook_name": m["hook_name"], "l0": m["l0"], "fvu": m["fvu"],
            "dead_fraction": m["dead_fraction"], "ce_loss_increase": m["ce_loss_increase"], "target_met": m["target"]["met"]}


def diff_headline(m: dict) -> dict:
    """The JSON line `forksight sae diff` prints."""
    return {"out": m["config"]["out"], "n_forks": m["n_forks"], **{k: m["summary"][k] for k in ("n_pruned_3x", "n_fully_pruned", "n_amplified_3x")},
            "top_pruned": [f["feature"] for f in m["pruned"][:5]], "top_amplified": [f["feature"] for f in m["amplified"][:5]]}

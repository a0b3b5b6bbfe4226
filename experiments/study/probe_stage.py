"""`forksight probe`: base vs RL checkpoint on a task's held-out problems (`--task`), token by token.

Loads the pair (`probe.models.pair`), samples `samples` completions per problem of the *selection half* of
the held-out split (`experiments.study.protocol`: the fork detector is later a steering gate, so it
never sees the test half) from *each*
model (`probe.sampling.sampler`, temperature 1), teacher-forces both models on both sets of trajectories
(`probe.entropy`), and writes to `--out`:

- `metrics.json`: per sampling source (`on_base_samples`, `on_rl_samples`): entropy of both models
  (all / planning / execution / forks), forks and their overlap, the share of the entropy change on
  forks, KL both ways, the planning/execution split; the fork detector's held-out AUROC per layer
  with its shuffled-label control; the entropy-law fit of the RL training log when there is one.
- `fork_detector.safetensors` (`probe.detector.ForkDetector`), and the plots `entropy_hist.png`
  (answer tokens of both sources pooled; dashed: fork thresholds on base samples),
  `entropy_heatmap.png` (base samples), `law_fit.png`.

Forks are taken per batch = per sampling source, under each model's own entropies. The detector
pools both sources; its label is "base fork", its feature the RL model's residual at the position
predicting the token, and the split is by problem (all trajectories of a problem on one side). A
token-identity baseline (the same probe on the input embedding of the predicting token) says how
much of the AUROC the current token alone explains.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from experiments.paths import ORGANISMS_DIR
from experiments.run_state import portable, write_json_atomic
from experiments.study.protocol import Half
from probe.detector import ForkDetector
from probe.entropy import PairStats, Trajectories, pair_stats
from probe.environment import environment
from probe.forks import (
    ROLE_CODES,
    entropy_change_share_ci,
    entropy_change_share_on_forks,
    fork_mask,
    fork_overlap,
    fork_threshold,
    role_split,
)
from probe.law import bootstrap_law, extrapolation_error, fit_entropy_law, read_train_log
from probe.metrics.breadth import budget_record
from probe.metrics.trajectories import sample_scored_trajectories
from probe.models.budget import keep_fraction
from probe.models.checkpoint import own_directory
from probe.models.pair import BACKENDS, Pair, load_pair
from probe.plots import plot_entropy_heatmap, plot_entropy_histograms, plot_law_fit
from probe.tasks import load_task


@dataclass
class ProbeConfig:
    """Probe a base / RL checkpoint pair on a task's held-out problems."""

    base: str = str(ORGANISMS_DIR / "base")
    """Base checkpoint directory."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """RL-trained checkpoint directory (trained from the base)."""
    train_log: str = ""
    """RL training log (JSONL with entropy_mean and the law_reward_key); "" = RL_DIR/train_log.jsonl if present."""
    out: str = "runs/probe"
    """Output directory (metrics.json, plots, fork_detector.safetensors)."""
    task: str = "countdown"
    """Task: "countdown" or "math:PATH[,train=PATH][,chat][,max_new_tokens=N]" (`probe.tasks.load_task`)."""
    n_problems: int = 64
    """Held-out problems to sample (the first N of the fixed split; >= 2)."""
    samples: int = 8
    """Completions per problem from each model."""
    rho: float = 0.2
    """Fork fraction: the top-rho answer tokens by entropy, per batch."""
    layers: tuple[int, ...] = ()
    """Layers for the fork detector (RL resid_post); empty = all."""
    backend: str = "auto"
    """"auto", "transformer_lens" or "nnsight"."""
    seed: int = 0
    """Sampling seed (also seeds the detector split)."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""
    batch_size: int = 64
    """Trajectories per teacher-forced forward pass."""
    test_fraction: float = 0.25
    """Fraction of problems held out to score the fork detector."""
    fit_fraction: float = 0.5
    """Law extrapolation: fit on this first fraction of the log, predict the rest."""
    law_reward_key: str = "pass_at_1"
    """Log key used as R in the law: pass_at_1 (accuracy on the fixed held-out eval batch, the
    paper's R); reward_mean (training reward) is noisier, since each step draws new problems."""
    n_examples: int = 6
    """Trajectories shown in the entropy heat-map."""
    detector_memory_gb: float = 2.0
    """Memory for the fork detector's residuals (every layer, both sources); beyond it a seeded uniform
    subsample of answer tokens trains and scores the detector (long generations on large models)."""

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if self.n_problems < 2:
            raise ValueError(f"n_problems={self.n_problems}: the detector's held-out split needs >= 2 problems")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be >= 1 completion per problem")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho={self.rho} must be in (0, 1]; 0.2 selects the top 20% of tokens")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend={self.backend!r}; allowed 'auto', {', '.join(map(repr, BACKENDS))}")
        if not self.detector_memory_gb > 0:
            raise ValueError(f"detector_memory_gb={self.detector_memory_gb} must be > 0")
        for name in ("test_fraction", "fit_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1)")


def _mean(x: torch.Tensor, where: torch.Tensor) -> float | None:
    return x[where].double().mean().item() if where.any() else None


def source_metrics(stats: PairStats, traj: Trajectories, rho: float) -> tuple[dict, dict]:
    """Every per-token number for one batch of trajectories (one sampling source), and the forks
    {"base": mask, "rl": mask} they were computed from."""
    m = stats.mask
    h = {"base": stats.h_base, "rl": stats.h_rl}
    forks = {k: fork_mask(v, m, rho) for k, v in h.items()}
    planning, execution = traj.roles == ROLE_CODES["planning"], traj.roles == ROLE_CODES["execution"]
    out: dict = {"n_trajectories": int(m.shape[0]), "n_answer_tokens": int(m.sum()), "models": {}}
    for name in ("base", "rl"):
        lp = stats.lp_base if name == "base" else stats.lp_rl
        out["models"][name] = {
            "entropy_mean": _mean(h[name], m),
            "planning_entropy_mean": _mean(h[name], m & planning),
            "execution_entropy_mean": _mean(h[name], m & execution),
            "fork_entropy_mean": _mean(h[name], forks[name]),
            "fork_threshold": fork_threshold(h[name], m, rho),
            "n_forks": int(forks[name].sum()),
            "logprob_mean": _mean(lp, m),
            "roles": role_split(h[name], m, traj.roles, forks[name],
                                {r: ROLE_CODES[r] for r in ("planning", "execution")}),
        }
    ov = fork_overlap(forks["base"], forks["rl"])
    out["fork_overlap"] = {"jaccard": ov["jaccard"], "base_forks_that_are_rl_forks": ov["a_in_b"],
                           "rl_forks_that_are_base_forks": ov["b_in_a"], "n_both": ov["n_both"]}
    dh = stats.h_rl - stats.h_base
    out["entropy_change"] = {
        "mean_delta": _mean(dh, m),
        **{f"share_on_{k}_forks{'_signed' if s else ''}": entropy_change_share_on_forks(
            stats.h_base, stats.h_rl, m, forks[k], signed=s) for k in ("base", "rl") for s in (False, True)},
        "share_on_base_forks_ci": entropy_change_share_ci(stats.h_base, stats.h_rl, m, forks["base"], traj.prompt_index),
        "fork_token_fraction": int(forks["base"].sum()) / max(1, int(m.sum())),
    }
    nonfork = m & ~forks["base"]
    out["kl"] = {
        "base_rl_mean": _mean(stats.kl_base_rl, m), "rl_base_mean": _mean(stats.kl_rl_base, m),
        "base_rl_at_base_forks": _mean(stats.kl_base_rl, forks["base"]),
        "base_rl_at_base_non_forks": _mean(stats.kl_base_rl, nonfork),
        "rl_base_at_base_forks": _mean(stats.kl_rl_base, forks["base"]),
        "rl_base_at_base_non_forks": _mean(stats.kl_rl_base, nonfork),
    }
    return out, forks


def _law(cfg: ProbeConfig, out: Path) -> dict:
    log = Path(cfg.train_log) if cfg.train_log else own_directory(cfg.rl) / "train_log.jsonl"
    if not cfg.train_log and not log.is_file():
        return {"available": False, "reason": f"no --train-log given and {log} does not exist"}
    h, r = read_train_log(log, reward_key=cfg.law_reward_key)
    fit = fit_entropy_law(h, r)
    extra = extrapolation_error(h, r, cfg.fit_fraction)
    early = fit_entropy_law(h[: extra["n_fit"]], r[: extra["n_fit"]])
    plot_law_fit(h, r, fit, out / "law_fit.png", n_fit=extra["n_fit"], early_fit=early)
    return {"available": True, "train_log": str(log), "reward_key": cfg.law_reward_key, "n_steps": len(h), **fit.to_dict(),
            "bootstrap": bootstrap_law(h, r, n_boot=1000, seed=cfg.seed), "extrapolation": extra, "plot": "law_fit.png"}


def _examples(tok, traj: Trajectories, stats: PairStats, forks: dict, k: int, every: int, out: Path) -> None:
    """Heat-map of the first sample of the first `k` problems (answer tokens, left-aligned)."""
    rows = list(range(0, traj.tokens.shape[0], every))[:k]
    lens = [int(traj.answer_mask[r].sum()) for r in rows]

    def grid(src: torch.Tensor, fill) -> torch.Tensor:  # [k, width] answer positions of each row
        g = torch.full((len(rows), max(lens)), fill, dtype=src.dtype)
        for i, r in enumerate(rows):
            g[i, : lens[i]] = src[r][traj.answer_mask[r]]
        return g

    labels = [tok.convert_ids_to_tokens(grid(traj.tokens, 0)[i, : lens[i]].tolist()) for i in range(len(rows))]
    plot_entropy_heatmap(labels, {"base": grid(stats.h_base, 0.0), "rl": grid(stats.h_rl, 0.0)},
                         {n: grid(f, False) for n, f in forks.items()}, grid(traj.answer_mask, False),
                         grid(traj.roles, -1), out / "entropy_heatmap.png")


def _detector_subsample(answer: torch.Tensor, bytes_per_token: int, cfg: ProbeConfig) -> torch.Tensor | None:
    """Answer tokens whose residuals the detector keeps (None = all): a seeded uniform subsample when
    one source's share of `detector_memory_gb` cannot hold them all."""
    frac = keep_fraction(int(answer.sum()), bytes_per_token, int(cfg.detector_memory_gb * 2**29))  # half: per source
    if frac >= 1:
        return None
    g = torch.Generator().manual_seed(cfg.seed)
    return answer & (torch.rand(answer.shape, generator=g) < frac)


def run_probe(cfg: ProbeConfig) -> dict:
    """Run the whole probe; writes metrics.json, the detector and the plots into `cfg.out`."""
    t0 = time.time()
    if cfg.train_log and not Path(cfg.train_log).is_file():  # fail before any sampling
        raise FileNotFoundError(f"--train-log {cfg.train_log!r} does not exist; pass the RL run's "
                                "train_log.jsonl, or leave it empty to use RL_DIR/train_log.jsonl if present")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pair: Pair = load_pair(cfg.base, cfg.rl, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype)
    tok = pair.base.tokenizer
    task = load_task(cfg.task)
    task.check_tokenizer(tok)
    layers = list(cfg.layers or range(pair.rl.n_layers))
    bad = [x for x in layers if not 0 <= x < pair.rl.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range; the models have layers 0..{pair.rl.n_layers - 1}")
    prompts = Half.of(task, "selection", cfg.n_problems).prompts  # the protocol: never the test half
    metrics: dict = {"base": cfg.base, "rl": cfg.rl, "backend": pair.base.backend, "device": str(pair.base.device),
                     "n_problems": len(prompts), "n_samples": cfg.samples, "temperature": 1.0,
                     "seed": cfg.seed, "rho": cfg.rho}
    resid: dict[int, list] = {x: [] for x in layers}
    labels, groups, hists, thresholds, pred_tokens = [], [], {"base": [], "rl": []}, {}, []
    for src, model in pair.items():
        branches, scored, traj = sample_scored_trajectories(model.hf, tok, prompts, cfg.samples, cfg.seed,
                                                     cfg.batch_size, str(pair.base.device), task)
        keep = _detector_subsample(traj.answer_mask, 4 * pair.rl.d_model * len(layers), cfg)
        stats = pair_stats(pair, traj, cfg.batch_size, resid_layers=layers, resid_keep=keep)
        kept = stats.mask if keep is None else keep
        rec, forks = source_metrics(stats, traj, cfg.rho)
        own = stats.h_base if src == "base" else stats.h_rl
        rec["pass_rate"] = scored.correct.float().mean().item()
        rec.update(budget_record(branches.finish_reason, branches.mask.sum(1).cpu(), branches.tokens.shape[1]))
        gap = (branches.entropy.cpu()[branches.mask.cpu()] - own[stats.mask]).abs().double()  # nats, per answer token
        rec["sampler_entropy_max_abs_diff"] = gap.max().item()  # bfloat16: the worst token; mean and p99 say how rare
        rec["sampler_entropy_mean_abs_diff"] = gap.mean().item()
        rec["sampler_entropy_p99_abs_diff"] = gap.quantile(0.99).item() if gap.numel() <= 2**24 else None
        metrics[f"on_{src}_samples"] = rec
        for x in layers:
            resid[x].append(stats.resid[x])
        labels.append(forks["base"][kept])
        pred_tokens.append(traj.tokens[:, :-1][kept[:, 1:]])  # token at each predicting position
        groups.append(traj.prompt_index[:, None].expand_as(kept)[kept])
        for name in hists:
            hists[name].append((stats.h_base if name == "base" else stats.h_rl)[stats.mask])
        if src == "base":
            thresholds = {n: rec["models"][n]["fork_threshold"] for n in hists}
            _examples(tok, traj, stats, forks, cfg.n_examples, cfg.samples, out)
    det = ForkDetector.fit({x: torch.cat(v) for x, v in resid.items()}, torch.cat(labels), torch.cat(groups),
                           test_fraction=cfg.test_fraction, seed=cfg.seed,
                           meta={"hook_site": "blocks.{L}.hook_resid_post", "base": portable(cfg.base, out), "rl": portable(cfg.rl, out),
                                 "rho": cfg.rho, "label": "base-model fork at the token (per sampling-source batch)",
                                 "feature": "RL residual at the position predicting the token"})
    det.save(out / "fork_detector.safetensors")
    metrics["detector"] = {**det.meta["report"], "path": "fork_detector.safetensors", "feature": det.meta["feature"],
                           "label": det.meta["label"], "hook_site": det.meta["hook_site"]}
    # Baseline: what token identity alone predicts (same split), so the layers' AUROC has a floor to beat.
    emb = pair.rl.hf.get_input_embeddings().weight.detach().float().cpu()[torch.cat(pred_tokens)]
    base_det = ForkDetector.fit({0: emb}, torch.cat(labels), torch.cat(groups), test_fraction=cfg.test_fraction, seed=cfg.seed)
    metrics["detector"]["token_baseline"] = {
        **base_det.meta["report"]["layers"]["0"],
        "feature": "RL input embedding of the token at the predicting position (identity only, no context)"}
    pooled = {k: torch.cat(v) for k, v in hists.items()}
    plot_entropy_histograms(pooled, out / "entropy_hist.png", thresholds)
    metrics["law"] = _law(cfg, out)
    metrics["plots"] = ["entropy_hist.png", "entropy_heatmap.png"] + (["law_fit.png"] if metrics["law"]["available"] else [])
    metrics["seconds"] = time.time() - t0
    metrics["config"] = asdict(cfg)
    metrics["environment"] = environment()
    write_json_atomic(out / "metrics.json", metrics, relative_to=out)
    return metrics


def headline(metrics: dict) -> dict:
    """The one-line summary the CLI prints."""
    on_base = metrics["on_base_samples"]
    det = metrics["detector"]
    best = det["layers"][str(det["best_layer"])]
    return {
        "out": metrics["config"]["out"],
        "entropy_mean_base": on_base["models"]["base"]["entropy_mean"],
        "entropy_mean_rl": on_base["models"]["rl"]["entropy_mean"],
        "fork_jaccard": on_base["fork_overlap"]["jaccard"],
        "entropy_change_share_on_base_forks": on_base["entropy_change"]["share_on_base_forks"],
        "detector_best_layer": det["best_layer"], "detector_auroc": best["auroc_test"],
        "detector_auroc_control": best["auroc_control"],
        "detector_auroc_token_baseline": det["token_baseline"]["auroc_test"],
        "law_ceiling": metrics["law"].get("ceiling"),
    }

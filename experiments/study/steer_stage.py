"""`forksight steer derive | apply | sweep`: steering the collapsed RL organism back toward breadth.

`steer derive` samples the base model on *training-distribution* problems of the task (`--task`:
`task.train_prompts`, never the held-out test half), teacher-forces both models on those trajectories (`steering.collect`), takes the
base model's forks (top-rho answer tokens by base entropy) and writes one `SteeringVector` file:
difference of means (global, per answer position, per token role), PCA of the differences, or the
SAE decoder rows of the features RL pruned (weights = mean_base - mean_rl of each feature at forks,
from `forksight sae diff`). Fork thresholds of both models on those trajectories go to its config.

`steer apply` evaluates one vector file on the RL model at one (coef, gate, temperature) with the
held-out metrics of `experiments.study.eval_stage` (same sampler, same seed, same metrics.json keys);
with `--engine vllm` it samples on vLLM, and an intervention vLLM cannot apply (a gate other than
`always`, a learned edit other than a plain vector) is refused with the reason, never sampled otherwise.
`steer derive` samples and teacher-forces on the HF engine (it needs entropies and residuals).

`steer sweep` (see `experiments.study.sweep`) runs the grid, the baselines and the patching curve.

Gates the study uses (`steering.gates`): `always`; `entropy` (the RL model's own next-token entropy
above its fork threshold); `planning` (Countdown: the next token starts an operand or operator,
`after_tokens` of the operators, `;` and the prompt's `:`); `detector` (the shipped fork detector).
Role-conditioned vectors guess the next token's role from the prefix (`countdown_role`): after `=`
until `;` the next token is a result digit (execution), otherwise planning.

Departures: normalisation "none" throughout (diff of means: coef 1 moves the RL mean onto the base
mean at forks; PCA: the mean difference's projection; SAE: the weighted decoder sum), so
coefficients are comparable across methods.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from experiments.paths import ORGANISMS_DIR, RESULTS_DIR
from experiments.run_state import REPO_DIR, portable
from experiments.study.engines import EngineSettings, vllm_config
from probe.detector import ForkDetector
from probe.environment import environment
from probe.forks import fork_threshold
from probe.metrics.trajectories import sample_trajectories
from probe.models.checkpoint import load_causal_lm
from probe.models.pair import load_pair
from probe.sae.dictionary import load_sae
from probe.tasks import load_task
from steering import (
    SteeringVector,
    after_tokens,
    collect,
    diff_of_means_vector,
    fork_tokens,
    pca_vector,
    sae_vector,
)

METHODS = ("dom-global", "dom-position", "dom-role", "dom-cluster", "pca", "sae")
STUDY_GATES = ("always", "entropy", "planning", "detector")
FORK_SETS = ("base", "pruned")


def split_method(spec: str, default_forks: str = "base") -> tuple[str, str]:
    """"dom-position:pruned" -> ("dom-position", "pruned"); no suffix -> `default_forks`."""
    method, _, forks = spec.partition(":")
    forks = forks or default_forks
    if method not in METHODS:
        raise ValueError(f"method {spec!r}: {method!r} is not one of {METHODS}")
    if forks not in FORK_SETS:
        raise ValueError(f"method {spec!r}: fork set {forks!r} is not one of {FORK_SETS} (e.g. dom-position:pruned)")
    if method == "sae" and forks != "base":
        raise ValueError(f"method {spec!r}: sae vectors come from `forksight sae diff` (base forks); drop the suffix")
    return method, forks


@dataclass
class DeriveConfig:
    """Derive one steering vector from the base / RL pair at base forks (training problems)."""

    base: str = str(ORGANISMS_DIR / "base")
    """Base checkpoint."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """RL checkpoint (trained from the base)."""
    out: str = "runs/steer/vector.safetensors"
    """Output vector file (safetensors)."""
    task: str = "countdown"
    """Task: "countdown" or "math:PATH[,train=PATH][,chat][,max_new_tokens=N]" (`probe.tasks.load_task`)."""
    method: str = "dom-global"
    """One of dom-global, dom-position, dom-role, dom-cluster, pca, sae; optionally ":pruned" (see forks)."""
    layers: tuple[int, ...] = (2,)
    """Layers (blocks.{L}.hook_resid_post) the vector steers."""
    n_problems: int = 256
    """Training-stream problems sampled from the base model."""
    samples: int = 8
    """Completions per problem."""
    problem_seed: int = 11
    """Seed of the training-problem stream (the held-out split is never used)."""
    rho: float = 0.2
    """Fork fraction (top-rho answer tokens by entropy, per model)."""
    forks: str = "base"
    """Tokens the vector is derived at: "base" (the base model's forks) or "pruned" (base forks where
    the RL model does not fork: the branch points RL collapsed). A method may override it with a
    suffix, e.g. "dom-position:pruned"."""
    n_positions: int = 8
    """Answer-position buckets of dom-position (the last pools all later positions)."""
    n_clusters: int = 16
    """k-means clusters of the RL residuals at the selected forks (dom-cluster)."""
    sae: str = str(RESULTS_DIR / "sae" / "sae")
    """SAE directory (method sae)."""
    sae_diff: str = str(RESULTS_DIR / "sae" / "diff" / "metrics.json")
    """`forksight sae diff` metrics.json listing the pruned features (method sae)."""
    n_features: int = 10
    """Pruned features summed (method sae)."""
    seed: int = 0
    """Sampling seed."""
    batch_size: int = 256
    """Trajectories per forward pass."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""

    def __post_init__(self) -> None:
        split_method(self.method)
        if self.forks not in FORK_SETS:
            raise ValueError(f"forks={self.forks!r}; allowed {FORK_SETS}")
        if not self.layers:
            raise ValueError("layers is empty; pass e.g. --layers 2")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho={self.rho} must be in (0, 1]")


def derive_vectors(cfg: DeriveConfig, methods: tuple[str, ...] | None = None) -> dict[str, SteeringVector]:
    """One `SteeringVector` per method spec ("method[:forks]", all of `cfg.layers`) from a single
    collection of residuals."""
    methods = methods or (cfg.method,)
    pair = load_pair(cfg.base, cfg.rl, device=cfg.device, dtype=cfg.dtype)
    task = load_task(cfg.task)
    task.check_tokenizer(pair.base.tokenizer)
    prompts = task.train_prompts(cfg.problem_seed, cfg.n_problems)
    traj, _ = sample_trajectories(pair.base, prompts, cfg.samples, cfg.seed, cfg.batch_size, task)
    res = collect(pair, traj, cfg.layers, batch_size=cfg.batch_size)
    st = res.stats
    info = {"fork_threshold_base": fork_threshold(st.h_base, st.mask, cfg.rho),
            "fork_threshold_rl": fork_threshold(st.h_rl, st.mask, cfg.rho), "rho": cfg.rho,
            "problems": f"{cfg.task} train_prompts(seed={cfg.problem_seed})[:{cfg.n_problems}]",
            "n_trajectories": int(traj.tokens.shape[0]), "sampled_from": "base"}
    out = {}
    for spec in methods:
        m, forks = split_method(spec, cfg.forks)
        sel = fork_tokens(st, cfg.rho, forks)
        kw = dict(source_models=portable({"base": cfg.base, "rl": cfg.rl}, REPO_DIR),  # no machine path in the file
                  positions=f"{forks} forks", normalisation="none")
        if m.startswith("dom-"):
            out[spec] = diff_of_means_vector(res, sel, conditioning=m[4:], n_positions=cfg.n_positions,
                                             n_clusters=cfg.n_clusters, seed=cfg.seed, config=info, **kw)
        elif m == "pca":
            out[spec] = pca_vector(res, sel, config=info, **kw)
        else:
            out[spec] = _sae_vector(cfg, info, kw)
    return out


def _sae_vector(cfg: DeriveConfig, info: dict, kw: dict) -> SteeringVector:
    sae = load_sae(cfg.sae)
    diff = json.loads(Path(cfg.sae_diff).read_text())
    feats = diff["pruned"][: cfg.n_features]
    layer = int(diff["hook_name"].split(".")[1])
    if layer not in cfg.layers:
        raise ValueError(f"the SAE reads layer {layer} ({diff['hook_name']}); --layers {cfg.layers} lacks it. "
                         f"Fix: --layers {layer}")
    weights = [f["mean_base"] - f["mean_rl"] for f in feats]
    return sae_vector(sae.W_dec, [f["feature"] for f in feats], layer, weights=weights,
                      config={**info, "sae": cfg.sae, "sae_diff": cfg.sae_diff}, **kw)


def run_derive(cfg: DeriveConfig) -> dict:
    vec = derive_vectors(cfg)[cfg.method]
    path = vec.save(cfg.out)
    return {"out": str(path), "method": cfg.method, "layers": vec.layers,
            "norms": {str(k): vec.rows(k).norm(dim=-1).tolist() for k in vec.layers},
            "fork_threshold_rl": vec.config.get("fork_threshold_rl")}


def countdown_role(tok):
    """Condition for role vectors: 1 (execution) after `=` until `;`, else 0 (planning)."""
    eq, semi = tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids(";")

    def cond(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] == 0:
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        ar = torch.arange(tokens.shape[1], device=tokens.device)
        last = lambda t: torch.where(tokens == t, ar, -1).max(1).values  # noqa: E731
        return (last(eq) > last(semi)).long()

    return cond


def gate_kwargs(gate: str, tok, vec_config: dict, detector: str, threshold: float | None = None) -> dict:
    """Keyword arguments of `SteeringVector.apply` / `steering.patch` for a study gate."""
    if gate == "always":
        return {"gate": "always"}
    if gate == "entropy":
        thr = vec_config.get("fork_threshold_rl") if threshold is None else threshold
        return {"gate": "entropy", "threshold": float(thr)}
    if gate == "planning":
        return {"gate": "planning", "planning": after_tokens(tok.convert_tokens_to_ids(list("+-*/;:")))}
    if gate == "detector":
        return {"gate": "detector", "detector": ForkDetector.load(detector)}
    raise ValueError(f"gate={gate!r}; allowed {STUDY_GATES}")


def steer_intervention(model, tok, vec: SteeringVector, coef: float, gate: str, detector: str):
    kw = gate_kwargs(gate, tok, vec.config, detector)
    if vec.conditioning == "role":
        kw["condition"] = countdown_role(tok)
    return vec.apply(model, coef=coef, **kw)


@dataclass
class ApplyConfig(EngineSettings):
    """Evaluate one intervention file (a vector or learned edit, e.g. a sweep's `best.safetensors`)
    on the RL model, on one half of the held-out split, with its recommended settings."""

    intervention: str = str(RESULTS_DIR / "steer-sweep" / "best.safetensors")
    """Intervention file (`steering.save_selected`, or any vector / learned-edit file)."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """Model to steer."""
    task: str = "countdown"
    """Task (`probe.tasks.load_task`)."""
    coef: float | None = None
    """Coefficient (None = the file's recommended one)."""
    fraction: float | None = None
    """Share of each prompt's samples steered (None = the file's recommended one, else all)."""
    temperature: float | None = None
    """Sampling temperature (None = the file's recommended one)."""
    half: str = "test"
    """Half of the held-out split: "test" or "selection" (`experiments.study.protocol`)."""
    problems: int = 0
    """First N problems of the half (0 = all)."""
    n: int = 64
    """Samples per problem."""
    seed: int = 1000
    """Sampling seed (1000 = the first test seed of the sweep's protocol)."""
    batch_size: int = 1024
    """Rows per forward pass."""
    out: str = ""
    """metrics.json path ("" = do not write)."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""


def run_apply(cfg: ApplyConfig) -> dict:
    from experiments.run_state import write_json_atomic
    from experiments.study.protocol import Half, evaluate_cell
    from probe.tasks import load_task
    from steering.selected import load_intervention

    sel = load_intervention(cfg.intervention)
    task = load_task(cfg.task)
    t = sel.temperature if cfg.temperature is None else cfg.temperature
    half = Half.of(task, cfg.half, cfg.problems)
    if cfg.engine == "vllm":
        from probe.sampling.vllm_engine import VLLMEngine

        edit = sel.vllm_edit(coef=cfg.coef, fraction=cfg.fraction)  # refused here, before an engine starts
        with VLLMEngine(cfg.rl, vllm_config(cfg, cfg.dtype, cfg.seed)) as engine:
            task.check_tokenizer(engine.tokenizer)
            m = evaluate_cell(None, engine.tokenizer, task, half, n=cfg.n, seed=cfg.seed, temperature=t,
                              batch_size=cfg.batch_size, intervention=edit, engine=engine)
    else:
        model, tok = load_causal_lm(cfg.rl, device=cfg.device, dtype=cfg.dtype)
        task.check_tokenizer(tok)
        steer = sel.apply(model, coef=cfg.coef, fraction=cfg.fraction)
        m = evaluate_cell(model, tok, task, half, n=cfg.n, seed=cfg.seed, temperature=t, batch_size=cfg.batch_size,
                          intervention=steer)
    m.pop("outcomes")
    m["config"], m["recommended"], m["environment"] = asdict(cfg), sel.recommended, environment()
    if cfg.out:
        write_json_atomic(cfg.out, m, relative_to=Path(cfg.out).parent)
    return m


def apply_headline(m: dict) -> dict:
    """The JSON line `forksight steer apply` prints."""
    return {k: m[k] for k in ("pass_at_1", "pass_at_64", "distinct_correct_mean", "fork_entropy_mean", "truncated_share")
            if k in m}

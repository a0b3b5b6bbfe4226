"""`forksight steer learn`: train a learned edit on the frozen RL model, on training problems only.

Loads the pair, draws training prompts from the task's training stream (never the held-out
split: `task.train_prompts(problem_seed, ...)`, step s reads prompts s * k .. s * k + k - 1, so a
resumed run sees the same data), and runs `steering.learn.learn` with the `LearnConfig` flags.
The edit file records the objective, steps, seed, data, parameter count and its share of the RL
model's parameters; `<out>.state.pt` makes an interrupted run resume. The learned edit is then an
ordinary candidate of `forksight steer sweep --learned FILE`, chosen or not on the selection half.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.paths import ORGANISMS_DIR, RESULTS_DIR
from experiments.run_state import check_writable
from probe.models.checkpoint import load_causal_lm
from probe.models.pair import load_pair
from probe.tasks import load_task
from steering.learn import LearnConfig, learn

MAX_PARAM_SHARE = 0.01
LEARNED_DIR = RESULTS_DIR / "learned"
RECIPES: dict[str, dict] = {
    # plan like the base, execute like RL: KL(base || steered) at planning tokens, KL(RL || steered) at execution
    "lowrank-distill": dict(objective="distill", kind="lowrank", distill_at="planning", anchor=1.0, steps=300, lr=0.01),
    "position-distill": dict(objective="distill", kind="position", distill_at="planning", anchor=1.0, steps=200, lr=0.01),
    # per-feature gains and offsets of the SAE features RL pruned (`forksight sae diff`), same objective
    "sae-distill": dict(objective="distill", kind="sae", distill_at="planning", anchor=1.0, steps=200, lr=0.05),
    # K directions, sample j takes direction j mod K, trained by a reward on distinct correct solutions per group
    "mode8-breadth": dict(objective="breadth", kind="mode", n_modes=8, steps=300, lr=0.01, anchor=1.0),
}
"""The learned edits `forksight run` evaluates (LearnConfig overrides), shipped trained on the
shipped pair under `experiments/results/learned/<name>.safetensors` (`forksight steer learn --out
<that file>` plus the recipe's flags retrains one)."""


def shipped_edit(name: str, base: str, rl: str, cfg: LearnConfig, task: str = "countdown") -> str | None:
    """The shipped edit file of recipe `name` if it was learned on this pair (by directory name) and
    task with exactly `cfg` (the completion-length cap aside, which the task sets); else None."""
    from steering.learned import LearnedEdit

    path = LEARNED_DIR / f"{name}.safetensors"
    if not path.is_file():
        return None
    prov = LearnedEdit.load(path).meta["provenance"]
    skip = ("max_new_tokens", "micro_batch")  # the task sets the cap; the chunking does not change the gradient
    want = {k: v for k, v in asdict(cfg).items() if k not in skip}
    have = {k: v for k, v in prov.get("config", {}).items() if k not in skip}
    same_pair = (prov.get("rl"), prov.get("base"), prov.get("task", "countdown")) == (Path(rl).name, Path(base).name, task)
    return str(path) if same_pair and have == {k: list(v) if isinstance(v, tuple) else v for k, v in want.items()} \
        else None


@dataclass
class LearnStageConfig:
    """Where to learn an edit: the pair, the task's training stream, the output file."""

    base: str = str(ORGANISMS_DIR / "base")
    """Base checkpoint (the teacher of objective=distill)."""
    rl: str = str(ORGANISMS_DIR / "rl-none")
    """RL checkpoint (frozen; the edit is added to its residual stream)."""
    task: str = "countdown"
    """Task whose training stream supplies the prompts."""
    out: str = str(RESULTS_DIR / "learned" / "edit.safetensors")
    """Output edit file (safetensors; `<out>.state.pt` holds the resumable loop state)."""
    problem_seed: int = 101
    """Seed of the training-problem stream."""
    sae: str = str(RESULTS_DIR / "sae" / "sae")
    """SAE directory (kind=sae)."""
    sae_diff: str = str(RESULTS_DIR / "sae" / "diff" / "metrics.json")
    """`forksight sae diff` metrics.json whose `pruned` features the sae kind edits (kind=sae)."""
    sae_features: int = 10
    """How many of the top pruned features the sae kind edits."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (about 2x faster on CPUs with avx512_bf16 and GPUs; entropies and log-probs stay float32 computations)."""


def pruned_dictionary(sae_dir: str, diff_path: str, n_features: int):
    """A `FeatureDictionary` of the top `n_features` features of a `forksight sae diff` run's `pruned` list."""
    import json

    from probe.sae.dictionary import load_sae
    from steering.sae_edit import FeatureDictionary

    diff = json.loads(Path(diff_path).read_text())
    feats = [f["feature"] for f in diff["pruned"][:n_features]]
    if not feats:
        raise ValueError(f"{diff_path} lists no pruned features. Fix: run `forksight sae diff` with a lower --min-freq")
    return FeatureDictionary.from_sae(load_sae(sae_dir), feats, hook_name=diff["hook_name"])


def run_learn(stage: LearnStageConfig, cfg: LearnConfig) -> dict:
    check_writable(Path(stage.out).parent)
    task = load_task(stage.task)
    base = None
    if cfg.objective == "distill":  # the teacher: a compatible pair, checked (PairMismatchError names differences)
        pair = load_pair(stage.base, stage.rl, backend="nnsight", device=stage.device, dtype=stage.dtype)
        (base, _), (rl, tok) = (pair.base.hf, None), (pair.rl.hf, pair.rl.tokenizer)
    else:
        rl, tok = load_causal_lm(stage.rl, device=stage.device, dtype=stage.dtype)
    task.check_tokenizer(tok)
    if cfg.max_new_tokens != task.max_new_tokens:
        cfg = LearnConfig(**{**asdict(cfg), "max_new_tokens": task.max_new_tokens})
    k = cfg.prompts_per_step
    pool = task.train_prompts(stage.problem_seed, cfg.steps * k)
    n_model = sum(p.numel() for p in rl.parameters())
    prov = {"rl": Path(stage.rl).name, "base": Path(stage.base).name, "task": stage.task,
            "data": f"{stage.task} train_prompts(seed={stage.problem_seed})[:{cfg.steps * k}]",
            "model_params": n_model}
    dictionary = None
    if cfg.kind == "sae":
        dictionary = pruned_dictionary(stage.sae, stage.sae_diff, stage.sae_features)
        prov["sae"] = {"features": dictionary.features, "diff": Path(stage.sae_diff).name}
    edit, log = learn(rl, tok, task, lambda s, n: pool[s * n:(s + 1) * n], cfg, stage.out, base_model=base,
                      provenance=prov, dictionary=dictionary)
    share = edit.n_params() / n_model
    if share > MAX_PARAM_SHARE:
        raise ValueError(f"the edit has {edit.n_params()} parameters, {share:.2%} of the model's {n_model}; the budget "
                         f"is {MAX_PARAM_SHARE:.0%}. Fix: fewer layers, modes or positions, or a lower rank")
    return {"out": stage.out, "objective": cfg.objective, "kind": cfg.kind, "n_params": edit.n_params(),
            "param_share": share, "steps": len(log), "final": log[-1] if log else None}


LOG_COLUMNS = {"kl_base_steered": "KL(base ‖ steered) at planning", "anchor_kl": "anchor KL(RL ‖ steered) at execution",
               "pass_rate": "steered pass rate", "distinct_per_group": "distinct correct per group"}


def learn_table(paths: dict[str, str | Path], window: int = 5) -> list[str]:
    """Markdown lines for docs: per learned edit file (name -> path), its kind, parameters, steps and each
    logged quantity's mean over the first and the last `window` steps of its training log (the
    provenance's `log`; training prompts, 64 samples a step, so windows rather than single steps)."""
    from steering.learned import LearnedEdit

    lines = ["| edit | kind | parameters | steps | " + " | ".join(LOG_COLUMNS.values()) + " |",
             "|---|---|---|---|" + "---|" * len(LOG_COLUMNS)]
    for name, path in paths.items():
        meta = LearnedEdit.load(path).meta
        log = meta["provenance"].get("log") or []
        if len(log) < 2 * window:
            raise ValueError(f"{path} logs {len(log)} steps; the table compares the first and last {window}. Fix: "
                             "a smaller window, or an edit trained by this forksight (its file ships the log)")

        def mean(rows: list[dict], k: str) -> float:
            return sum(r[k] for r in rows) / len(rows)
        cells = [f"{mean(log[:window], k):.3f} -> {mean(log[-window:], k):.3f}" if k in log[0] else "not trained on"
                 for k in LOG_COLUMNS]
        lines.append(f"| {name} | {meta['kind']} | {meta['n_params']:,} | {len(log)} | " + " | ".join(cells) + " |")
    return lines

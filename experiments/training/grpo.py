"""RL: GRPO with optional entropy interventions (the collapsed checkpoints), on the organism or a real model.

Each step: draw `prompts_per_step` training problems, sample `group_size` completions per prompt
with the toolkit's branch sampler (`probe.sampling.sampler`, KV-cached, seeded per step), reward 1 for a
verified answer and 0 otherwise, build a `Rollouts` batch and take `mini_batches` optimizer steps
on it with the loss of `experiments.training.grpo_loss` (see there for GRPO and each intervention's paper
mapping). The sampler and the learner share nothing but that batch.

Outputs under `--out DIR`: the final HF checkpoint, `metrics.json` (held-out evaluation), a
per-step `train_log.jsonl`, HF checkpoints every `save_every` steps under `checkpoints/`, and the
resumable state (`experiments.run_state`). A run resumed from its state continues exactly.

Real models (`lora_rank > 0`): the base (any checkpoint form: directory, `.gguf`, `BASE+ADAPTER`)
stays frozen and a LoRA adapter of that rank on every linear projection is trained with peft; the
run directory then holds the adapter (`adapter_model.safetensors`, a few MB, with
`forksight-adapter.json` naming the base and its fingerprint), never merged weights, and the
resumable state holds only the adapter's parameters. `dtype="bfloat16"` keeps the frozen base in
bfloat16 (the adapter and the optimizer stay float32; log-probs and entropies are float32
computations on bfloat16 logits): about 2x faster on CPUs with avx512_bf16, and not bit-for-bit
reproducible across machines, which float32 runs are on one machine.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.paths import ORGANISMS_DIR
from experiments.run_state import load_state, publish_dir, save_state
from experiments.training.grpo_loss import (
    LossConfig,
    Rollouts,
    group_advantages,
    grpo_loss,
    policy_logprobs,
    regime_advantages,
)
from experiments.training.model import save_checkpoint
from probe.forks import fork_mask
from probe.metrics.evaluate import score_branches
from probe.models.adapters import write_adapter_provenance
from probe.models.checkpoint import CheckpointError, load_causal_lm, parse_dtype
from probe.models.kv_cache import position_ids
from probe.sampling.sampler import Branches, SamplerConfig, sample_branches
from probe.tasks import load_task


@dataclass
class GRPOConfig:
    """An RL run on the organism (the loss itself is configured by `LossConfig`)."""

    base: str = str(ORGANISMS_DIR / "base")
    """The starting checkpoint: a directory, a .gguf file, or BASE+ADAPTER."""
    task: str = "countdown"
    """Task whose training stream is rewarded: "countdown", "wordproblems" or "math:HELDOUT,train=TRAIN[,chat]"."""
    out: str = "runs/rl"
    """Run directory."""
    steps: int = 250
    """RL steps (one rollout batch each)."""
    prompts_per_step: int = 32
    """Training problems per step."""
    group_size: int = 16
    """G: samples per problem."""
    problem_pool: int = 0
    """0 = a fresh stream of training problems; N = cycle through the first N (an overfitting check)."""
    lr: float = 2e-4
    """AdamW learning rate (constant)."""
    std_normalize: bool = False
    """Divide advantages by the group's reward std."""
    mini_batches: int = 2
    """Optimizer steps per rollout batch (rows split into this many mini-batches)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    eval_problems: int = 64
    """Held-out problems in the fixed per-step eval batch."""
    eval_samples: int = 4
    """Samples per problem in the per-step eval batch."""
    final_eval_samples: int = 64
    """Samples per held-out problem in the final metrics.json (0 skips it)."""
    save_every: int = 25
    """Save resumable state and an HF checkpoint every N steps."""
    seed: int = 0
    """Seeds problems, sampling and token selection."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    lora_rank: int = 0
    """0 = train every weight (the organism); r > 0 = train a LoRA adapter of rank r (real models)."""
    lora_alpha: float = 0.0
    """LoRA scaling numerator; 0 = 2 x lora_rank."""
    dtype: str = "float32"
    """float32 (bit-for-bit reproducible) or bfloat16 (the frozen base; LoRA runs only)."""
    max_new_tokens: int = 0
    """Completion budget while training; 0 = the task's."""
    eval_every: int = 1
    """Score the fixed eval batch every N steps (its pass_at_1 goes into those steps' log records)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO needs G >= 2 samples per prompt")
        if self.problem_pool < 0:
            raise ValueError(f"problem_pool={self.problem_pool} must be >= 0 (0 = fresh problems)")
        for name in ("steps", "prompts_per_step", "mini_batches", "save_every", "eval_problems", "eval_samples",
                     "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.prompts_per_step * self.group_size < self.mini_batches:
            raise ValueError("fewer rollout rows than mini_batches; lower mini_batches")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.lora_rank < 0 or self.max_new_tokens < 0:
            raise ValueError(f"lora_rank={self.lora_rank}, max_new_tokens={self.max_new_tokens}: both must be >= 0")
        parse_dtype(self.dtype)
        if self.dtype != "float32" and not self.lora_rank:
            raise ValueError(f"dtype={self.dtype!r} needs lora_rank > 0: full fine-tuning keeps float32 weights "
                             "(bfloat16 master weights lose small updates). Fix: --lora-rank 16, or --dtype float32")


def build_rollouts(branches: Branches, rewards, group_size: int, std_normalize: bool, pad_id: int,
                   advantages=None) -> Rollouts:
    """Prompt (left-padded) + completion per row, with old log-probs/entropies and advantages
    (GRPO's group advantages unless `advantages` is given)."""
    rows, new = branches.tokens.shape
    n = rows // len(branches.prompt_tokens)
    width = max(map(len, branches.prompt_tokens))
    prompt = torch.full((len(branches.prompt_tokens), width), pad_id, dtype=torch.long)
    pmask = torch.zeros_like(prompt)
    for i, p in enumerate(branches.prompt_tokens):
        prompt[i, width - len(p):] = torch.tensor(p)
        pmask[i, width - len(p):] = 1
    dev = branches.tokens.device
    prompt, pmask = prompt.repeat_interleave(n, 0).to(dev), pmask.repeat_interleave(n, 0).to(dev)
    attn = torch.cat([pmask, branches.mask.long()], 1)  # (rows, width + new)
    zeros = torch.zeros(rows, width, device=dev)
    return Rollouts(
        input_ids=torch.cat([prompt, branches.tokens], 1),
        attention_mask=attn,
        position_ids=position_ids(attn),
        answer_mask=torch.cat([torch.zeros_like(pmask, dtype=torch.bool), branches.mask], 1),
        old_logprobs=torch.cat([zeros, branches.logprobs.float()], 1),
        old_entropy=torch.cat([zeros, branches.entropy.float()], 1),
        rewards=rewards.float(),
        advantages=(group_advantages(rewards.float(), group_size, std_normalize) if advantages is None
                    else advantages.float().to(dev)),
    )


def training_problems(task, cfg: GRPOConfig, start: int):
    """Prompt `start`, `start + 1`, ... of the task's training stream (or of the cycled pool)."""
    if cfg.problem_pool:
        pool = task.train_prompts(cfg.seed + 1, cfg.problem_pool)
        return (pool[i % len(pool)] for i in itertools.count(start))

    def stream():
        for i in itertools.count(start, 256):
            yield from task.train_prompts(cfg.seed + 1, 256, start=i)
    return stream()


def _role_means(branches: Branches, roles) -> dict:
    ent, mask = branches.entropy.cpu(), branches.mask.cpu()
    out = {"entropy_mean": ent[mask].mean().item()}
    for name, code in (("planning", 0), ("execution", 1)):
        sel = roles == code
        out[f"{name}_entropy_mean"] = ent[sel].mean().item() if sel.any() else None
    return out


def load_policy(path: str, device: str, task=None, dtype: str = "float32"):
    """The checkpoint to start RL from, validated (against `task`, default Countdown) before any work."""
    try:
        model, tok = load_causal_lm(path, device=device, dtype=dtype)
        (task or load_task("countdown")).check_tokenizer(tok)
    except (CheckpointError, ValueError) as e:
        raise ValueError(f"--base {path!r} cannot start this RL run: {e}") from None
    return model, tok


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _with_lora(model, cfg: GRPOConfig):
    """`model` wrapped by peft with a fresh LoRA adapter on every linear projection it has (float32
    adapter weights; the frozen base keeps its dtype). Adapter init is seeded by `cfg.seed`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("--lora-rank needs peft. Fix: pip install 'forksight[real]'") from None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in names] or sorted(names - {"lm_head"})
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _save_policy(model, tok, cfg: GRPOConfig, dest: Path, step: int) -> None:
    """The run's output at `dest`: an adapter (LoRA runs) or a full checkpoint (the organism)."""
    if not cfg.lora_rank:
        publish_dir(lambda d: save_checkpoint(model, tok, d), dest)
        return
    from experiments.run_state import portable

    def build(d: Path) -> None:
        model.peft_config["default"].base_model_name_or_path = portable(cfg.base, dest)
        model.save_pretrained(str(d))
        (d / "README.md").unlink(missing_ok=True)  # peft's model card: a template naming the local base path
        write_adapter_provenance(d, portable(cfg.base, dest), model.get_base_model(), step=step,
                                 lora_rank=cfg.lora_rank, task=portable(cfg.task, dest), seed=cfg.seed)
    publish_dir(build, dest)


def _sampling_model(model):
    """What the sampler runs: peft injects LoRA layers in place, so the wrapped HF model samples with
    the adapter active (the `PeftModel` wrapper's forward takes **kwargs, which the sampler refuses)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def train_grpo(cfg: GRPOConfig, loss_cfg: LossConfig, stop_after: int | None = None) -> dict:
    """Run (or resume) GRPO; returns the run summary. `stop_after` simulates an interruption."""
    task = load_task(cfg.task)
    model, tok = load_policy(cfg.base, cfg.device, task, dtype=cfg.dtype)
    if cfg.lora_rank:
        model = _with_lora(model, cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    progress = load_state(out, model, opt, trainable_only=bool(cfg.lora_rank)) or {"step": 0, "train_seconds": 0.0}
    start = progress["step"]
    log_path = out / "train_log.jsonl"
    log = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []
    log = [r for r in log if r["step"] < start]
    stream = training_problems(task, cfg, start=start * cfg.prompts_per_step)
    new_tokens = cfg.max_new_tokens or task.max_new_tokens
    eval_prompts = task.heldout_prompts(cfg.eval_problems)
    t0 = time.perf_counter() - progress["train_seconds"]
    c0 = time.process_time() - progress.get("train_cpu_seconds", 0.0)  # CPU time: the run's cost on an idle machine
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"grpo[{loss_cfg.intervention}]"):
        t_step = time.perf_counter()
        record = {"step": step, **_step(model, tok, opt, task, stream, new_tokens, cfg, loss_cfg, step)}
        if step % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["pass_at_1"] = _eval_pass_at_1(_sampling_model(model), tok, task, eval_prompts, new_tokens, cfg)
        record["seconds"] = round(time.perf_counter() - t_step, 1)  # wall time of this step, eval included
        log.append(record)
        done = step + 1
        if done % cfg.save_every == 0 or done == cfg.steps:
            progress["train_seconds"] = time.perf_counter() - t0
            progress["train_cpu_seconds"] = time.process_time() - c0
            save_state(out, done, model, opt, {**progress, "config": asdict(cfg)}, trainable_only=bool(cfg.lora_rank))
            _write_log(log_path, log)
            _save_policy(model, tok, cfg, out / "checkpoints" / f"step-{done:06d}", done)
    train_seconds = time.perf_counter() - t0
    if end < cfg.steps:
        return {"step": end, "stopped_early": True}
    _write_log(log_path, log)
    _save_policy(model, tok, cfg, out, cfg.steps)
    return {"steps": cfg.steps, "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1), "final": log[-1]}


def _step(model, tok, opt, task, stream, new_tokens, cfg: GRPOConfig, loss_cfg: LossConfig, step: int) -> dict:
    prompts = [next(stream) for _ in range(cfg.prompts_per_step)]
    model.eval()
    branches = sample_branches(
        _sampling_model(model), tok, prompts,
        SamplerConfig(n=cfg.group_size, max_new_tokens=new_tokens, temperature=1.0,
                      seed=cfg.seed * 1_000_003 + step, batch_size=len(prompts) * cfg.group_size,
                      device=cfg.device),
    )
    scored = score_branches(branches, prompts, task, tok)
    rewards = scored.correct.to(branches.tokens.device)
    adv = regime_advantages(rewards.float(), cfg.group_size, loss_cfg, cfg.std_normalize, keys=scored.canonical)
    batch = build_rollouts(branches, rewards, cfg.group_size, cfg.std_normalize, tok.pad_token_id, advantages=adv)
    forks = fork_mask(batch.old_entropy, batch.answer_mask, loss_cfg.fork_rho)
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    order = torch.randperm(rewards.numel(), generator=gen).to(rewards.device)
    model.train()
    stats: list[dict] = []
    for rows in order.chunk(cfg.mini_batches):
        mb = batch.select(rows)
        logp, ent = policy_logprobs(model, mb, entropy_grad=loss_cfg.intervention == "entropy-bonus")
        loss, s = grpo_loss(logp, ent, mb, loss_cfg, generator=gen, forks=forks[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        opt.step()
        stats.append(s)
    model.eval()
    mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    return {
        "reward_mean": rewards.float().mean().item(),
        "completion_tokens": branches.mask.sum(1).float().mean().item(),
        "truncated_share": sum(r == "length" for r in branches.finish_reason) / len(branches.finish_reason),
        **_role_means(branches, scored.roles),
        "intervened_frac": mean["intervened_frac"],
        "ratio_clipped_frac": mean["ratio_clipped_frac"],
        "loss": mean["loss"],
    }


def _eval_pass_at_1(model, tok, task, prompts, new_tokens, cfg: GRPOConfig) -> float:
    """Mean correctness on the fixed eval batch (same problems and seed every step)."""
    branches = sample_branches(
        model, tok, prompts,
        SamplerConfig(n=cfg.eval_samples, max_new_tokens=new_tokens, temperature=1.0, seed=cfg.seed,
                      batch_size=len(prompts) * cfg.eval_samples, device=cfg.device),
    )
    return score_branches(branches, prompts, task, tok).correct.float().mean().item()


def _write_log(path: Path, log: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    tmp.replace(path)

"""SFT of the base organism: next-token loss on uniformly sampled valid solutions of its task.

Each training problem comes with one solution drawn uniformly from *all* its valid solutions (and a
random surface order of steps and commutative operands), so the base policy keeps real entropy at
planning tokens: it has genuine alternatives to choose between, which is what RL later collapses.
The task (`--task`) is Countdown (one token per character, the Countdown tokenizer) or the word
problems (`probe.tasks.wordproblems`: every order of computation is a solution; a
character-level text tokenizer, `build_text_tokenizer`, with `--max-positions` of context); any
task with `sft_stream(seed, start)` -> (prompt, answer) pairs can be trained on.
The loss covers answer tokens and `<eos>` only, not the prompt.

Deterministic and resumable: problem `i` of the stream depends only on (seed, i), batch `s` holds
problems `s*B .. s*B+B-1`, there is no dropout, and the model, optimizer and step are saved
atomically (`experiments.run_state`), so an interrupted run resumed from its last save ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from experiments.run_state import load_state, publish_dir, save_state, write_json_atomic
from experiments.training.model import OrganismConfig, build_organism, save_checkpoint
from experiments.training.tokenizer import build_text_tokenizer
from probe.models.checkpoint import resolve_device
from probe.tasks import load_task
from probe.tasks.countdown import Countdown


@dataclass
class SFTConfig:
    """Supervised fine-tuning of the base organism."""

    out: str = "runs/sft"
    """Run directory: the final HF checkpoint, metrics.json and resumable state."""
    task: str = "countdown"
    """Task whose training stream is learned: "countdown" or "wordproblems" (`probe.tasks.load_task`)."""
    depth: int = 4
    """Organism size knob (see OrganismConfig)."""
    max_positions: int = 64
    """Context length of the organism (64 fits Countdown; word problems need ~256)."""
    steps: int = 3500
    """Optimizer steps."""
    batch_size: int = 128
    """Problems per step (one sampled solution each)."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup: int = 100
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    seed: int = 0
    """Seeds the initialisation and the training stream."""
    save_every: int = 500
    """Save resumable state every N steps."""
    eval_samples: int = 64
    """Samples per held-out problem in the final evaluation (0 skips it)."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples={self.eval_samples} must be >= 0")


def encode_batch(
    tokenizer, prompts: list[str], answers: list[str]
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on prompt and padding).

    The sequence is prompt + answer + `<eos>`; the loss is on the answer and `<eos>`.
    """
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    a_ids = tokenizer(answers, add_special_tokens=False).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [p + a + [eos] for p, a in zip(p_ids, a_ids)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(p_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = ids[i, len(p) : len(s)]
    return ids, mask, labels


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_sft(cfg: SFTConfig, task=None, stop_after: int | None = None) -> dict:
    """Train (or resume) the base organism; returns the run summary.

    `stop_after` ends the run early after that many *total* steps without publishing the final
    checkpoint (it simulates an interruption in tests).
    """
    task = task or load_task(cfg.task)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    text = None if isinstance(task, Countdown) else build_text_tokenizer(cfg.max_positions)  # Countdown: its own
    model, tok = build_organism(OrganismConfig(depth=cfg.depth, max_positions=cfg.max_positions), seed=cfg.seed,
                                tokenizer=text)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    progress = load_state(out, model, opt) or {"step": 0, "losses": [], "train_seconds": 0.0}
    start = progress["step"]
    stream = task.sft_stream(cfg.seed, start=start * cfg.batch_size)
    t0 = time.perf_counter() - progress["train_seconds"]
    c0 = time.process_time() - progress.get("train_cpu_seconds", 0.0)  # CPU time: the run's cost on an idle machine
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="sft", unit="step")
    for step in bar:
        prompts, answers = zip(*itertools.islice(stream, cfg.batch_size))
        ids, mask, labels = (t.to(device) for t in encode_batch(tok, list(prompts), list(answers)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress["losses"].append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        if done % cfg.save_every == 0 or done == cfg.steps:
            progress["train_seconds"] = time.perf_counter() - t0
            progress["train_cpu_seconds"] = time.process_time() - c0
            save_state(out, done, model, opt, {**progress, "config": asdict(cfg)})
    bar.close()
    progress["train_seconds"] = time.perf_counter() - t0
    progress["train_cpu_seconds"] = time.process_time() - c0
    if end < cfg.steps:
        return {"step": end, "stopped_early": True, **_loss_summary(progress)}
    model.eval()
    publish_dir(lambda d: save_checkpoint(model.to("cpu"), tok, d), out)
    summary = {
        "steps": cfg.steps,
        "train_seconds": round(progress["train_seconds"], 1),
        "train_cpu_seconds": round(progress["train_cpu_seconds"], 1),
        **_loss_summary(progress),
        "config": asdict(cfg),
    }
    write_json_atomic(out / "train_summary.json", summary, relative_to=out)
    return summary


def _loss_summary(progress: dict) -> dict:
    losses = progress["losses"]
    k = max(1, min(50, len(losses) // 10))
    return {
        "loss_first": sum(losses[:k]) / k if losses else None,
        "loss_last": sum(losses[-k:]) / k if losses else None,
    }

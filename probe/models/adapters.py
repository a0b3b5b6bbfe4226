"""PEFT LoRA adapters as checkpoints: `BASE+ADAPTER`, checked against the base they were trained from.

What it is: parsing the `BASE+ADAPTER` form (`split_adapter_spec`), attaching an adapter directory to
a loaded base model with peft (`attach_adapter`, merged into the weights by default, since a merged
model samples as fast as the base), and the base *fingerprint* that makes "this adapter belongs to
that base" checkable: a sha256 of the base's input-embedding matrix (float32 bytes and shape), written
by `write_adapter_provenance` when forksight saves an adapter (`ADAPTER_PROVENANCE`) and compared on
load. An adapter without that record (trained elsewhere) is checked structurally only: peft's own
errors for missing target modules or mismatched shapes are re-raised naming both sides.

What it is not: a trainer (`experiments.training.grpo` trains adapters with `lora_rank > 0`), or a
merger that writes full weights to disk: an RL run on a real model ships as its adapter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

ADAPTER_PROVENANCE = "forksight-adapter.json"
"""The file in an adapter directory that names its base (spec, fingerprint) and how it was trained."""


class AdapterError(ValueError):
    """An adapter directory that is missing, malformed, or trained from another base."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def split_adapter_spec(spec: str | Path) -> tuple[str, str | None]:
    """`"BASE+ADAPTER"` -> (BASE, ADAPTER); a spec that names an existing path, or has no `+`, is a
    plain checkpoint: (spec, None). The split is at the last `+`, so BASE may itself contain one."""
    s = str(spec)
    if Path(s).exists() or "+" not in s:
        return s, None
    base, adapter = s.rsplit("+", 1)
    if not base or not adapter:
        raise AdapterError(f"checkpoint {s!r}: BASE+ADAPTER needs both parts. Fix: e.g. "
                           "--rl experiments/real/base.gguf+experiments/real/rl-none")
    return base, adapter


def base_fingerprint(model) -> str:
    """sha256 (first 16 hex digits) of the model's input-embedding matrix rounded to bfloat16 (as
    float32 bytes) plus its shape: equal for the same base loaded in float32 or bfloat16, different
    for another base."""
    w = model.get_input_embeddings().weight.detach().to("cpu", torch.bfloat16).to(torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


def write_adapter_provenance(adapter_dir: str | Path, base_spec: str, base_model, **extra) -> None:
    """Record which base an adapter was trained from (its spec as given and its fingerprint)."""
    record = {"base": base_spec, "base_fingerprint": base_fingerprint(base_model), **extra}
    (Path(adapter_dir) / ADAPTER_PROVENANCE).write_text(json.dumps(record, indent=2, default=str))


def adapter_provenance(adapter_dir: str | Path) -> dict | None:
    f = Path(adapter_dir) / ADAPTER_PROVENANCE
    return json.loads(f.read_text()) if f.is_file() else None


def attach_adapter(model, adapter_dir: str | Path, base_name: str, merge: bool = True):
    """`model` (the loaded base) with the LoRA adapter in `adapter_dir` applied.

    merge: True returns a plain model with the adapter merged into its weights (peft's
    `merge_and_unload`); False returns the `PeftModel` (adapter kept separate, e.g. to train on).
    Raises `AdapterError` naming both sides when the adapter was recorded as trained from another
    base or does not fit this architecture, `ImportError` naming the extra when peft is missing.
    """
    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise AdapterError(f"adapter {str(adapter_dir)!r} is not a PEFT adapter directory (no adapter_config.json). "
                           "Fix: name a directory written by peft's save_pretrained, as BASE+ADAPTER")
    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError("loading BASE+ADAPTER needs the `peft` package. Fix: pip install 'forksight[real]' "
                          "(or pip install peft)") from None
    record = adapter_provenance(adapter_dir)
    if record and record.get("base_fingerprint"):
        got = base_fingerprint(model)
        if got != record["base_fingerprint"]:
            raise AdapterError(
                f"adapter {adapter_dir} was trained from base {record.get('base')!r} (fingerprint "
                f"{record['base_fingerprint']}), but the given base {base_name!r} has fingerprint {got}: different "
                "weights. Fix: pass the base the adapter was trained from as BASE in BASE+ADAPTER")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=not merge)
    except (ValueError, RuntimeError, KeyError) as e:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        arch = (model.config.architectures or [type(model).__name__])[0]
        raise AdapterError(
            f"adapter {adapter_dir} (trained from {cfg.get('base_model_name_or_path')!r}, targets "
            f"{cfg.get('target_modules')}) does not fit base {base_name!r} ({arch}): {type(e).__name__}: "
            f"{str(e)[:300]}. Fix: pass the base the adapter was trained from") from None
    return peft_model.merge_and_unload() if merge else peft_model

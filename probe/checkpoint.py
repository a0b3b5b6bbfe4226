"""Loading Hugging Face causal-LM checkpoints from local directories, safely and offline.

What it is: the one place that turns a directory into `(model, tokenizer)`. It validates the
directory before any work (exists, has `config.json`, has safetensors weights, no pickle-only
weights, weights readable), never passes `trust_remote_code=True` unless asked, and resolves
`device="auto"` to CUDA when present. What it is not: hooking (see `probe.backends`), or anything
task-specific.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or in an unsafe format."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else is passed to `torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def validate_checkpoint(path: str | Path) -> Path:
    """Check that `path` is a loadable HF checkpoint directory with safetensors weights.

    Raises `CheckpointError` naming the problem and the fix: missing directory, missing or corrupt
    `config.json`, pickle-only weights (`pytorch_model.bin` and friends), unreadable safetensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist (or is not a directory)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(
            f"{path} has no config.json: not a Hugging Face checkpoint directory "
            "(save one with model.save_pretrained(dir))"
        )
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is corrupt (not JSON: {e})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{path} holds pickle weights {pickles} but no safetensors. Pickle files can run "
                "arbitrary code when loaded, so forksight refuses them: convert once in a trusted "
                "environment with model.save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{path} has no *.safetensors weights file")
    for w in weights:
        if w.name.endswith(".index.json"):
            continue
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{w} is not a valid safetensors file ({e}); it may be truncated or a pickle file "
                "renamed to .safetensors: re-save the checkpoint"
            ) from None
    return path


def load_causal_lm(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = torch.float32,
    trust_remote_code: bool = False,
):
    """Load `(model, tokenizer)` from a local directory, in eval mode, on `device`.

    The tokenizer is loaded as the class recorded in `tokenizer_config.json` (for forksight's
    organisms, `PreTrainedTokenizerFast`; see `experiments.organism.tokenizer` for the trap this avoids).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = validate_checkpoint(path)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model.to(dev).eval(), tokenizer


def save_safetensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` (made contiguous, on the CPU) with a string `metadata` header to `path`
    via a temporary file and `os.replace`, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path

"""Loading Hugging Face causal-LM checkpoints, safely and offline, in any of three forms.

What it is: the one place that turns a checkpoint spec into `(model, tokenizer)`. A spec is
- a directory: validated before any work (exists, has `config.json`, has safetensors weights, no
  pickle-only weights, weights readable);
- a `.gguf` file: dequantised through transformers once and cached as a directory (`probe.models.gguf`);
- `BASE+ADAPTER`: BASE in either form above plus a PEFT LoRA directory trained from it
  (`probe.models.adapters`), merged into the weights unless the caller keeps it separate.
`checkpoint_provenance(spec)` describes any of them for outputs (source file and sha256,
dequantisation, adapter base). `trust_remote_code=True` is never passed unless asked, and
`device="auto"` resolves to CUDA when present; `dtype` picks float32 (the default, bit-for-bit
reproducible) or bfloat16 (fast where the hardware has it). What it is not: hooking (see
`probe.models.backends`), or anything task-specific.
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The precisions a command accepts by name (`--dtype`)."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """"float32" / "bfloat16" (or a torch dtype among them; None = float32) -> torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}. Fix: --dtype float32 "
                     "(bit-for-bit reproducible) or --dtype bfloat16 (about 2x faster on CPUs with avx512_bf16 and on GPUs)")


def resolve_checkpoint(spec: str | Path) -> Path:
    """The local directory behind a plain spec (a directory, or a `.gguf` file converted once)."""
    from probe.models.gguf import gguf_to_directory, is_gguf

    return gguf_to_directory(spec) if is_gguf(spec) else validate_checkpoint(spec)


def load_causal_lm(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = torch.float32,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
):
    """Load `(model, tokenizer)` from a checkpoint spec (directory, `.gguf`, `BASE+ADAPTER`), in eval
    mode, on `device`, in `dtype` ("float32" or "bfloat16").

    merge_adapter: for `BASE+ADAPTER`, True merges the LoRA weights (a plain model, fastest);
    False returns the `PeftModel` (adapter separate, trainable). The tokenizer is loaded as the
    class recorded in `tokenizer_config.json` (for forksight's organisms, `PreTrainedTokenizerFast`;
    see `experiments.training.tokenizer` for the trap this avoids); for a GGUF file, from the file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probe.models.adapters import attach_adapter, split_adapter_spec

    base_spec, adapter = split_adapter_spec(path)
    directory = resolve_checkpoint(base_spec)
    dev = resolve_device(device)
    want = parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32 if adapter else want, trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if adapter:  # merge in float32, then cast: the merged weights do not depend on the target dtype
        model = attach_adapter(model, adapter, base_name=str(base_spec), merge=merge_adapter).to(want)
    return model.to(dev).eval(), tokenizer


def checkpoint_config(spec: str | Path) -> dict:
    """The model config (`config.json` as a dict) behind any checkpoint spec, without loading weights."""
    from probe.models.adapters import split_adapter_spec

    return json.loads((resolve_checkpoint(split_adapter_spec(spec)[0]) / "config.json").read_text())


def own_directory(spec: str | Path) -> Path:
    """The directory holding a checkpoint's own files (its training log, metrics): the adapter's for
    `BASE+ADAPTER`, the directory itself, or a `.gguf` file's folder."""
    from probe.models.adapters import split_adapter_spec
    from probe.models.gguf import is_gguf

    base, adapter = split_adapter_spec(spec)
    if adapter:
        return Path(adapter)
    return Path(base).parent if is_gguf(base) else Path(base)


def checkpoint_present(spec: str | Path) -> bool:
    """Whether every path a checkpoint spec names exists (a directory, a `.gguf` file, or both parts
    of `BASE+ADAPTER`); no loading, no validation of the contents."""
    from probe.models.adapters import split_adapter_spec

    base, adapter = split_adapter_spec(spec)
    return Path(base).exists() and (adapter is None or Path(adapter).is_dir())


def checkpoint_provenance(spec: str | Path) -> dict:
    """What a checkpoint spec names, for outputs: its form, and for a GGUF its source file, sha256
    and dequantisation; for `BASE+ADAPTER` the adapter's recorded base and training record."""
    from probe.models.adapters import adapter_provenance, split_adapter_spec
    from probe.models.gguf import gguf_provenance, gguf_to_directory, is_gguf

    base_spec, adapter = split_adapter_spec(spec)
    if is_gguf(base_spec):
        out = {"form": "gguf", "gguf": gguf_provenance(gguf_to_directory(base_spec))}
    else:
        out = {"form": "directory", "gguf": gguf_provenance(base_spec) if Path(base_spec).is_dir() else None}
    if adapter:
        out = {"form": "adapter", "base": out, "adapter": adapter_provenance(adapter)}
    return out


def weights_digest(spec: str | Path) -> dict[str, str]:
    """sha256 of every weight file a checkpoint spec loads (file name -> hex digest): a directory's
    `*.safetensors`, a `.gguf` file, and for `BASE+ADAPTER` both sides. Caches key on it, so a
    checkpoint retrained in place is never mistaken for the one evaluated before."""
    from probe.models.adapters import split_adapter_spec
    from probe.models.gguf import sha256_file

    base, adapter = split_adapter_spec(spec)
    out = {}
    for side in (base, adapter):
        if side is None:
            continue
        side = Path(side)
        files = [side] if side.is_file() else sorted(side.glob("*.safetensors"))
        out.update({str(f): sha256_file(f) for f in files})
    return out


def save_safetensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` (made contiguous, on the CPU) with a string `metadata` header to `path`
    via a temporary file and `os.replace`, so a reader never sees a half-written file. The header
    also records the software environment (`probe.environment`, key "environment", JSON) unless
    `metadata` brings its own."""
    from probe.environment import KEY, environment

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {KEY: json.dumps(environment()), **metadata}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path

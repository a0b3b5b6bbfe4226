"""SAE-feature interventions: set a few SAE features of the RL model's residual, where a gate says so.

What it is:
- `FeatureDictionary`: the rows of an SAE needed to read and write a few features (its hook site,
  the feature ids, their encoder rows and biases, `b_dec`, their decoder rows), self-contained so
  it can be saved inside an intervention file (`tensors` / `metadata` / `from_tensors`, or `save` /
  `load`). `acts(h)` reads the features, `delta(h, new_acts)` is the change of the residual that
  moves them to `new_acts`: (new_acts - acts(h)) @ W_dec (times the SAE's output normalisation),
  so the SAE's reconstruction error and every other feature's contribution are kept. Both are pure,
  differentiable functions of tensors (a learned kind can train per-feature gains / offsets
  through them). Built with `FeatureDictionary.from_sae(sae, features)`, which folds sae-lens's
  encode exactly (`apply_b_dec_to_input`, `rescale_acts_by_decoder_norm`, the runtime
  normalisations `constant_norm_rescale` / `layer_norm`) and checks the result numerically
  against the SAE's own `hook_sae_acts_pre`.
- `SAEFeatureEdit`, a `steering.apply.Steering`: at the decision positions its gate selects
  (`always`, `entropy`, `detector`, ...; see `steering.gates`), it moves the features to targets:
  `clamp` a'_f = max(a_f, coef * t_f) (t = a floor, e.g. the base model's mean activation at forks),
  `add` a'_f = a_f + coef * t_f, `scale` a'_f = t_f ** coef * a_f (t = the base / RL ratio, capped).
  coef = 0 is the identity in every mode. `fire_threshold` makes the edit conditional on context:
  a feature is edited only where its pre-activation in the RL model exceeds the threshold (the
  feature is "about to fire"), per feature. Attention sinks (`probe.sae.sinks`), which the SAE
  never saw, keep their activation: positions whose norm exceeds `sink_threshold` (the one the
  SAE's training measured: `sinks_left_out` in the SAE stage's `train_state.json`), or 10x this
  forward's median norm when it is None.
- `diff_targets` (t from a fork feature diff: `probe.sae.features`, e.g. the `pruned` records of
  `forksight sae diff`'s metrics.json), `decoder_directions` / `resid_norm_targets` (decoder
  directions at `resid_norm` normalisation, through `steering.derive`, so that one coefficient
  means a fraction of the mean residual norm, as for the other steering methods).

Departure from sae-lens (documented, deliberate): `acts` is the feature's ReLU pre-activation
(after the decoder-norm rescaling of TopK), not sae-lens's activation. For a ReLU SAE they are
equal; for TopK (and JumpReLU) they agree wherever sae-lens's activation is non-zero, and where the
feature did not make the top k (or the threshold) `acts` is the strength it would have had. The
features RL pruned are exactly the ones that lose the top-k race in the RL model, so reading
them through the top-k would see 0 and treat the residual as carrying nothing of them; the
pre-activation reads how much of the feature's encoder direction is there. Consequence: an edit
to a' changes the residual by (a' - pre) * d_f, not by (a' - 0) * d_f.

What it is not: SAE training or splicing (`probe.sae.dictionary`, `probe.sae.quality`), feature ranking
(`probe.sae.features`), or a cross-model method (it runs the RL model alone; the diff's statistics
are fixed numbers taken once).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError, safe_open
from torch import Tensor

from probe.models.checkpoint import save_safetensors_atomic
from probe.sae.sinks import sink_mask
from steering.apply import Steering
from steering.derive import normalise, sae_decoder_direction
from steering.vectors import model_dims

FORMAT, VERSION = "forksight.feature_dictionary", 1
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")
MODES = ("clamp", "add", "scale")


class FeatureDictionaryError(ValueError):
    """An SAE or a dictionary that cannot serve an edit (architecture, site, width, file)."""


@dataclass
class FeatureDictionary:
    """The rows of an SAE needed to read and write `features` at `hook_name` (see the module docstring).

    Encoder and decoder rows are stored with TopK's decoder-norm rescaling folded in (encoder rows
    times ||W_dec_f||, decoder rows unit), so acts = relu(((norm_in(h) - b_dec) @ W_enc.T + b_enc))
    and a change of activations da moves the residual by norm_out(da @ W_dec)."""

    hook_name: str
    features: list[int]
    W_enc: Float[Tensor, "F d"]
    b_enc: Float[Tensor, " F"]
    b_dec: Float[Tensor, " d"]
    W_dec: Float[Tensor, "F d"]
    apply_b_dec_to_input: bool = True
    normalize: str = "none"
    """sae-lens's runtime normalisation: "none", "constant_norm_rescale" or "layer_norm"."""
    meta: dict = field(default_factory=dict)
    """Provenance: architecture, d_sae, k, the original decoder norms, the SAE's metadata."""

    def __post_init__(self) -> None:
        F, d = len(self.features), self.b_dec.shape[-1]
        shapes = {"W_enc": (F, d), "b_enc": (F,), "b_dec": (d,), "W_dec": (F, d)}
        bad = {k: tuple(getattr(self, k).shape) for k, s in shapes.items() if tuple(getattr(self, k).shape) != s}
        if bad:
            raise FeatureDictionaryError(f"{F} features of width {d} need shapes {shapes}; got {bad}")
        if self.normalize not in NORMALISATIONS:
            raise FeatureDictionaryError(f"normalize={self.normalize!r}: allowed {NORMALISATIONS}")

    @property
    def d_in(self) -> int:
        return int(self.b_dec.shape[-1])

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_sae(cls, sae: Any, features: Sequence[int], hook_name: str | None = None) -> FeatureDictionary:
        """The rows of `features` of an sae-lens SAE (standard, TopK or JumpReLU; residual-shaped),
        checked against the SAE's own pre-activation on random inputs (`FeatureDictionaryError`)."""
        cfg = sae.cfg
        arch = cfg.architecture()
        if arch not in ARCHITECTURES:
            raise FeatureDictionaryError(f"SAE architecture {arch!r} is not supported: allowed {ARCHITECTURES} "
                                         "(their pre-activation is (x - b_dec) @ W_enc + b_enc). Fix: use one of those.")
        if cfg.reshape_activations != "none":
            raise FeatureDictionaryError(f"reshape_activations={cfg.reshape_activations!r}: allowed 'none' "
                                         "(an SAE on a residual-shaped site)")
        norm = {"expected_average_only_in": "none"}.get(cfg.normalize_activations, cfg.normalize_activations)
        if norm not in NORMALISATIONS:  # sae-lens's inference SAE folds "expected_average_only_in" (identity)
            raise FeatureDictionaryError(f"normalize_activations={cfg.normalize_activations!r}: allowed "
                                         f"{NORMALISATIONS + ('expected_average_only_in',)}. Fix: fold it into the weights.")
        name = hook_name or getattr(cfg.metadata, "hook_name", None)
        if not name:
            raise FeatureDictionaryError("the SAE's metadata has no hook_name. Fix: pass hook_name='blocks.{L}."
                                         "hook_resid_post' (the site it was trained on).")
        feats = [int(f) for f in features]
        if any(not 0 <= f < cfg.d_sae for f in feats) or len(set(feats)) != len(feats):
            raise FeatureDictionaryError(f"features {feats} must be distinct ids in [0, {cfg.d_sae})")
        idx = torch.tensor(feats, dtype=torch.long)
        with torch.no_grad():
            W_dec = sae.W_dec.detach().float().cpu()[idx]  # [F, d]
            rescale = bool(getattr(cfg, "rescale_acts_by_decoder_norm", False))
            dn = W_dec.norm(dim=-1)  # [F]
            s = dn if rescale else torch.ones_like(dn)
            out = cls(name, feats, sae.W_enc.detach().float().cpu()[:, idx].T * s[:, None],
                      sae.b_enc.detach().float().cpu()[idx] * s, sae.b_dec.detach().float().cpu().clone(),
                      W_dec / s[:, None], bool(cfg.apply_b_dec_to_input), norm,
                      {"architecture": arch, "d_sae": int(cfg.d_sae), "k": getattr(cfg, "k", None),
                       "rescale_acts_by_decoder_norm": rescale, "decoder_norm": dn.tolist(),
                       "sae_metadata": {k: str(v) for k, v in vars(cfg.metadata).items() if v is not None}})
        out._check_against(sae, s)
        return out

    def _check_against(self, sae: Any, s: Tensor, n: int = 64) -> None:
        if not self.features:
            return
        g = torch.Generator().manual_seed(0)
        x = (self.b_dec + torch.randn(n, self.d_in, generator=g) * self.b_dec.norm().clamp_min(1.0)).to(sae.device, sae.dtype)
        seen = []
        h = sae.hook_sae_acts_pre.register_forward_hook(lambda m, a, o: seen.append(o.detach().float().cpu()))
        try:
            with torch.no_grad():
                sae.encode(x)
        finally:
            h.remove()
        want = seen[-1][:, self.features] * s  # [n, F] sae-lens's pre-activation, rescaled as TopK does
        got = self.pre(x.float().cpu())
        if not torch.allclose(got, want, atol=1e-4 * want.abs().max().clamp_min(1.0).item(), rtol=1e-4):
            raise FeatureDictionaryError(f"the folded rows disagree with the SAE's pre-activation (max error "
                                         f"{(got - want).abs().max():.3g}): this sae-lens version encodes differently "
                                         "than FeatureDictionary assumes. Fix: report it with the SAE's cfg.")

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> FeatureDictionary:
        """A copy with every tensor on `device` / in `dtype`."""
        mv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, W_enc=mv(self.W_enc), b_enc=mv(self.b_enc), b_dec=mv(self.b_dec), W_dec=mv(self.W_dec))

    # --- the math (pure functions of tensors) ---------------------------------------------------
    def _norm_in(self, h: Float[Tensor, "*b d"]) -> tuple[Tensor, Tensor]:
        """(normalised input, the factor the decoder's output is multiplied by)."""
        if self.normalize == "constant_norm_rescale":
            c = self.d_in ** 0.5 / h.norm(dim=-1, keepdim=True)  # [*b, 1]
            return h * c, 1 / c
        if self.normalize == "layer_norm":
            mu = h.mean(-1, keepdim=True)
            std = (h - mu).std(dim=-1, keepdim=True)  # sae-lens: unbiased, eps 1e-5 in, none out
            return (h - mu) / (std + 1e-5), std
        return h, torch.ones((), dtype=h.dtype, device=h.device)

    def pre(self, h: Float[Tensor, "*b d"]) -> Float[Tensor, "*b F"]:
        """The features' pre-activations (TopK's decoder-norm rescaling included), before the ReLU."""
        x, _ = self._norm_in(h)
        return (x - self.b_dec * self.apply_b_dec_to_input) @ self.W_enc.T + self.b_enc

    def acts(self, h: Float[Tensor, "*b d"]) -> Float[Tensor, "*b F"]:
        """relu(pre(h)): sae-lens's activation where it is non-zero (see the module docstring)."""
        return self.pre(h).relu()

    def delta(self, h: Float[Tensor, "*b d"], new_acts: Float[Tensor, "*b F"]) -> Float[Tensor, "*b d"]:
        """The residual change that moves the features from acts(h) to `new_acts`, nothing else."""
        _, out_scale = self._norm_in(h)
        return ((new_acts - self.acts(h)) @ self.W_dec) * out_scale

    # --- checks ---------------------------------------------------------------------------------
    def check_site(self, name: str) -> None:
        """Raise unless the edit acts at the site the SAE reads."""
        if name != self.hook_name:
            raise FeatureDictionaryError(
                f"the SAE reads {self.hook_name}; the edit acts at {name}. An SAE's features mean nothing at "
                f"another site. Fix: act at site={self.hook_name!r}, or use an SAE trained on {name}.")

    def check_model(self, model: Any) -> None:
        d_model, n_layers, _ = model_dims(model)
        if d_model != self.d_in:
            raise FeatureDictionaryError(f"the SAE reads d_in={self.d_in}; the model has d_model={d_model}. "
                                         "Fix: use an SAE trained on this model.")

    # --- files ----------------------------------------------------------------------------------
    def tensors(self, prefix: str = "sae.") -> dict[str, Tensor]:
        return {prefix + k: getattr(self, k).detach().float().cpu().contiguous() for k in ("W_enc", "b_enc", "b_dec", "W_dec")}

    def metadata(self) -> dict:
        return {"hook_name": self.hook_name, "features": self.features, "apply_b_dec_to_input": self.apply_b_dec_to_input,
                "normalize": self.normalize, "meta": self.meta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict, prefix: str = "sae.") -> FeatureDictionary:
        t = {k: tensors[prefix + k] for k in ("W_enc", "b_enc", "b_dec", "W_dec")}
        return cls(metadata["hook_name"], [int(f) for f in metadata["features"]], **t,
                   apply_b_dec_to_input=bool(metadata["apply_b_dec_to_input"]), normalize=metadata["normalize"],
                   meta=dict(metadata.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        return save_safetensors_atomic(path, self.tensors(), {"format": FORMAT, "version": str(VERSION),
                                                              "meta": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | Path) -> FeatureDictionary:
        try:
            with safe_open(str(path), framework="pt") as f:
                header, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise FeatureDictionaryError(f"{path} is not a readable safetensors file ({e})") from e
        if header.get("format") != FORMAT or header.get("version") != str(VERSION):
            raise FeatureDictionaryError(f"{path} is not a feature dictionary of version {VERSION}. Fix: write it "
                                         "with FeatureDictionary.save.")
        return cls.from_tensors(tensors, json.loads(header["meta"]))


def new_acts(a: Float[Tensor, "*b F"], mode: str, targets: Float[Tensor, "*b F"], coef: float = 1.0
             ) -> Float[Tensor, "*b F"]:
    """The edited activations (module docstring): clamp max(a, coef t), add a + coef t, scale t**coef a."""
    if mode == "clamp":
        return torch.maximum(a, coef * targets)
    if mode == "add":
        return a + coef * targets
    if mode == "scale":
        return targets.pow(coef) * a
    raise ValueError(f"mode={mode!r}: allowed {MODES}")


def diff_targets(records: Sequence[dict], mode: str, cap: float = 4.0) -> tuple[list[int], Float[Tensor, " F"]]:
    """(features, t) from fork-diff records (`feature`, `mean_base`, `mean_rl`, as in the `pruned`
    list of `forksight sae diff`): clamp / add t = mean_base (mean over base forks, zeros included);
    scale t = min(cap, mean_base / mean_rl) (the ratio of the mean activations: frequency times
    size; `cap` where the RL mean is 0)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {MODES}")
    if not cap >= 1:
        raise ValueError(f"cap={cap!r} must be >= 1 (a ratio that can only restore)")
    feats = [int(r["feature"]) for r in records]
    mb = torch.tensor([float(r["mean_base"]) for r in records])
    if mode != "scale":
        return feats, mb
    mr = torch.tensor([float(r["mean_rl"]) for r in records])
    return feats, torch.where(mr > 0, mb / mr.clamp_min(1e-30), torch.tensor(float(cap))).clamp(1.0, cap)


def decoder_directions(dictionary: FeatureDictionary, ref_norm: float, weights: Sequence[float] | None = None,
                       combine: bool = False) -> Float[Tensor, "*F d"]:
    """The features' decoder directions at `resid_norm` normalisation (unit times `ref_norm`, the
    mean residual norm at the site): one row per feature, or (`combine`) their weighted sum."""
    if combine:
        return normalise(sae_decoder_direction(dictionary.W_dec, range(len(dictionary.features)), weights),
                         "resid_norm", ref_norm)
    return normalise(dictionary.W_dec.detach().float().cpu(), "resid_norm", ref_norm)


def resid_norm_targets(dictionary: FeatureDictionary, ref_norm: float) -> Float[Tensor, " F"]:
    """Per-feature activation offsets t with ||t_f W_dec_f|| = ref_norm, so `mode="add"` with these
    targets adds coef * `decoder_directions(...)` (normalisation "none" SAEs; a runtime
    normalisation rescales the output per position)."""
    dirs, W = decoder_directions(dictionary, ref_norm), dictionary.W_dec.detach().float().cpu()
    return (dirs * W).sum(-1) / W.pow(2).sum(-1).clamp_min(1e-30)


class SAEFeatureEdit(Steering):
    """Moves `dictionary`'s features to `targets` (`mode`, `coef`) at the gated decision positions,
    optionally only where a feature's pre-activation exceeds `fire_threshold` (float or [F]),
    never at attention sinks (norm above `sink_threshold`; None: 10x this forward's median norm)."""

    def __init__(self, model: Any, dictionary: FeatureDictionary, mode: str = "clamp",
                 targets: Sequence[float] | Tensor | None = None, coef: float = 1.0, *,
                 fire_threshold: float | Sequence[float] | Tensor | None = None, site: str | None = None,
                 sink_threshold: float | None = None, **kwargs: Any):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: allowed {MODES}. Fix: e.g. mode='clamp' with the base "
                             "model's mean activations (diff_targets).")
        dictionary.check_site(site or dictionary.hook_name)
        dictionary.check_model(model)
        F = len(dictionary.features)
        t = torch.zeros(F) if targets is None else torch.as_tensor(targets, dtype=torch.float32).flatten()
        if t.shape != (F,) or not torch.isfinite(t).all():
            raise ValueError(f"targets has shape {tuple(t.shape)}; expected one finite value per feature ({F})")
        if mode == "scale" and (t < 0).any():
            raise ValueError("mode='scale' needs ratios >= 0 (a negative one flips a feature)")
        thr = None if fire_threshold is None else torch.as_tensor(fire_threshold, dtype=torch.float32).flatten()
        if thr is not None and thr.numel() not in (1, F):
            raise ValueError(f"fire_threshold has {thr.numel()} values; give one, or one per feature ({F})")
        if sink_threshold is not None and not sink_threshold > 0:
            raise ValueError(f"sink_threshold={sink_threshold!r}: give a positive activation norm (the SAE "
                             "training's sinks_left_out.sink_threshold), or None for 10x each forward's median")
        super().__init__(model, [dictionary.hook_name], **kwargs)
        self.dictionary, self.mode, self.targets_, self.coef = dictionary, mode, t, float(coef)
        self.fire_threshold, self.trace_coef = thr, float(coef)
        self.sink_threshold = sink_threshold
        self._dev: dict[tuple, tuple] = {}

    def _on(self, like: Tensor) -> tuple[FeatureDictionary, Tensor, Tensor | None]:
        k = (like.device,)
        if k not in self._dev:
            thr = None if self.fire_threshold is None else self.fire_threshold.to(like.device)
            self._dev[k] = (self.dictionary.to(like.device, torch.float32), self.targets_.to(like.device), thr)
        return self._dev[k]

    def edit(self, name: str, x: Float[Tensor, "batch seq d_model"],
             mask: Bool[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d_model"]:
        mask = mask & ~sink_mask(x, self.sink_threshold)[0]  # attention sinks, which the SAE never saw, keep theirs
        if not self.dictionary.features or not mask.any():
            return x
        d, t, thr = self._on(x)
        h = x.float()
        pre = d.pre(h)  # [b, s, F]
        a = pre.relu()
        new = new_acts(a, self.mode, t, self.coef)
        if thr is not None:  # only where the feature is about to fire in this context
            new = torch.where(pre > thr, new, a)
        return torch.where(mask[..., None], (h + d.delta(h, new)).to(x.dtype), x)

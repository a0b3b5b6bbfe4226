"""Learned interventions: a few parameters added to the frozen RL model's residual stream.

What it is: `LearnedEdit`, a small `torch.nn.Module` holding the parameters of an edit at one
named site per chosen layer (`blocks.{L}.hook_resid_post` by default), and `LearnedSteering`, the
`steering.apply.Steering` that applies it, inside `probe.sampling.sampler.sample_branches` (batched,
KV-cached, gated like every other intervention) or around any forward pass, with gradients
flowing into the parameters when they are enabled (that is how `steering.learn` trains them).
Saved as one safetensors file with the parameters, the provenance (objective, steps, seed, data,
parameter count) and the settings to apply it with (`recommended`).

Kinds (the delta added to the residual h at a steered position, per layer):
- `vector`: one vector v: h + v (the learned twin of a difference of means).
- `position`: one vector per *answer position* of the token being decided (the last bucket pools
  all later positions) plus one for the other prompt tokens (`prompt` bucket): h + v[bucket].
- `mode`: K vectors, and sample j of each prompt uses vector j mod K (`n_modes`) at every position
  (its prompt tokens too: each mode gets its own prefill through the sampler's `prefill_groups`):
  the samples of one prompt are pushed in K different directions, so a breadth objective can
  make each mode a different branch. Samples are then stratified by mode, not exchangeable.
- `sae`: per-feature gains and offsets of a few SAE features (a `steering.sae_edit.FeatureDictionary`,
  e.g. the features RL pruned at forks) at the SAE's site: a'_f = a_f (1 + g_f) + o_f[bucket], the
  residual moved by (a' - a) @ W_dec (reconstruction error kept), offsets per answer-position
  bucket as in `position`. Interpretable feature by feature; the dictionary's rows ship inside
  the file (buffers), so it needs no SAE directory to apply.
- `lowrank`: a rank-r affine edit of the residual in the LoReFT form, h + U (V h + c) with
  U `[d_model, r]`, V `[r, d_model]`, c `[r]` (r <= 4). Departure from LoReFT (arXiv:2404.03592):
  U is not constrained to orthonormal columns and V is not tied to U, so this is the plain
  low-rank affine edit; it reads the token's own residual, so it can act differently in
  different contexts, which a vector cannot.

Buckets: positions are labelled by the token they decide. In the sampler, the last prompt
position decides answer token 0 and generated token t decides token t + 1; the other prompt
positions get the `prompt` bucket (steered only with `where="all"`). In a plain forward there is
no sampler state: pass the buckets with `LearnedSteering.positions(buckets)` (teacher forcing;
`answer_buckets` computes them for right-padded prompt + completion rows); a `vector` edit needs
none. Parameters are float32; the delta is cast to the activation's dtype.

What it is not: the training loop (`steering.learn`) or an adapter of the model's weights (the
RL model stays frozen; only these parameters change).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from probe.models.checkpoint import save_safetensors_atomic
from probe.models.hooks import site_name
from probe.sae.sinks import sink_mask
from probe.sampling.vllm_hooks import StreamEdit, VLLMInterventionError, stream_edit
from steering.apply import Steering, SteeringError
from steering.sae_edit import FeatureDictionary
from steering.vectors import model_dims

FORMAT = "forksight.learned_edit"
VERSION = 1
KINDS = ("vector", "position", "mode", "sae", "lowrank")
MAX_RANK = 4


class LearnedEditError(ValueError):
    """A learned edit that is malformed, unreadable, or does not fit the model it is applied to."""


class LearnedEdit(nn.Module):
    """Parameters of an edit at `site` for each of `layers`; see the module docstring."""

    def __init__(self, d_model: int, layers: list[int], kind: str = "vector", *, n_positions: int = 8,
                 rank: int = 4, n_modes: int = 4, site: str = "blocks.{L}.hook_resid_post", init_scale: float = 0.0,
                 seed: int = 0, dictionary: FeatureDictionary | None = None):
        super().__init__()
        if kind == "sae":
            if dictionary is None:
                raise LearnedEditError("kind='sae' needs dictionary= (a steering.sae_edit.FeatureDictionary)")
            site, layer = _site_and_layer(dictionary.hook_name)
            if [int(x) for x in layers] not in ([], [layer]):
                raise LearnedEditError(f"the SAE reads {dictionary.hook_name}; layers={list(layers)} must be [{layer}]")
            layers = [layer]
        layers = sorted({int(x) for x in layers})
        if kind not in KINDS:
            raise LearnedEditError(f"kind={kind!r} is invalid; allowed {KINDS}. Fix: use 'vector' (one vector per "
                                   "layer), 'position' (one per answer position) or 'lowrank'.")
        if not layers or min(layers) < 0:
            raise LearnedEditError(f"layers={layers} must be a non-empty list of block indices >= 0")
        if kind == "lowrank" and not 1 <= rank <= MAX_RANK:
            raise LearnedEditError(f"rank={rank} is outside 1..{MAX_RANK}; a low-rank edit keeps rank <= {MAX_RANK}")
        if n_positions < 1 or n_modes < 1:
            raise LearnedEditError(f"n_positions={n_positions}, n_modes={n_modes}: both must be >= 1")
        self.d_model, self.layers, self.kind, self.site = int(d_model), layers, kind, site
        self.n_positions, self.rank, self.n_modes = int(n_positions), int(rank), int(n_modes)
        g = torch.Generator().manual_seed(seed)
        rows = {"vector": 1, "position": self.n_positions + 1, "mode": self.n_modes}.get(kind, 0)
        self.dictionary = dictionary
        self.sink_thresholds: dict[str, float] = {}
        """Per layer (str): the residual norm above which the kinds that read the residual ("lowrank",
        "sae") leave a position alone, an attention sink (`probe.sae.sinks`; set by
        `steering.learn.learn` from the model; fixed, so the sampler and teacher forcing agree)."""
        if kind == "sae":
            n_feat = len(dictionary.features)
            self.gain = nn.Parameter(torch.zeros(n_feat))
            self.offset = nn.Parameter(torch.zeros(self.n_positions + 1, n_feat))
            for k, t in dictionary.tensors(prefix="").items():
                self.register_buffer(f"sae_{k}", t)
        elif kind in ("vector", "position", "mode"):
            self.vec = nn.ParameterDict({str(x): nn.Parameter(init_scale * torch.randn(rows, d_model, generator=g))
                                         for x in layers})
        else:  # U random (the direction of the first update), V and c zero: the edit starts at 0
            self.U = nn.ParameterDict({str(x): nn.Parameter(torch.randn(d_model, rank, generator=g) / d_model ** 0.5)
                                       for x in layers})
            self.V = nn.ParameterDict({str(x): nn.Parameter(torch.zeros(rank, d_model)) for x in layers})
            self.c = nn.ParameterDict({str(x): nn.Parameter(torch.zeros(rank)) for x in layers})

    @property
    def prompt_bucket(self) -> int:
        """Bucket index of the prompt tokens that decide nothing (`position` kind)."""
        return self.n_positions

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def sites(self) -> list[str]:
        return [site_name(self.site, x) for x in self.layers]

    def delta(self, layer: int, h: Float[Tensor, "batch seq d_model"],
              bucket: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d_model"]:
        """The edit added to `h` at `layer` (float32); `bucket` >= 0 per position (`position` kind)."""
        k = str(layer)
        if self.kind == "vector":
            return self.vec[k][0].expand_as(h)
        if self.kind in ("position", "mode"):
            return self.vec[k][bucket.clamp(0, self.vec[k].shape[0] - 1)]  # [b, s, d]
        if self.kind == "sae":
            fd = self._dict()
            a = fd.acts(h.float())  # [b, s, F]
            new = a * (1 + self.gain) + self.offset[bucket.clamp(0, self.n_positions)]
            out = fd.delta(h.float(), new)
        else:
            out = (h.float() @ self.V[k].T + self.c[k]) @ self.U[k].T  # [b, s, r] -> [b, s, d]
        thr = self.sink_thresholds.get(k)  # a sink (~100x the usual norm) would be read as a huge feature / projection
        if thr is not None:
            return out.masked_fill(sink_mask(h, thr)[0][..., None], 0.0)
        # a file without thresholds: an sae edit still never acts where its SAE was not trained (this forward's sinks)
        return out.masked_fill(sink_mask(h)[0][..., None], 0.0) if self.kind == "sae" else out

    def buckets(self, attention_mask: Int[Tensor, "rows pos"], answer_mask: Int[Tensor, "rows pos"],
                sample_index: Int[Tensor, " rows"], where: str = "all") -> Int[Tensor, "rows pos"]:
        """Teacher-forcing buckets of right-padded prompt + completion rows for `positions()`:
        `answer_buckets` for the position kinds; for `mode`, the row's mode (sample index mod K)
        wherever the sampler would steer it (prompt positions only with `where="all"`)."""
        b = answer_buckets(attention_mask, answer_mask, self.n_positions)
        if self.kind != "mode":
            return b
        mode = (sample_index.to(b.device) % self.n_modes)[:, None].expand_as(b)
        keep = (b >= 0) & ((b != self.prompt_bucket) | (where == "all"))
        return torch.where(keep, mode, torch.full_like(b, -1))

    def _dict(self) -> FeatureDictionary:
        """The dictionary with its tensors from this module's buffers (on the module's device)."""
        t = {k: getattr(self, f"sae_{k}") for k in ("W_enc", "b_enc", "b_dec", "W_dec")}
        return FeatureDictionary.from_tensors(t, self.dictionary.metadata(), prefix="")

    # --- application ---------------------------------------------------------------------------
    def apply(self, model: Any, coef: float = 1.0, **kwargs: Any) -> LearnedSteering:
        """A `LearnedSteering` (context manager and `sample_branches` intervention) on `model`;
        keyword arguments choose the gate and `where` (default "all": prompt tokens too)."""
        return LearnedSteering(model, self, coef, **kwargs)

    def vllm_edit(self, coef: float = 1.0, *, gate: str = "always", where: str = "all",
                  fraction: float | None = None, threshold: float | None = None, trace: bool = False) -> StreamEdit:
        """This edit with `apply`'s settings as the vLLM engine's intervention (a
        `probe.sampling.vllm_hooks.StreamEdit`): kind `vector` only, whose delta does not depend on
        the token; the other kinds, and the settings the engine cannot apply, raise `VLLMInterventionError`."""
        what = f"learned edit (kind {self.kind!r})"
        if self.kind != "vector":
            raise VLLMInterventionError(
                f"{what} cannot run inside vLLM: only kind 'vector' adds a fixed vector ('position' and 'mode' need "
                "each token's answer position or sample, 'sae' and 'lowrank' read each token's residual). Fix: sample "
                "it with the HF engine (probe.sampling.sampler.sample_branches, or --engine hf).")
        dirs = {x: self.vec[str(x)][0].detach() for x in self.layers}
        return stream_edit(dirs, self.site, coef, what=what, gate=gate, where=where, fraction=fraction, trace=trace)

    def check_model(self, model: Any) -> None:
        """Raise `LearnedEditError` unless `model` has every layer and width `d_model`."""
        d_model, n_layers, _ = model_dims(model)
        if d_model != self.d_model:
            raise LearnedEditError(f"this edit was learned for d_model={self.d_model}; the model has d_model={d_model}. "
                                   "Fix: learn it on this model (edits do not transfer across widths).")
        if max(self.layers) >= n_layers:
            raise LearnedEditError(f"this edit acts at layers {self.layers}; the model has layers 0..{n_layers - 1}. "
                                   "Fix: learn it on this model.")

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path, provenance: dict | None = None, recommended: dict | None = None) -> Path:
        """Write the parameters and a JSON header (shape settings, `n_params`, provenance, recommended)."""
        meta = {"kind": self.kind, "layers": self.layers, "d_model": self.d_model, "site": self.site,
                "n_positions": self.n_positions, "rank": self.rank, "n_modes": self.n_modes, "n_params": self.n_params(),
                "sae": None if self.dictionary is None else self.dictionary.metadata(),
                "sink_thresholds": self.sink_thresholds,
                "provenance": provenance or {}, "recommended": recommended or {}}
        header = {"format": FORMAT, "version": str(VERSION), "meta": json.dumps(meta)}
        return save_safetensors_atomic(path, dict(self.state_dict()), header)

    @classmethod
    def load(cls, path: str | Path) -> LearnedEdit:
        """Read a file written by `save`; `.meta` holds its header. Raises `LearnedEditError` on a bad file."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise LearnedEditError(f"{path} is not a readable safetensors file ({e}). Fix: pass a file written by "
                                   "LearnedEdit.save (it may be truncated).") from e
        if header.get("format") != FORMAT or header.get("version") != str(VERSION):
            raise LearnedEditError(f"{path} is not a learned edit of version {VERSION} (format "
                                   f"{header.get('format')!r}, version {header.get('version')!r}). Fix: write it with "
                                   "this forksight's LearnedEdit.save.")
        meta = json.loads(header["meta"])
        fd = None if not meta.get("sae") else FeatureDictionary.from_tensors(tensors, meta["sae"], prefix="sae_")
        edit = cls(meta["d_model"], meta["layers"], meta["kind"], n_positions=meta["n_positions"], rank=meta["rank"],
                   n_modes=meta["n_modes"], site=meta["site"], dictionary=fd)
        try:
            edit.load_state_dict(tensors)
        except RuntimeError as e:
            raise LearnedEditError(f"{path}: tensors do not match its header ({e})") from e
        edit.sink_thresholds = {k: float(v) for k, v in (meta.get("sink_thresholds") or {}).items()}
        edit.meta = meta
        return edit


def _site_and_layer(hook_name: str) -> tuple[str, int]:
    """"blocks.2.hook_resid_post" -> ("blocks.{L}.hook_resid_post", 2)."""
    parts = hook_name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise LearnedEditError(f"the SAE reads {hook_name!r}, not a per-layer site 'blocks.{{L}}.<hook>'")
    return ".".join([parts[0], "{L}", *parts[2:]]), int(parts[1])


def answer_buckets(attention_mask: Int[Tensor, "rows pos"], answer_mask: Int[Tensor, "rows pos"],
                   n_positions: int) -> Int[Tensor, "rows pos"]:
    """Buckets of right-padded prompt + completion rows (`probe.entropy.Trajectories`): the position
    before answer token a gets min(a, n_positions - 1), other prompt positions `n_positions`
    (prompt bucket), positions after the last real token -1."""
    answer, attn = answer_mask.bool(), attention_mask.bool()
    deciding = torch.zeros_like(answer)
    deciding[:, :-1] = answer[:, 1:]  # position s decides token s + 1
    a = deciding.long().cumsum(1) - 1  # answer index of the token decided
    out = torch.where(deciding, a.clamp(max=n_positions - 1), torch.full_like(a, n_positions))
    return torch.where(attn & ~(answer & ~deciding), out, torch.full_like(a, -1))


class LearnedSteering(Steering):
    """Applies a `LearnedEdit` (times `coef`) at its sites; made by `LearnedEdit.apply`."""

    def __init__(self, model: Any, edit: LearnedEdit, coef: float = 1.0, *, where: str = "all", **kwargs: Any):
        edit.check_model(model)
        super().__init__(model, edit.sites(), where=where, **kwargs)
        self.edit_module, self.coef, self.trace_coef = edit, float(coef), float(coef)
        self._layer = dict(zip(edit.sites(), edit.layers))
        self._buckets: Tensor | None = None
        dev = next(p for kind, m in self.targets for p in m.parameters()).device
        edit.to(dev)

    @contextmanager
    def positions(self, buckets: Int[Tensor, "batch seq"]):
        """Buckets of the plain forwards inside this block (teacher forcing), e.g. `answer_buckets`."""
        self._buckets = buckets
        try:
            yield self
        finally:
            self._buckets = None

    def condition(self, b: int, s: int, device) -> Int[Tensor, "batch seq"] | None:
        e, st = self.edit_module, self.state
        if st is None:
            if self._buckets is not None:
                if tuple(self._buckets.shape) != (b, s):
                    raise SteeringError(f"positions() buckets have shape {tuple(self._buckets.shape)}; this forward "
                                        f"reads [{b}, {s}]")
                buckets = self._buckets.to(device)
                if e.kind == "mode" or self.where != "generated":  # `LearnedEdit.buckets` applied `where`
                    return buckets
                return buckets.masked_fill(buckets == e.prompt_bucket, -1)
            if e.kind in ("position", "mode"):
                raise SteeringError(f"a {e.kind}-conditioned edit needs the bucket of every token: run it as the "
                                    "intervention= of sample_branches, or inside `with steer.positions(buckets)`")
            return None
        if e.kind == "mode":
            return (st.sample_index.to(device) % e.n_modes)[:, None].expand(b, s)
        if st.phase == "prompt":
            out = torch.full((b, s), e.prompt_bucket, dtype=torch.long, device=device)
            out[:, -1] = 0
            return out
        return torch.full((b, s), min(st.step + 1, e.n_positions - 1), dtype=torch.long, device=device)

    def prefill_groups(self, n: int) -> Int[Tensor, " n"]:
        """Sampler hook: separate prefills for steered / unsteered samples and, for `mode`, per mode."""
        g = super().prefill_groups(n)
        return g * self.edit_module.n_modes + torch.arange(n) % self.edit_module.n_modes if \
            self.edit_module.kind == "mode" else g

    def vllm_edit(self) -> StreamEdit:
        """This steering as the vLLM engine's intervention (`LearnedEdit.vllm_edit` with its settings)."""
        return self.edit_module.vllm_edit(self.coef, gate=self.gate, where=self.where, fraction=self.fraction,
                                          trace=self.trace is not None)

    def edit(self, name, x, mask):
        cond = self._fwd.get("cond")
        bucket = cond if cond is not None else torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        d = self.edit_module.delta(self._layer[name], x, bucket)
        return torch.where(mask[..., None], x + self.coef * d.to(x.dtype), x)

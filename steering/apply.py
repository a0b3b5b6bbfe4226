"""Applying interventions at inference: gated edits at named sites, as context managers.

What it is: `Steering`, the machinery every intervention shares (hook registration on a Hugging
Face model, a `probe.models.pair.HookedModel`, an nnsight `TransformersModel` or a TransformerLens
`HookedTransformer`; gates; probe passes; a shadow base model; a per-token trace; hooks removed in
`finally`), and `VectorSteering`, which adds `coef * direction` of a `SteeringVector` (made by
`SteeringVector.apply`). Cross-model patching (`steering.patching`) is the other `Steering`.

Two ways to use one, and both together:
- as the `intervention=` of `probe.sampling.sampler.sample_branches` (batched, KV-cached): the sampler's
  `SamplingState` says prompt vs generated, step, rows; gates and `where` apply (see
  `steering.gates` for the decision-position rule and each gate's exact definition and cost);
- as a `with` block around any forward pass (no state): every position is a decision position.

Edits act on the *decision positions* the gate selects (the positions whose next-token
distribution is sampled) and, with `where="prompt"` / `"all"`, on every prompt position ungated.
Gates and edits are per row, so a batch is steered exactly as its rows one at a time.

Trace (`trace=True`, sampler only): per decision, whether it was steered, the coefficient, and the
entropy (nats, temperature 1, full vocabulary) before (probe pass: unsteered at this position) and
after (the steered forward's distribution); `SteeringTrace.dense` aligns it with `Branches.tokens`
(column j = the decision that sampled token j). Tracing runs the probe pass, so it costs 2x.

Probe pass: the top-level HF `forward` called once more, bypassing the model's own hooks, with
this intervention's edits off, then the KV-cache entries it appended cropped (`DynamicCache.crop`).
Under an nnsight trace the model's output is the real (edited) one, but every submodule runs
twice: read submodule activations in a trace only with gates that need no probe pass.

What it is not: model loading, sampling or metrics. TransformerLens models are hooked at their hook
points but never driven by the sampler (it runs Hugging Face models), so they take the gates that
need no sampler state and no second model: `always` and an in-pass `detector`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.models.hooks import site_name
from probe.sampling.sampler import SamplingState
from steering.gates import check_gate, disagree_gate, entropy_gate, token_entropy
from steering.shadow import Shadow, forward_inputs
from steering.sites import on_site, site_order, targets
from steering.trace import SteeringTrace

STATELESS_GATES = ("always", "detector")


class SteeringError(RuntimeError):
    """An intervention used where it cannot work (e.g. a sampler-only gate on a plain forward)."""


class Steering:
    """Gated edits at `sites`; subclasses define `edit`. See the module docstring and `steering.gates`."""

    trace_coef: float = 0.0

    def __init__(self, model: Any, sites: Sequence[str], *, gate: str = "always", where: str = "generated",
                 threshold: float | None = None, detector: Any = None, detector_layer: int | None = None,
                 planning: Callable | None = None, base: Any = None, trace: bool = False,
                 shadow_sites: Sequence[str] = (), fraction: float | None = None):
        check_gate(gate, where, threshold, base, detector, planning)
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise ValueError(f"fraction={fraction!r} is outside [0, 1]: it is the share of each prompt's samples "
                             "that are steered (by sample index). Fix: pass e.g. fraction=0.25, or None for all.")
        self.fraction = None if fraction is None else float(fraction)
        self.targets = targets(model)
        self.sites, self.gate, self.where, self.threshold, self.planning = list(sites), gate, where, threshold, planning
        self.detector, self.det_site, det_in_pass = detector, None, True
        if detector is not None:
            self.det_layer = detector.best_layer if detector_layer is None else int(detector_layer)
            self.det_site = site_name(detector.meta.get("hook_site", "blocks.{L}.hook_resid_post"), self.det_layer)
            det_in_pass = site_order(self.det_site) <= min(site_order(s) for s in self.sites)
        self._det_pass = "main" if det_in_pass else "probe"
        self._probe = gate in ("entropy", "disagree") or trace or (gate == "detector" and not det_in_pass)
        base_gate = gate in ("base_entropy", "disagree")  # the only readers of the shadow's logits
        self.shadow = Shadow(base, tuple(shadow_sites), logits=base_gate) if (base_gate or shadow_sites) else None
        kinds = {k for k, _ in self.targets}
        if "hf" not in kinds and (self._probe or self.shadow or gate not in STATELESS_GATES):
            raise SteeringError(f"gate={gate!r} (trace={trace}, base={base is not None}) needs a Hugging Face model "
                                "run by probe.sampling.sampler.sample_branches; a TransformerLens model takes gate='always' "
                                "or an in-pass 'detector'. Fix: steer the HF model (HookedModel.hf).")
        self.trace = SteeringTrace() if trace else None
        self.state: SamplingState | None = None
        self._handles: list = []
        self._pass: str | None = None  # None | "shadow" | "probe" | "main"
        self._fwd: dict[str, Any] = {}

    # --- subclass interface ----------------------------------------------------------------------
    def edit(self, name: str, x: Float[Tensor, "batch seq d_model"],
             mask: Bool[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d_model"]:
        """The edited activation at site `name`; positions outside `mask` must stay unchanged."""
        raise NotImplementedError

    def condition(self, b: int, s: int, device) -> Int[Tensor, "batch seq"] | None:
        """Per-position condition index from the sampler state (-1: do not steer); None: no conditions."""
        return None

    def steered_samples(self, n: int) -> int:
        """How many samples of each prompt are steered (indices 0..m-1): round(fraction * n), or n."""
        return n if self.fraction is None else int(round(self.fraction * n))

    def prefill_groups(self, n: int) -> Int[Tensor, " n"]:
        """Sampler hook: steered and unsteered samples of a prompt get separate prefills, so the
        steered ones are steered from their first prompt token on (`where="all"`) and the others not."""
        self._n = n
        return (torch.arange(n) >= self.steered_samples(n)).long()

    @property
    def kv_models(self) -> tuple:
        """Models the sampler runs in step with the steered one (the shadow's), for its memory budget."""
        return () if self.shadow is None else (self.shadow.hf,)

    # --- context manager / sampler intervention --------------------------------------------------
    def __enter__(self) -> Steering:
        if self._handles:
            raise SteeringError("this Steering is already active; enter it once (or pass it as intervention=)")
        self._register()
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def __call__(self, state: SamplingState):
        """The `sample_branches` intervention: binds `state` for one sampling call."""
        return self._bound(state)

    @contextmanager
    def _bound(self, state: SamplingState):
        if self.state is not None:
            raise SteeringError("this Steering is already bound to a running sample_branches call")
        own = not self._handles
        if own:
            self._register()
        self.state, self.trace = state, (SteeringTrace() if self.trace is not None else None)
        try:
            yield self
        finally:
            self.state, self._pass, self._fwd = None, None, {}
            if self.shadow is not None:
                self.shadow.reset()
            if own:
                self._remove()

    def _register(self) -> None:
        try:
            for kind, m in self.targets:
                if self.det_site is not None:
                    self._handles.append(on_site(kind, m, self.det_site, self._read_detector))
                for s in self.sites:
                    self._handles.append(on_site(kind, m, s, lambda x, s=s: self._edit_hook(s, x)))
                self._handles.append(m.register_forward_pre_hook(
                    lambda mod, a, kw, k=kind: self._pre(k, mod, a, kw), with_kwargs=True))
                self._handles.append(m.register_forward_hook(lambda mod, a, out, k=kind: self._post(k, out)))
            if self.shadow is not None:
                self._handles += self.shadow.register()
        except BaseException:
            self._remove()
            raise

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._pass, self._fwd = [], None, {}

    # --- hooks -----------------------------------------------------------------------------------
    def _pre(self, kind: str, module, args, kwargs) -> None:
        if self._pass is not None:  # a probe pass re-entering the model
            return None
        st, f = self.state, {}
        self._fwd = f
        if kind == "tl":
            self._pass = "main"
            return None
        ids, _, _, cache = forward_inputs(args, kwargs)
        f["seq"] = ids.shape[1]
        if st is None and self.gate == "planning":
            raise SteeringError("gate='planning' reads the tokens generated so far: run it as the intervention= "
                                "of probe.sampling.sampler.sample_branches")
        if self.shadow is not None:
            self._pass = "shadow"
            try:
                f["base_logits"] = self.shadow.step(st, args, kwargs)
            finally:
                self._pass = None
        if self._probe:
            self._pass = "probe"
            try:
                out = type(module).forward(module, *args, **kwargs)  # the same forward, unedited
            finally:
                self._pass = None
            if cache is not None:
                cache.crop(-ids.shape[1])  # drop the probe pass's KV entries again
            f["logits"] = out.logits[:, -1:].float() if st is not None else out.logits.float()
        self._pass = "main"
        return None

    def _post(self, kind: str, output) -> None:
        if self._pass != "main":
            return None
        try:
            if kind == "hf" and self.trace is not None and self.state is not None:
                self._record(output.logits[:, -1].float())
        finally:
            self._pass = None
        return None

    def _read_detector(self, x: Tensor) -> None:
        if self._pass == self._det_pass or (self._pass is None and self._det_pass == "main"):
            self._fwd["det"] = self.detector.predict_proba(x, self.det_layer) > (0.5 if self.threshold is None else self.threshold)
        return None

    def _edit_hook(self, name: str, x: Tensor) -> Tensor | None:
        if self._pass not in ("main", None):
            return None
        if self._pass is None:  # a submodule called outside a hooked top-level forward
            self._fwd = {}
        return self.edit(name, x, self._mask(x.shape[0], x.shape[1], x.device))

    # --- decisions -------------------------------------------------------------------------------
    def _need(self, key: str) -> Any:
        if key not in self._fwd:
            raise SteeringError(f"gate={self.gate!r} has no {key!r} for this forward pass: it needs a Hugging Face "
                                "top-level forward (sample_branches, or model(...) without a KV cache)")
        return self._fwd[key]

    def _gate(self, b: int, s: int, device) -> Bool[Tensor, "batch seq"]:
        g, thr = self.gate, self.threshold
        if g == "always":
            out = torch.ones(b, 1, dtype=torch.bool, device=device)
        elif g == "entropy":
            out = entropy_gate(self._need("logits"), thr)
        elif g == "base_entropy":
            out = entropy_gate(self._need("base_logits"), thr)
        elif g == "disagree":
            out = disagree_gate(self._need("base_logits"), self._need("logits"), thr)
        elif g == "detector":
            out = self._need("det")
        else:
            out = self.planning(self.state.tokens).bool()[:, None]
        return out.to(device).expand(b, s)

    def _mask(self, b: int, s: int, device) -> Bool[Tensor, "batch seq"]:
        """Positions edited in this forward pass: prompt positions (ungated) | gated decisions."""
        if "mask" in self._fwd:
            return self._fwd["mask"]
        st, w = self.state, self.where
        prompt = torch.zeros(b, s, dtype=torch.bool, device=device)
        decide = torch.zeros_like(prompt)
        if st is None:
            decide[:] = True
        elif st.phase == "prompt":
            prompt[:, :-1] = w != "generated"
            prompt[:, -1] = w == "prompt"
            decide[:, -1] = w != "prompt"
        elif w != "prompt":
            decide[:] = st.active[:, None].to(device)
        mask = prompt | (decide & self._gate(b, s, device)) if decide.any() else prompt
        if self.fraction is not None:
            if st is None:
                raise SteeringError(f"fraction={self.fraction} steers some samples of each prompt: run it as the "
                                    "intervention= of probe.sampling.sampler.sample_branches, which knows each row's sample")
            rows = st.sample_index.to(device) < self.steered_samples(self._n)  # [b]
            mask = mask & rows[:, None]
        cond = self.condition(b, s, device)
        if cond is not None:
            self._fwd["cond"] = cond
            mask = mask & (cond >= 0)
        self._fwd["mask"] = mask
        return mask

    def _record(self, logits: Float[Tensor, "batch vocab"]) -> None:
        st, b = self.state, logits.shape[0]
        steered = self._mask(b, self._fwd["seq"], logits.device)[:, -1]
        live = st.active.to(logits.device)
        nan = torch.tensor(float("nan"), device=logits.device)
        self.trace.records.append({
            "step": st.step, "prompt": st.phase == "prompt",
            "ids": (st.prompt_index if st.phase == "prompt" else st.row_ids).cpu(),
            "steered": steered.cpu(), "coef": torch.where(steered, float(self.trace_coef), 0.0).cpu(),
            "entropy_before": torch.where(live, token_entropy(self._fwd["logits"][:, -1]), nan).cpu(),
            "entropy_after": torch.where(live, token_entropy(logits), nan).cpu()})


class VectorSteering(Steering):
    """Adds `coef * direction` (a `steering.vectors.SteeringVector`, which imports this module, so
    it is not imported here) at its layers; made by `SteeringVector.apply`.

    Conditioned vectors pick a direction row per position: `position` from the sampler step
    (answer position of the token being decided, the last row for all later positions), `cluster`
    by the nearest centroid of the activation being edited, `role` (or any, overriding) by
    `condition(tokens generated so far) -> row index per item` (-1: do not steer). Conditioned
    vectors steer decision positions only (`where="generated"`).
    """

    def __init__(self, model: Any, vector: Any, coef: float = 1.0, *,
                 condition: Callable[[Tensor], Tensor] | None = None, **kwargs: Any):
        vector.check_model(model)
        if vector.conditioning != "global" and kwargs.get("where", "generated") != "generated":
            raise ValueError(f"a {vector.conditioning}-conditioned vector has no direction for prompt tokens. "
                             "Fix: where='generated' (or a global vector).")
        if vector.conditioning == "role" and condition is None:
            raise ValueError("a role-conditioned vector needs condition=<tokens so far -> row index of "
                             f"{vector.conditions}>: the next token's role is unknown when it is decided")
        super().__init__(model, [vector.site(layer) for layer in vector.layers], **kwargs)
        self.vector, self.coef, self.trace_coef, self.user_condition = vector, float(coef), float(coef), condition
        self._layer = {vector.site(layer): layer for layer in vector.layers}
        self._dev: dict[tuple, Tensor] = {}

    def _on(self, key: str, t: Tensor, like: Tensor) -> Tensor:
        k = (key, like.device, like.dtype)
        if k not in self._dev:
            self._dev[k] = t.to(like.device, like.dtype)
        return self._dev[k]

    def condition(self, b: int, s: int, device) -> Int[Tensor, "batch seq"] | None:
        v, st = self.vector, self.state
        if self.user_condition is None and v.conditioning in ("global", "cluster"):
            return None
        if st is None:
            raise SteeringError(f"a {v.conditioning}-conditioned vector needs the sampler's state: run it as the "
                                "intervention= of probe.sampling.sampler.sample_branches")
        if self.user_condition is not None:
            idx = self.user_condition(st.tokens).long().to(device)
            if idx.shape != (b,) or (idx >= v.n_conditions).any():
                raise ValueError(f"condition returned {tuple(idx.shape)} values in [{int(idx.min())}, {int(idx.max())}]; "
                                 f"expected [{b}] row indices < {v.n_conditions} (or -1)")
        else:  # position: answer index of the token this decision samples
            idx = torch.full((b,), min(st.step + 1, v.n_conditions - 1), device=device)
        return idx[:, None].expand(b, s)

    def vllm_edit(self):
        """This steering as the vLLM engine's intervention (`SteeringVector.vllm_edit` with its settings)."""
        return self.vector.vllm_edit(self.coef, gate=self.gate, where=self.where, fraction=self.fraction,
                                     trace=self.trace is not None, condition=self.user_condition)

    def edit(self, name, x, mask):
        layer = self._layer[name]
        rows = self._on(f"d{layer}", self.vector.rows(layer), x)  # [n_cond, d]
        if self.vector.conditioning == "cluster" and self.user_condition is None:
            cents = self._on(f"c{layer}", self.vector.centroids[layer], x)
            cond = torch.cdist(x.float(), cents.float()[None].expand(x.shape[0], -1, -1)).argmin(-1)  # [b, s]
        else:
            cond = self._fwd.get("cond", torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))
        return torch.where(mask[..., None], x + self.coef * rows[cond.clamp_min(0)], x)

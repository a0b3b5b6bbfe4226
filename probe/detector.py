"""Latent fork detector: does the RL model's residual stream still know where the base forks are?

What it is: one linear probe per layer, trained on the RL model's residual (at the position that
predicts each answer token) to predict whether the *base* model has a fork at that token. If the
held-out AUROC stays high while the RL model's own output entropy has collapsed, the decision
points are still represented: the exploration is latent rather than gone. The saved detector
(`save` / `load`, safetensors + JSON metadata header) can later gate steering:
`detector.predict_proba(resid, layer)`.

- Logistic regression in torch: features standardised with the training mean / std, full-batch
  L-BFGS on mean binary cross-entropy + (l2 / 2) * ||w||^2 (the bias is not penalised).
- Split by group, never by token: every token of a group lands on the same side. Pass the
  trajectory (or, stricter, the problem) id per token as `groups`.
- Control: the same probe trained on labels permuted within the training set, scored on the
  true held-out labels, averaged over a few permutations; its AUROC should be ~0.5. A probe that beats its control by a margin is
  reading structure, not memorising.
- `auroc`: exact, from average ranks (ties count 1/2), equal to the pairwise definition.

No paper defines this detector: it is the toolkit's test of whether collapse is latent. Forks
(the labels) follow `probe.forks` (top-rho base entropy per batch, after arXiv:2506.01939).

What it is not: a causal claim (a probe reads, it does not show the model uses the direction), or
a nonlinear probe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from torch import Tensor

from probe.models.checkpoint import save_safetensors_atomic

FORMAT = "forksight.fork_detector"
VERSION = 1


def auroc(scores: Float[Tensor, " n"], labels: Bool[Tensor, " n"]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    Computed from average ranks (Mann-Whitney U). Raises if either class is empty.
    """
    s, y = scores.detach().double().flatten().cpu(), labels.bool().flatten().cpu()
    if s.shape != y.shape:
        raise ValueError(f"scores {tuple(s.shape)} and labels {tuple(y.shape)} differ in size")
    n1 = int(y.sum())
    n0 = y.numel() - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUROC needs both classes; got {n1} positives and {n0} negatives")
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # average rank per score
    return ((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)).item()


def _safe_auroc(scores: Tensor, labels: Tensor) -> float | None:
    return auroc(scores, labels) if 0 < int(labels.sum()) < labels.numel() else None


def split_groups(groups: Int[Tensor, " n"], test_fraction: float, seed: int) -> Bool[Tensor, " n"]:
    """True on held-out tokens: a random ceil(test_fraction * G) of the G groups (>= 1, < G)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1), e.g. 0.25")
    uniq = torch.unique(groups.cpu())
    if len(uniq) < 2:
        raise ValueError(f"{len(uniq)} group(s): a held-out split needs at least 2 trajectories/problems")
    g = torch.Generator().manual_seed(seed)
    n_test = min(len(uniq) - 1, max(1, math.ceil(test_fraction * len(uniq))))
    test_groups = uniq[torch.randperm(len(uniq), generator=g)[:n_test]]
    return torch.isin(groups.cpu(), test_groups)


def _fit_logreg(x: Tensor, y: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(w, b, mean, std) of an L2 logistic regression on standardised features."""
    x = x.detach().clone().double()  # a normal tensor (inputs may come from inference mode)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z, t = (x - mean) / std, y.detach().clone().double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float(), mean.float(), std.float()


@dataclass
class ForkDetector:
    """Per-layer linear probes: residual -> P(base model has a fork at this token)."""

    params: dict[int, dict[str, Tensor]]
    """layer -> {"w": [d_model], "b": [], "mean": [d_model], "std": [d_model]}."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-able provenance and the held-out report (hook site, models, rho, AUROCs, ...)."""

    @property
    def layers(self) -> list[int]:
        return sorted(self.params)

    @property
    def best_layer(self) -> int:
        """The layer with the highest held-out AUROC (the first layer when none was measured)."""
        report = self.meta.get("report", {}).get("layers", {})
        scored = [(v["auroc_test"], -int(k)) for k, v in report.items() if v.get("auroc_test") is not None]
        return -max(scored)[1] if scored else self.layers[0]

    def logits(self, resid: Float[Tensor, "*batch d_model"], layer: int | None = None) -> Float[Tensor, "*batch"]:
        layer = self.best_layer if layer is None else layer
        if layer not in self.params:
            raise KeyError(f"no probe for layer {layer}; this detector has layers {self.layers}")
        p = {k: v.to(resid.device) for k, v in self.params[layer].items()}
        if resid.shape[-1] != p["w"].shape[0]:
            raise ValueError(f"resid has width {resid.shape[-1]}; the layer-{layer} probe expects d_model={p['w'].shape[0]}")
        return ((resid.float() - p["mean"]) / p["std"]) @ p["w"] + p["b"]

    def predict_proba(self, resid: Float[Tensor, "*batch d_model"], layer: int | None = None) -> Float[Tensor, "*batch"]:
        """P(base fork) for each residual vector; layer None = `best_layer`."""
        return torch.sigmoid(self.logits(resid, layer))

    @classmethod
    def fit(
        cls,
        resid: dict[int, Float[Tensor, "n d_model"]],
        labels: Bool[Tensor, " n"],
        groups: Int[Tensor, " n"],
        test_fraction: float = 0.25,
        l2: float = 1e-2,
        seed: int = 0,
        max_iter: int = 200,
        n_controls: int = 5,
        meta: dict[str, Any] | None = None,
    ) -> ForkDetector:
        """Train one probe per layer on a group split; the held-out report goes to `meta["report"]`.

        The stored probes are the ones trained on the training split (the report measures them).
        The control AUROC is the mean (and std) over `n_controls` label permutations: one
        permutation alone can land far from 0.5 when a feature is strongly predictive.
        """
        labels, groups = labels.bool().cpu(), groups.cpu()
        n = labels.numel()
        if not resid:
            raise ValueError("resid is empty: pass {layer: [n_tokens, d_model]} for at least one layer")
        for layer, x in resid.items():
            if x.shape[0] != n or groups.numel() != n:
                raise ValueError(f"layer {layer}: {x.shape[0]} residuals, {n} labels, {groups.numel()} groups; "
                                 "need one of each per token")
        test = split_groups(groups, test_fraction, seed)
        train = ~test
        if labels[train].all() or not labels[train].any():
            raise ValueError(f"the training split has only {'positive' if labels[train].all() else 'negative'} "
                             "labels; a probe needs both. Fix: more trajectories or a larger rho.")
        if n_controls < 1:
            raise ValueError(f"n_controls={n_controls} must be >= 1 shuffled-label control")
        g = torch.Generator().manual_seed(seed + 1)
        shuffled = [labels[train][torch.randperm(int(train.sum()), generator=g)] for _ in range(n_controls)]
        params, report = {}, {}
        score = lambda x_, w_, b_, m_, s_: ((x_.float() - m_) / s_) @ w_ + b_  # noqa: E731
        for layer in sorted(resid):
            x = resid[layer].cpu()
            w, b, mu, sd = _fit_logreg(x[train], labels[train], l2, max_iter)
            params[layer] = {"w": w, "b": b, "mean": mu, "std": sd}
            controls = [_safe_auroc(score(x[test], *_fit_logreg(x[train], y, l2, max_iter)), labels[test])
                        for y in shuffled]
            controls_t = torch.tensor([c for c in controls if c is not None], dtype=torch.float64)
            report[str(layer)] = {
                "auroc_test": _safe_auroc(score(x[test], w, b, mu, sd), labels[test]),
                "auroc_train": _safe_auroc(score(x[train], w, b, mu, sd), labels[train]),
                "auroc_control": controls_t.mean().item() if len(controls_t) else None,
                "auroc_control_std": controls_t.std(unbiased=False).item() if len(controls_t) else None,
            }
        full_meta = dict(meta or {})
        full_meta["report"] = {
            "layers": report,
            "n_train": int(train.sum()), "n_test": int(test.sum()),
            "n_groups_train": int(torch.unique(groups[train]).numel()),
            "n_groups_test": int(torch.unique(groups[test]).numel()),
            "positive_rate_train": labels[train].float().mean().item(),
            "positive_rate_test": labels[test].float().mean().item(),
            "test_fraction": test_fraction, "l2": l2, "seed": seed,
            "split": "by group (no group on both sides)",
            "control": f"mean over {n_controls} permutations of the training labels, scored on true held-out labels",
        }
        det = cls(params, full_meta)
        det.meta["report"]["best_layer"] = det.best_layer
        return det

    def save(self, path: str | Path) -> Path:
        """Write safetensors (`layer{L}.w|b|mean|std`) with the JSON metadata in its header."""
        tensors = {f"layer{layer}.{k}": v for layer, p in self.params.items() for k, v in p.items()}
        header = {"format": FORMAT, "version": str(VERSION), "meta": json.dumps(self.meta)}
        return save_safetensors_atomic(path, tensors, header)

    @classmethod
    def load(cls, path: str | Path) -> ForkDetector:
        """Read a detector written by `save`; raises if the file is not one."""
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a fork detector (format {header.get('format')!r}, "
                                 f"expected {FORMAT!r}); write one with ForkDetector.save")
            params: dict[int, dict[str, Tensor]] = {}
            for key in f.keys():
                layer, name = key.split(".", 1)
                params.setdefault(int(layer.removeprefix("layer")), {})[name] = f.get_tensor(key)
        return cls(params, json.loads(header["meta"]))

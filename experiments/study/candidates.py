"""The cells a steering sweep evaluates, by family, and how to build each one's intervention.

Families (`Candidate.family`):
- `temperature`: the RL model sampled at another temperature (RL alone).
- `vector`: a derived `SteeringVector` (difference of means, PCA, SAE decoder) at a layer set,
  coefficient and gate (RL alone; `experiments.study.steer_stage`).
- `learned`: a `steering.learned.LearnedEdit` file (trained by `forksight steer learn`) at a
  coefficient (RL alone).
- `sae_edit`: SAE features RL pruned, edited in feature space at gated positions (RL alone;
  `steering.sae_edit`), or moved by learned per-feature gains and offsets (a learned edit of kind
  "sae").
- `repulsion`: the samples of one prompt pushed apart in the residual stream (RL alone).
- `variant`: an entropy-preserving RL checkpoint (another training run, not an intervention).
- `patching` / `layer_restore`: diagnostics that need the base model at inference (cross-model
  patching of the residual at forks; the RL model with one block's weights restored to the base's).

Row-level application (a fraction of each prompt's samples steered) is not a separate sampling
run: it equals splicing the fully steered cell's samples with the RL model's by sample index
(`probe.metrics.frontier.splice`, exact by the sampler's per-row randomness; tested), so the sweep derives
it for every RL-alone cell at each of `fractions` after sampling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RL_ALONE = ("temperature", "vector", "learned", "sae_edit", "repulsion")
FAMILIES = (*RL_ALONE, "variant", "patching", "layer_restore")


@dataclass
class Candidate:
    """One cell to evaluate: which model, which intervention, which temperature."""

    family: str
    spec: dict[str, Any]
    """JSON-able description (method, layers, coef, gate, ...); with the family it names the cell."""
    make: Callable[[], Any] | None = None
    """Builds the sampler intervention (None: sample the model plainly)."""
    model: str = "rl"
    """"rl", "base", or a checkpoint directory (variants)."""
    temperature: float = 1.0
    params: int | None = None
    """Parameters the intervention adds (learned edits), for the <= 1% budget."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rl_alone(self) -> bool:
        return self.family in RL_ALONE

    @property
    def key(self) -> str:
        return f"{self.family}|{json.dumps(self.spec, sort_keys=True)}|T{self.temperature}"


def temperature_cells(temperatures) -> list[Candidate]:
    return [Candidate("temperature", {"temperature": t}, temperature=t) for t in temperatures]


def vector_cells(cfg: Any, vecs: dict, rl: Any, tok: Any) -> list[Candidate]:
    """Every (method, layer set, coefficient, gate) of `cfg` whose layers the method's vector has."""
    from experiments.study.selection import parse_layers
    from experiments.study.steer_stage import steer_intervention

    out = []
    for m, v in vecs.items():
        for layer in (x for x in cfg.layers if set(parse_layers(x)) <= set(v.layers)):
            vl = v.at_layers(parse_layers(layer))
            for coef in cfg.coefs:
                for gate in cfg.gates:
                    out.append(Candidate("vector", {"method": m, "layer": layer, "coef": coef, "gate": gate},
                                         lambda vl=vl, c=coef, g=gate: steer_intervention(rl, tok, vl, c, g, cfg.detector),
                                         extra={"vector": vl}))
    return out


def learned_cells(paths, coefs, rl: Any) -> list[Candidate]:
    """Each learned edit file at each coefficient; its parameter count from the file. Learned gains of SAE
    features (kind "sae") are judged with the other SAE-feature interventions (family `sae_edit`)."""
    from steering.learned import LearnedEdit

    out = []
    for path in paths:
        edit = LearnedEdit.load(path)
        family = "sae_edit" if edit.kind == "sae" else "learned"
        for coef in coefs:
            out.append(Candidate(family, {"method": Path(path).stem, "coef": coef},
                                 lambda e=edit, c=coef: e.apply(rl, coef=c, where=e.meta["recommended"].get("where", "all")),
                                 params=edit.n_params(), extra={"file": str(path), "kind": edit.kind}))
    return out


def sae_edit_cells(specs, coefs, rl: Any, sae_dir: str, diff_path: str, detector: str) -> list[Candidate]:
    """Each "mode:n_features:gate" spec (e.g. "clamp:10:detector") at each coefficient: the top pruned
    features of the `forksight sae diff` run (chosen on the selection half) moved to the base
    model's statistics at forks (`steering.sae_edit.diff_targets`) where the gate fires, never at the
    attention sinks the SAE's training left out; the detector gate reads the fork detector at the
    SAE's own layer (in the same forward pass)."""
    if not specs:
        return []
    from experiments.study.sae_stage import sink_threshold_of
    from probe.detector import ForkDetector
    from probe.sae.dictionary import load_sae
    from steering.sae_edit import FeatureDictionary, SAEFeatureEdit, diff_targets

    diff = json.loads(Path(diff_path).read_text())
    sae, layer = load_sae(sae_dir), int(diff["hook_name"].split(".")[1])
    sinks = {"sink_threshold": sink_threshold_of(sae_dir)}  # the SAE's training threshold (None: per forward)
    out = []
    for spec in specs:
        mode, n, gate = spec.split(":")
        feats, t = diff_targets(diff["pruned"][: int(n)], mode)
        fd = FeatureDictionary.from_sae(sae, feats, hook_name=diff["hook_name"])
        kw = {"gate": "detector", "detector": ForkDetector.load(detector), "detector_layer": layer} \
            if gate == "detector" else {"gate": gate}
        kw |= sinks
        for c in coefs:
            out.append(Candidate("sae_edit", {"mode": mode, "features": int(n), "gate": gate, "coef": c},
                                 lambda fd=fd, t=t, c=c, kw=kw, m=mode: SAEFeatureEdit(rl, fd, m, t, c, **kw)))
    return out


def repulsion_cells(strengths, layers, rl: Any) -> list[Candidate]:
    from steering.repulsion import Repulsion

    return [Candidate("repulsion", {"strength": s, "layers": list(layers)},
                      lambda s=s: Repulsion(rl, list(layers), s)) for s in strengths]


def variant_cells(paths) -> list[Candidate]:
    return [Candidate("variant", {"method": Path(p).name}, model=str(p)) for p in paths]


def patching_cells(layers, alphas, rl: Any, base: Any, threshold: float) -> list[Candidate]:
    from steering import patch

    return [Candidate("patching", {"layer": layer, "alpha": a},
                      lambda L=layer, a=a: patch(rl, base, L, a, gate="base_entropy", threshold=threshold))
            for layer in layers for a in alphas]


def restore_cells(layers, rl: Any, base: Any) -> list[Candidate]:
    from steering.layer_restore import restore_layers

    return [Candidate("layer_restore", {"layer": layer}, lambda L=layer: (lambda state: restore_layers(rl, base, L)))
            for layer in layers]

"""forksight: how much search breadth RL removed from a model is still latent, and can be brought back.

The public face: the few objects a study, a notebook or your own inference code needs, in one
import. Everything below stays importable for power users (`probe.*` reads models, `steering.*`
changes them, `experiments.*` holds the CLI, the studies and the organisms' training).

    import forksight as fs

    model, tok = fs.load_model("experiments/organisms/countdown/rl-none")   # directory, .gguf or BASE+ADAPTER
    task = fs.load_task("countdown")                                        # or "math:problems.jsonl,chat"
    prompts = task.heldout_prompts(32)
    metrics, branches, scored = fs.evaluate(model, tok, prompts, task, fs.SamplerConfig(n=16, max_new_tokens=24))
    best = fs.load_intervention("experiments/results/steer-sweep/best.safetensors")
    steered = fs.sample(model, tok, prompts, fs.SamplerConfig(n=16, max_new_tokens=24), intervention=best.apply(model))

Groups (each name is the library object itself, not a wrapper):
- models: `load_model`, `load_pair`, `Pair`, `HookedModel`
- tasks: `load_task`, `Task`, `Countdown`, `MathTask`, `WordProblems`
- sampling: `SamplerConfig`, `sample` (= `sample_branches`), `Branches`; on vLLM `VLLMEngine`, `VLLMConfig`
  (vllm itself is imported when an engine starts: `make vllm`)
- probes: `pair_stats`, `fork_mask`, `fit_entropy_law`, `ForkDetector`
- metrics: `evaluate`, `score_branches`, `pass_at_k`, `pass_at_k_curve`, `distinct_correct`, `distinct_rule`,
  `compare_breadth`, `Outcomes`, `mixture_curve`, `compare_to_frontier`
- interventions: `SteeringVector`, `LearnedEdit`, `load_intervention`, `save_selected`
- SAEs: `load_sae`, `sae_fork_diff`, `fork_feature_diff`, `feature_records`
- studies: `RunConfig`, `run_study` (the `forksight run` pipeline; imported on first use)
"""

from __future__ import annotations

from pathlib import Path as _Path


def _check_not_shadowed() -> None:
    """`probe`, `steering` and `experiments` are generic names: a folder of the same name on the
    user's path (their own `experiments/`) would be imported instead of ours. Say so, not a
    confusing AttributeError three calls later."""
    import importlib.util

    home = _Path(__file__).resolve().parents[1]
    for name in ("probe", "steering"):
        spec = importlib.util.find_spec(name)
        found = _Path(spec.origin).resolve().parents[1] if spec and spec.origin else None
        if found != home:
            raise ImportError(f"forksight's `{name}` package resolves to {found} instead of {home / name}: a folder "
                              f"named `{name}` on your path shadows it. Fix: rename that folder or run from another "
                              "directory.")


_check_not_shadowed()

from probe.detector import ForkDetector  # noqa: E402
from probe.entropy import pair_stats  # noqa: E402
from probe.forks import fork_mask  # noqa: E402
from probe.law import fit_entropy_law  # noqa: E402
from probe.metrics.breadth import compare_breadth  # noqa: E402
from probe.metrics.evaluate import evaluate, score_branches  # noqa: E402
from probe.metrics.frontier import compare_to_frontier, mixture_curve  # noqa: E402
from probe.metrics.outcomes import Outcomes  # noqa: E402
from probe.metrics.passk import distinct_correct, distinct_rule, pass_at_k, pass_at_k_curve  # noqa: E402
from probe.models.checkpoint import load_causal_lm as load_model  # noqa: E402
from probe.models.pair import HookedModel, Pair, load_pair  # noqa: E402
from probe.sae.dictionary import load_sae  # noqa: E402
from probe.sae.diff import sae_fork_diff  # noqa: E402
from probe.sae.features import feature_records, fork_feature_diff  # noqa: E402
from probe.sampling.sampler import SamplerConfig  # noqa: E402
from probe.sampling.sampler import sample_branches as sample  # noqa: E402
from probe.sampling.types import Branches  # noqa: E402
from probe.sampling.vllm_config import VLLMConfig  # noqa: E402
from probe.sampling.vllm_engine import VLLMEngine  # noqa: E402
from probe.tasks import load_task  # noqa: E402
from probe.tasks.countdown import Countdown  # noqa: E402
from probe.tasks.math_task import MathTask  # noqa: E402
from probe.tasks.protocol import Task  # noqa: E402
from probe.tasks.wordproblems import WordProblems  # noqa: E402
from steering import LearnedEdit, SteeringVector, load_intervention, save_selected  # noqa: E402

_LAZY = {"RunConfig": "experiments.study.run", "run_study": "experiments.study.run"}


def __getattr__(name: str):
    """The study pipeline is the application on top of the library: imported when first named."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'forksight' has no attribute {name!r}; see forksight.__all__")


__all__ = [
    "Branches", "Countdown", "ForkDetector", "HookedModel", "LearnedEdit", "MathTask", "Outcomes", "Pair",
    "RunConfig", "SamplerConfig", "SteeringVector", "Task", "VLLMConfig", "VLLMEngine", "WordProblems",
    "compare_breadth", "compare_to_frontier", "distinct_correct", "distinct_rule", "evaluate",
    "feature_records", "fit_entropy_law", "fork_feature_diff", "fork_mask", "load_intervention", "load_model",
    "load_pair", "load_sae", "load_task", "mixture_curve", "pair_stats", "pass_at_k", "pass_at_k_curve",
    "run_study", "sae_fork_diff", "sample", "save_selected", "score_branches",
]

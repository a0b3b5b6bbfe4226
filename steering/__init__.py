"""steering: change models at inference. Vectors, SAE-feature edits and learned edits, gated application,
patching, and the one-file selected intervention.

Never imports `experiments` (see docs/architecture.md); builds on `probe`. Modules:
`vectors` (`SteeringVector`: directions + provenance, safetensors I/O, model checks), `derive`
(difference of means at forks, global or conditioned; PCA; SAE decoder rows), `apply` (gated
application as a context manager and a sampler intervention), `gates` (what each gate decides,
exactly, and what it costs), `patching` (cross-model patching toward the base), `trace`
(per-token record), `shadow` (a second model kept in step with the sampler), `sites` (hooking),
`sae_edit` (gains on SAE features), `learn` / `learned` (small learned residual edits: training and
the edit), `breadth_reward` (the rewards breadth learning pays and their advantages), `repulsion` (pushes the samples of one prompt apart), `layer_restore` (some decoder
blocks' weights taken from the base), `selected` (an intervention with its coefficient, gate and
provenance in one file: `load_intervention(path).apply(model)`).

Usage (a Hugging Face model, as `probe.sampling.sampler.sample_branches` runs it):

    from probe.detector import ForkDetector
    from probe.sampling.sampler import SamplerConfig, sample_branches
    from steering import SteeringVector, after_tokens, collect, diff_of_means_vector, fork_tokens, patch

    res = collect(pair, trajectories, layers=[2])                  # base & RL residuals, same tokens
    vec = diff_of_means_vector(res, fork_tokens(res.stats, rho=0.2), conditioning="global",
                               source_models={"base": base_dir, "rl": rl_dir}, positions="base forks")
    vec.save("vec.safetensors")

    vec = SteeringVector.load("vec.safetensors")                   # validated on load
    steer = vec.apply(rl_hf, coef=4.0, gate="detector", detector=ForkDetector.load(det_path), trace=True)
    branches = sample_branches(rl_hf, tok, prompts, SamplerConfig(n=8), intervention=steer)
    per_token = steer.trace.dense(n=8, max_new_tokens=32)         # steered / coef / entropy before, after

    steer = vec.apply(rl_hf, coef=4.0, gate="entropy", threshold=1.0)       # probe pass: 2x forwards
    steer = vec.apply(rl_hf, coef=4.0, gate="planning",                     # Countdown: next token starts
                      planning=after_tokens(tok.convert_tokens_to_ids(list("+-*/;"))))  # an operand
    with vec.apply(rl_hf, coef=4.0):                               # any forward, every position
        logits = rl_hf(ids).logits

    upper = patch(rl_hf, base_hf, layers=2, alpha=0.5, gate="base_entropy", threshold=1.0)
    branches = sample_branches(rl_hf, tok, prompts, SamplerConfig(n=8), intervention=upper)

Hooks are removed in `finally`, also when sampling raises.
"""

from steering.apply import Steering, SteeringError, VectorSteering
from steering.derive import (
    ForkResiduals,
    collect,
    diff_of_means_vector,
    fork_tokens,
    pca_vector,
    sae_vector,
)
from steering.gates import GATES, WHERE, after_tokens
from steering.layer_restore import restore_layers
from steering.learn import LearnConfig, learn
from steering.learned import LearnedEdit, LearnedSteering
from steering.patching import Patching, patch
from steering.repulsion import Repulsion
from steering.sae_edit import FeatureDictionary, SAEFeatureEdit
from steering.selected import Selected, load_intervention, save_selected
from steering.trace import SteeringTrace
from steering.vectors import SteeringVector, SteeringVectorError

__all__ = [
    "GATES", "WHERE", "FeatureDictionary", "ForkResiduals", "LearnConfig", "LearnedEdit", "LearnedSteering",
    "Patching", "Repulsion", "SAEFeatureEdit", "Selected", "Steering", "SteeringError", "SteeringTrace",
    "SteeringVector", "SteeringVectorError", "VectorSteering", "after_tokens", "collect", "diff_of_means_vector",
    "fork_tokens", "learn", "load_intervention", "patch", "pca_vector", "restore_layers", "sae_vector",
    "save_selected",
]

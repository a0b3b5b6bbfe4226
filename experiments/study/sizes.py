"""How large each stage of `forksight run` is: one table per kind of pair, full and quick.

What it is: `StudySize`, the sample counts and grids the stages use, and the four sizes
`forksight run` picks from (`size_for`): the character-level organisms (the shipped study's sizes,
unchanged) and real pretrained models (BPE vocabularies, 100M+ parameters: on a CPU every sampled
token costs ~1000x an organism's, so fewer samples per problem and shorter learned-edit training),
each with a quick variant for tests and a first look. The kind is the `--profile` flag, or by
default read from the base's vocabulary (`profile_of`: at most `ORGANISM_VOCAB` tokens is an organism).

What it is not: the stages' own defaults (each stage command keeps its flags), or a promise about
statistical power: the real sizes are what a 2-core CPU finishes in a few hours; a GPU run should
raise `n` and the learned edits' steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROFILES = ("auto", "organism", "real")
ORGANISM_VOCAB = 1024
"""A base with at most this many tokens is a character-level organism (the shipped ones have < 128)."""


@dataclass(frozen=True)
class StudySize:
    """Sizes of every stage of one study."""

    probe_problems: int
    """Problems whose samples the probe reads (both models)."""
    probe_samples: int
    """Samples per problem in the probe."""
    sae_train_samples: int
    """Activations the SAE trains on."""
    sae_train_problems: int
    """Training-distribution problems sampled for SAE activations."""
    sae_samples: int
    """Samples per problem for SAE activations."""
    sae_eval_problems: int
    """Held-out problems the SAE is scored on (and the feature diff reads)."""
    sae_eval_samples: int
    """Samples per problem when scoring the SAE and diffing features."""
    d_sae: int
    """SAE width."""
    learn: dict = field(default_factory=dict)
    """Overrides of every learned-edit recipe (steps, prompts per step, group size); {} = the recipe's own."""
    coefs: tuple[float, ...] = (0.4,)
    """Steering-vector coefficients of the sweep."""
    learned_coefs: tuple[float, ...] = (0.5, 1.0)
    """Learned-edit strengths of the sweep."""
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5)
    """Row-level fractions (spliced from samples already drawn)."""
    temperatures: tuple[float, ...] = (1.2,)
    """Temperature baselines."""
    last_layer_only: bool = False
    """Patching and layer restoration at the last spread layer only (else at all of them but the first)."""
    curves_half: str = "test"
    """Half the patching and layer-restoration curves are measured on (`SweepConfig.curves_half`)."""
    problems: int = 0
    """Held-out problems per half the sweep uses (0 = every problem of each half)."""
    n: int = 64
    """Samples per problem in the sweep."""
    derive_problems: int = 256
    """Training problems the steering vectors are derived from."""


ORGANISM = StudySize(probe_problems=64, probe_samples=8, sae_train_samples=400_000, sae_train_problems=512,
                     sae_samples=8, sae_eval_problems=128, sae_eval_samples=8, d_sae=512)
ORGANISM_QUICK = StudySize(probe_problems=8, probe_samples=4, sae_train_samples=30_000, sae_train_problems=32,
                           sae_samples=4, sae_eval_problems=8, sae_eval_samples=4, d_sae=128,
                           learn={"steps": 4, "prompts_per_step": 4, "group_size": 8}, coefs=(0.5,),
                           learned_coefs=(1.0,), fractions=(0.25,), temperatures=(1.5,), last_layer_only=True,
                           problems=8, n=16, derive_problems=16)
# SAE: 200k samples left the real pair's SAE at FVU 0.54 and still falling (195 steps; 22 s of training next
# to ~30 min of sampling and collecting its ~311k activations): 4M samples are ~13 passes, 11 min here.
REAL = StudySize(probe_problems=64, probe_samples=8, sae_train_samples=4_000_000, sae_train_problems=128,
                 sae_samples=8, sae_eval_problems=64, sae_eval_samples=8, d_sae=2304,
                 learn={"steps": 30, "prompts_per_step": 8, "group_size": 8, "save_every": 5}, problems=64, n=16,
                 temperatures=(1.1, 1.2, 1.35, 1.5), derive_problems=128, curves_half="selection")
"""Real pretrained models on a 2-core CPU: 64 + 64 held-out problems x 16 samples in the sweep (the
issue's floor on the test half), four temperatures for the baseline matched to the chosen cell's fork
entropy (`experiments.study.selection.matched_temperature`: one temperature would match nothing), 128
x 8 training-problem samples for the SAE (every token of a 100-token prompt plus its completion is an
activation: > 200k), learned edits saved every 5 steps so
that a stopped run loses little, and the patching / layer-restoration curves read from the selection
half's cells (each point runs RL at base-like answer lengths, patching with the base beside it: six
more such cells on the test half would cost about as much as the rest of the sweep)."""
REAL_QUICK = StudySize(probe_problems=4, probe_samples=2, sae_train_samples=30_000, sae_train_problems=8,
                       sae_samples=2, sae_eval_problems=4, sae_eval_samples=2, d_sae=256,
                       learn={"steps": 1, "prompts_per_step": 2, "group_size": 4}, coefs=(0.5,),
                       learned_coefs=(1.0,), fractions=(0.25,), temperatures=(1.5,), last_layer_only=True,
                       problems=8, n=4, derive_problems=8, curves_half="selection")
SIZES = {("organism", False): ORGANISM, ("organism", True): ORGANISM_QUICK, ("real", False): REAL,
         ("real", True): REAL_QUICK}


def profile_of(vocab_size: int) -> str:
    """"organism" for a character-level vocabulary (<= `ORGANISM_VOCAB` tokens), else "real"."""
    return "organism" if vocab_size <= ORGANISM_VOCAB else "real"


def size_for(profile: str, quick: bool, vocab_size: int) -> StudySize:
    """The sizes of a study: `profile` "organism" / "real", or "auto" (`profile_of(vocab_size)`)."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}; allowed {', '.join(PROFILES)}. Fix: --profile auto (by the base's "
                         "vocabulary), organism (the shipped study's sizes) or real (pretrained models on a CPU)")
    return SIZES[(profile_of(vocab_size) if profile == "auto" else profile, quick)]

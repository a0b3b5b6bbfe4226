"""Stage sizes of `forksight run` (experiments.study.sizes): the organism's are the shipped study's,
a real pair gets the real sizes and layers spread over its depth, and a bad profile is refused."""

from __future__ import annotations

import pytest

from experiments.study.run import RunConfig, stage_configs, study_layers
from experiments.study.sizes import ORGANISM, ORGANISM_QUICK, REAL, REAL_QUICK, size_for


def test_the_profile_follows_the_vocabulary_unless_named():
    assert size_for("auto", False, 100) is ORGANISM and size_for("auto", True, 100) is ORGANISM_QUICK
    assert size_for("auto", False, 49152) is REAL and size_for("auto", True, 49152) is REAL_QUICK
    assert size_for("organism", False, 49152) is ORGANISM, "--profile names the sizes whatever the vocabulary"
    with pytest.raises(ValueError, match="allowed auto, organism, real"):
        RunConfig(profile="huge")


def test_layers_spread_over_the_depth_and_keep_the_organisms_choices():
    assert study_layers(4) == {"edit": (0, 1, 2, 3), "later": (1, 2, 3), "sae": 2}
    assert study_layers(30) == {"edit": (0, 10, 19, 29), "later": (10, 19, 29), "sae": 15}


def test_the_shipped_pair_gets_the_shipped_study_sizes(tmp_path):
    sc = stage_configs(RunConfig(out=str(tmp_path)))
    assert (sc["probe"].n_problems, sc["sae"].d_sae, sc["sweep"].n, sc["sweep"].layers) == (64, 512, 64, ("0+1+2+3",))
    assert all(lc.steps >= 200 for _, lc in sc["learn"].values()), "the organism keeps each recipe's own steps"


@pytest.mark.slow
def test_a_real_pair_gets_the_real_sizes_and_its_own_layers(tmp_path, real_base):
    sc = stage_configs(RunConfig(out=str(tmp_path), base=str(real_base), rl=f"{real_base}+{tmp_path}",
                                 task="math:experiments/real/smollm2/heldout.jsonl,chat"))
    assert sc["sweep"].n == REAL.n and sc["sae"].layer == 15 and sc["sweep"].layers == ("0+10+19+29",)
    assert sc["sweep"].patch_layers == (10, 19, 29) and sc["sae"].d_sae == REAL.d_sae
    assert all(lc.steps == REAL.learn["steps"] and lc.layers == (0, 10, 19, 29) for _, lc in sc["learn"].values())

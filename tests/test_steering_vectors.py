"""Steering vectors: derived by every method, saved and loaded with all provenance, refused when
they do not fit a model."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from probe.entropy import trajectories_from_branches
from probe.models.pair import Pair, wrap
from probe.sampling.sampler import SamplerConfig, sample_branches
from steering import SteeringError, SteeringVector, SteeringVectorError, collect, patch
from steering.derive import diff_of_means_vector, fork_tokens, pca_vector, sae_vector
from steering.vectors import FORMAT, META_FIELDS


def _derived_vectors(tiny_lm, tiny_tokenizer):
    """One vector per derivation method / conditioning, from a tiny random pair."""
    base, rl = tiny_lm("qwen2", 1), tiny_lm("qwen2", 0)
    pair = Pair(wrap(base, tiny_tokenizer, "nnsight", "cpu", "base"), wrap(rl, tiny_tokenizer, "nnsight", "cpu", "rl"))
    branches = sample_branches(rl, tiny_tokenizer, ["w3 w4 w5", "w6 w7"], SamplerConfig(n=4, max_new_tokens=8, device="cpu"))
    roles = torch.arange(branches.tokens.numel()).view_as(branches.tokens) % 3  # any labelling will do
    res = collect(pair, trajectories_from_branches(branches, roles), layers=[0, 1])
    forks = fork_tokens(res.stats, rho=0.5)
    prov = dict(source_models={"base": "seed1", "rl": "seed0"}, positions="base forks, rho=0.5")
    return {
        "global": diff_of_means_vector(res, forks, config={"note": "x", "nested": {"k": [1, 2.5]}}, **prov),
        "role": diff_of_means_vector(res, forks, conditioning="role", normalisation="unit", **prov),
        "position": diff_of_means_vector(res, forks, conditioning="position", n_positions=3,
                                         normalisation="resid_norm", **prov),
        "cluster": diff_of_means_vector(res, forks, conditioning="cluster", n_clusters=2, **prov),
        "pca": pca_vector(res, forks, **prov),
        "sae": sae_vector(torch.randn(16, 32), [3, 7], layer=1, weights=[1.0, -0.5],
                          source_models={"sae": "sae/dir"}, positions="pruned features"),
    }


def test_save_load_keeps_every_metadata_field(tiny_lm, tiny_tokenizer, tmp_path):
    vecs = _derived_vectors(tiny_lm, tiny_tokenizer)
    for name, vec in vecs.items():
        back = SteeringVector.load(vec.save(tmp_path / f"{name}.safetensors"))
        assert set(vec.metadata()) == set(META_FIELDS), "metadata() must list every provenance field"
        for f in META_FIELDS:
            assert getattr(back, f) == getattr(vec, f), f"{name}: {f} changed on save/load: provenance lost"
        assert back.layers == vec.layers and all(torch.equal(back.directions[k], vec.directions[k]) for k in vec.layers), \
            f"{name}: a file stores float32 directions bit for bit (a promise)"
        if vec.centroids is not None:
            assert all(torch.equal(back.centroids[k], vec.centroids[k]) for k in vec.layers), f"{name}: centroids changed"
        else:
            assert back.centroids is None
    assert vecs["role"].conditions == ["planning", "execution", "other"] and vecs["role"].directions[0].shape == (3, 32)
    assert vecs["position"].conditions == ["pos0", "pos1", "pos2+"]
    assert vecs["sae"].method == "sae_decoder" and vecs["pca"].method == "pca"

    # load refuses what it cannot trust, naming the problem
    good = vecs["global"].save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SteeringVectorError, match="not a readable safetensors file"):
        SteeringVector.load(tmp_path / "cut.safetensors")
    meta = vecs["global"].metadata()
    tensors = {"layer0": torch.zeros(32)}
    for label, header, match in (
        ("missing", {"format": FORMAT, "version": "1", "meta": json.dumps({k: v for k, v in meta.items() if k != "positions"})},
         r"lacks fields \['positions'\]"),
        ("future", {"format": FORMAT, "version": "2", "meta": json.dumps({**meta, "version": 2})}, "format version 2"),
        ("other", {"format": "forksight.fork_detector", "version": "1", "meta": "{}"}, "is not a steering vector"),
    ):
        save_file(tensors, str(tmp_path / f"{label}.safetensors"), metadata=header)
        with pytest.raises(SteeringVectorError, match=match):
            SteeringVector.load(tmp_path / f"{label}.safetensors")
    with pytest.raises(SteeringVectorError, match="does not exist"):
        SteeringVector.load(tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize("backend", ["hf", "nnsight", "transformer_lens"])
def test_wrong_width_vector_is_a_clear_error(tiny_lm, tiny_tokenizer, backend):
    hf = tiny_lm("qwen2", 0)
    if backend == "hf":
        model = hf
    elif backend == "nnsight":
        model = wrap(hf, tiny_tokenizer, "nnsight", "cpu")
    else:  # TL's tokenizer setup mutates the tokenizer: give it its own copy
        model = wrap(hf, copy.deepcopy(tiny_tokenizer), "transformer_lens", "cpu").model
    wide = SteeringVector({0: torch.randn(48)}, method="custom")
    msg = r"vector width 48 does not match the model's d_model=32 at blocks\.0\.hook_resid_post\. Fix:"
    with pytest.raises(SteeringVectorError, match=msg):
        wide.check_model(model)
    with pytest.raises(SteeringVectorError, match=msg):
        wide.apply(model, coef=1.0)
    deep = SteeringVector({5: torch.randn(32)})
    with pytest.raises(SteeringVectorError, match="layer 5"):
        deep.apply(model, coef=1.0)
    modules = hf.modules() if backend != "transformer_lens" else model.modules()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules), "a refused vector left a hook"
    with pytest.raises(SteeringVectorError, match=r"shape \(2, 32\); expected \[d_model\]"):
        SteeringVector({0: torch.randn(2, 32)})  # 2-D without condition labels
    with pytest.raises(SteeringVectorError, match="not steerable"):
        SteeringVector({0: torch.randn(32)}, hook_site="ln_final.hook_normalized")
    if backend == "hf":  # patching across widths is refused as clearly
        from transformers import AutoModelForCausalLM, Qwen2Config

        wide_base = AutoModelForCausalLM.from_config(Qwen2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128, vocab_size=64))
        with pytest.raises(SteeringError, match=r"hidden_size differ \(32 vs 64\)"):
            patch(hf, wide_base, layers=0, alpha=0.5)


def test_at_layers_keeps_provenance_and_rejects_missing_layers():
    vec = SteeringVector({0: torch.ones(8), 2: torch.zeros(8), 3: torch.full((8,), 2.0)}, method="custom",
                         config={"k": 1})
    sub = vec.at_layers([3, 0])
    assert sub.layers == [0, 3] and torch.equal(sub.directions[3], vec.directions[3])
    assert (sub.method, sub.config) == (vec.method, vec.config)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        vec.at_layers([0, 1])


def test_pruned_forks_are_base_forks_the_rl_model_does_not_fork_at():
    from probe.entropy import PairStats

    h_base = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.5]])
    h_rl = torch.tensor([[3.0, 0.0, 1.0, 0.0, 2.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    stats = PairStats(**{f.name: None for f in dataclasses.fields(PairStats)} | {"h_base": h_base, "h_rl": h_rl, "mask": mask})
    base, rl, pruned = (fork_tokens(stats, rho=0.4, which=w) for w in ("base", "rl", "pruned"))
    assert base.tolist() == [True, True, False, False, False] and rl.tolist() == [True, False, False, False, True]
    assert pruned.tolist() == [False, True, False, False, False]

"""SAE-feature edits (`steering.sae_edit`): the folded rows read what sae-lens encodes, an edit keeps the
SAE's reconstruction error, the identity oracle (targets = current activations, coef 0, no features),
site / width errors, gates and the about-to-fire condition firing on some positions and not all,
hooks gone after errors, and a batch steered exactly as its prompts one at a time."""

import pytest
import torch
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from probe.detector import ForkDetector
from probe.sampling.sampler import SamplerConfig, sample_branches
from steering.sae_edit import (
    FeatureDictionary,
    FeatureDictionaryError,
    SAEFeatureEdit,
    decoder_directions,
    diff_targets,
    new_acts,
    resid_norm_targets,
)

SITE = "blocks.1.hook_resid_post"
PROMPTS = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
CFG = SamplerConfig(n=3, max_new_tokens=8, batch_size=4, seed=1, device="cpu")  # batches split prompts
FEATS = [3, 7, 11, 20]


def make_sae(arch="topk", d_in=32, d_sae=48, k=6, rescale=True, norm="none", seed=0):
    """A random sae-lens SAE with non-unit decoder rows and a non-zero b_enc / b_dec, so every fold matters."""
    torch.manual_seed(seed)
    common = dict(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True, normalize_activations=norm)
    sae = (TopKSAE(TopKSAEConfig(k=k, rescale_acts_by_decoder_norm=rescale, **common)) if arch == "topk"
           else StandardSAE(StandardSAEConfig(**common)))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = SITE
    return sae


def resid(n=200, d=32, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def sae_pre(sae, x):
    seen = []
    h = sae.hook_sae_acts_pre.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            out = sae.encode(x)
    finally:
        h.remove()
    return seen[0], out


def _no_hooks(*models) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for model in models for m in model.modules())


def _detector(layer=0, seed=7):
    g = torch.Generator().manual_seed(seed)
    p = {"w": torch.randn(32, generator=g), "b": torch.tensor(0.0), "mean": torch.zeros(32), "std": torch.ones(32) * 0.3}
    return ForkDetector({layer: p}, {"hook_site": "blocks.{L}.hook_resid_post"})


SAES = {"topk-rescale": {}, "topk": {"rescale": False}, "standard": {"arch": "standard"},
        "constant_norm_rescale": {"norm": "constant_norm_rescale"}, "layer_norm": {"norm": "layer_norm"}}


@pytest.mark.parametrize("which", list(SAES))
def test_acts_equal_the_sae_pre_activation_and_its_output_where_active(which):
    sae = make_sae(**SAES[which])
    d = FeatureDictionary.from_sae(sae, FEATS)
    x = resid()
    pre, out = sae_pre(sae, x)
    scale = sae.W_dec.norm(dim=-1)[FEATS] if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else 1.0
    assert torch.allclose(d.pre(x), pre[:, FEATS] * scale, atol=1e-5), "pre() is not sae-lens's (rescaled) pre-activation"
    a, o = d.acts(x), out[:, FEATS]
    on = o > 0
    assert on.any(), "vacuous: no feature active"
    assert torch.allclose(a[on], o[on], atol=1e-5), "acts differ from sae.encode where the feature is active"
    if which.startswith("topk"):  # the documented departure: the strength it would have had
        lost = (a > 0) & ~on
        assert lost.any(), "vacuous: no feature lost the top-k race here"


@pytest.mark.parametrize("which", ["topk-all", "standard", "constant_norm_rescale", "layer_norm"])
def test_delta_keeps_the_reconstruction_error(which):
    # k = d_sae: TopK keeps every positive pre-activation, so encode == acts on every feature
    kw = {"topk-all": {"k": 48}, "standard": {"arch": "standard"},
          "constant_norm_rescale": {"k": 48, "norm": "constant_norm_rescale"}, "layer_norm": {"k": 48, "norm": "layer_norm"}}[which]
    sae = make_sae(**kw)
    d = FeatureDictionary.from_sae(sae, FEATS)
    x = resid()
    new = d.acts(x) * 2.0 + torch.rand(x.shape[0], len(FEATS))
    x2 = x + d.delta(x, new)
    with torch.no_grad():
        a = sae.encode(x)
        err = sae.decode(a) - x
        a_new = a.clone()
        a_new[:, FEATS] = new
        sae.encode(x)  # layer_norm keeps the input's statistics for the next decode
        err2 = sae.decode(a_new) - x2
    assert torch.allclose(err, err2, atol=1e-4), "the edit changed the SAE's reconstruction error (or other features)"
    assert not torch.allclose(x, x2), "vacuous: the edit changed nothing"


def test_new_acts_identity_oracle_and_modes():
    a = torch.rand(5, 4) * (torch.rand(5, 4) > 0.5)
    for mode in ("clamp", "add", "scale"):
        assert torch.equal(new_acts(a, mode, torch.full((4,), 3.0), 0.0), a), f"{mode}: coef 0 is not the identity"
    assert torch.equal(new_acts(a, "clamp", a), a), "clamp to the current activations changed them"
    assert torch.equal(new_acts(a, "add", torch.zeros(4)), a) and torch.equal(new_acts(a, "scale", torch.ones(4)), a)
    t = torch.tensor([0.2, 0.0, 1.0, 0.5])
    assert torch.equal(new_acts(a, "clamp", t), torch.maximum(a, t))
    assert torch.allclose(new_acts(a, "scale", t, 2.0), a * t**2)
    d = FeatureDictionary.from_sae(make_sae(), FEATS)
    x = resid(20)
    assert torch.equal(d.delta(x, d.acts(x)), torch.zeros_like(x)), "targets = current activations must move nothing"


def test_sae_edit_identity_oracle_in_the_sampler(eos_lm, tiny_tokenizer):
    rl = eos_lm(0)
    sae = make_sae()
    d, empty = FeatureDictionary.from_sae(sae, FEATS), FeatureDictionary.from_sae(sae, [])
    plain = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG)
    cases = {"clamp-zero": (d, "clamp", torch.zeros(4), 1.0, None), "add-coef0": (d, "add", torch.full((4,), 9.0), 0.0, None),
             "scale-one": (d, "scale", torch.ones(4), 1.0, -0.5), "no-features": (empty, "add", None, 5.0, None)}
    for name, (dic, mode, t, coef, thr) in cases.items():
        steer = SAEFeatureEdit(rl, dic, mode, t, coef, fire_threshold=thr, gate="detector", detector=_detector(), trace=True)
        same = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
        for f in ("tokens", "mask", "logprobs", "entropy"):
            assert torch.equal(getattr(plain, f), getattr(same, f)), f"{name}: {f} differs from no intervention"
    steer = SAEFeatureEdit(rl, d, "add", torch.full((4,), 1.0), 40.0)
    moved = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    assert not torch.equal(plain.tokens, moved.tokens), "a large add changed nothing: was the hook attached?"
    assert _no_hooks(rl)


def test_site_and_width_mismatch_errors(eos_lm, tiny_lm):
    d = FeatureDictionary.from_sae(make_sae(), FEATS)
    with pytest.raises(FeatureDictionaryError, match=r"the SAE reads blocks\.1\.hook_resid_post; the edit acts at "
                                                     r"blocks\.0\.hook_resid_post.*Fix"):
        d.check_site("blocks.0.hook_resid_post")
    with pytest.raises(FeatureDictionaryError, match="the edit acts at blocks.0"):
        SAEFeatureEdit(eos_lm(0), d, "clamp", site="blocks.0.hook_resid_post")
    wide = FeatureDictionary.from_sae(make_sae(d_in=16, d_sae=24, k=4), [1, 2])
    with pytest.raises(FeatureDictionaryError, match="d_in=16.*d_model=32"):
        SAEFeatureEdit(eos_lm(0), wide, "clamp")
    with pytest.raises(ValueError, match="mode='nudge'"):
        SAEFeatureEdit(eos_lm(0), d, "nudge")
    with pytest.raises(ValueError, match="one finite value per feature"):
        SAEFeatureEdit(eos_lm(0), d, "clamp", torch.zeros(3))
    with pytest.raises(FeatureDictionaryError, match="distinct ids"):
        FeatureDictionary.from_sae(make_sae(), [1, 1])


def test_about_to_fire_edits_exactly_the_features_above_threshold(eos_lm):
    rl = eos_lm(0)
    d = FeatureDictionary.from_sae(make_sae(), FEATS)
    x = resid(60).reshape(3, 20, 32) * 0.5
    pre = d.pre(x)
    thr = pre.median().item()
    t = torch.full((4,), 2.0)
    steer = SAEFeatureEdit(rl, d, "add", t, 1.0, fire_threshold=thr)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1] = False
    out = steer.edit(SITE, x, mask)
    a = pre.relu()
    want = x + d.delta(x, torch.where(pre > thr, a + t, a))
    assert torch.allclose(out[mask], want[mask], atol=1e-6), "edited other features than those about to fire"
    assert torch.equal(out[~mask], x[~mask]), "changed positions outside the gate's mask"
    changed = (out - x).norm(dim=-1)[mask] > 0
    assert 0 < changed.float().mean() < 1, "vacuous: the condition fired everywhere or nowhere"


def test_gate_fires_on_some_decisions_and_hooks_go_away(eos_lm, tiny_tokenizer):
    rl = eos_lm(0)
    d = FeatureDictionary.from_sae(make_sae(), FEATS)
    steer = SAEFeatureEdit(rl, d, "clamp", torch.full((4,), 5.0), 1.0, gate="detector", detector=_detector(), trace=True)
    br = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    fired = steer.trace.dense(CFG.n, CFG.max_new_tokens)["steered"][br.mask]
    assert 0 < fired.float().mean() < 1, f"the detector gate is vacuous here: {fired.float().mean()}"
    assert _no_hooks(rl)
    calls = []

    def exploding(tokens):  # fails at the 4th decision, mid-generation
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return torch.ones(tokens.shape[0], dtype=torch.bool)

    steer = SAEFeatureEdit(rl, d, "add", torch.ones(4), 3.0, gate="planning", planning=exploding)
    with pytest.raises(RuntimeError, match="boom"):
        sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    assert _no_hooks(rl), "a hook survived an exception: later runs would be silently steered"
    assert steer.state is None and steer._pass is None
    with pytest.raises(RuntimeError, match="boom"):
        with SAEFeatureEdit(rl, d, "add", torch.ones(4), 3.0):
            raise RuntimeError("boom")
    assert _no_hooks(rl)


@pytest.mark.parametrize("gate", ["always", "detector"])
def test_a_batch_is_steered_as_its_prompts_one_at_a_time(eos_lm, tiny_tokenizer, gate):
    rl = eos_lm(0)
    d = FeatureDictionary.from_sae(make_sae(), FEATS)
    kw = {"detector": _detector()} if gate == "detector" else {}
    steer = SAEFeatureEdit(rl, d, "add", torch.ones(4), 20.0, fire_threshold=-0.05, gate=gate, **kw)
    batch = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    assert not torch.equal(batch.tokens, sample_branches(rl, tiny_tokenizer, PROMPTS, CFG).tokens), "vacuous edit"
    for i, p in enumerate(PROMPTS):
        alone = sample_branches(rl, tiny_tokenizer, [p], CFG, intervention=steer, prompt_keys=[i])
        rows = slice(i * CFG.n, (i + 1) * CFG.n)
        assert torch.equal(alone.tokens, batch.tokens[rows]), f"gate {gate!r}: prompt {i} alone differs from its batch"
        assert torch.allclose(alone.logprobs, batch.logprobs[rows], atol=1e-5)
    assert _no_hooks(rl)


def test_files_targets_directions_and_gradients(tmp_path):
    sae = make_sae()
    d = FeatureDictionary.from_sae(sae, FEATS)
    back = FeatureDictionary.load(d.save(tmp_path / "dict.safetensors"))
    x = resid(30)
    assert back.features == FEATS and back.hook_name == SITE
    for k in ("W_enc", "b_enc", "b_dec", "W_dec"):  # the promise: a file stores float32 values bit for bit
        assert torch.equal(getattr(back, k), getattr(d, k)), f"{k} changed in the file round trip"
    # not promised bitwise: the loaded rows are contiguous where the folded ones were a transposed view, and a
    # matmul over another memory layout may sum in another order; float32 rounding (1e-5) is the tolerance
    torch.testing.assert_close(back.acts(x), d.acts(x), atol=1e-5, rtol=1e-5,
                               msg="the loaded dictionary reads other activations than the saved one")
    feats, t = diff_targets([{"feature": 3, "mean_base": 0.6, "mean_rl": 0.2}, {"feature": 7, "mean_base": 0.1,
                                                                                 "mean_rl": 0.0}], "scale", cap=4.0)
    assert feats == [3, 7] and torch.allclose(t, torch.tensor([3.0, 4.0])), "scale: ratio of means, capped where RL is 0"
    assert torch.allclose(diff_targets([{"feature": 3, "mean_base": 0.6, "mean_rl": 0.2}], "clamp")[1], torch.tensor([0.6]))
    dirs = decoder_directions(d, ref_norm=7.0)
    assert torch.allclose(dirs.norm(dim=-1), torch.full((4,), 7.0)), "resid_norm rows must have the residual's norm"
    assert torch.allclose(decoder_directions(d, 7.0, combine=True).norm(), torch.tensor(7.0))
    tn = resid_norm_targets(d, 7.0)  # add-mode offsets whose decoder contribution has norm 7 * coef
    one = torch.zeros(4)
    one[1] = tn[1]
    moved = d.delta(x[:1], d.acts(x[:1]) + 0.5 * one)
    assert torch.allclose(moved.norm(), torch.tensor(3.5), atol=1e-4)
    assert torch.allclose(moved[0] / moved.norm(), dirs[1] / 7.0, atol=1e-5)
    gain = torch.full((4,), 1.5, requires_grad=True)  # a learned kind trains through acts / delta
    d.delta(x, d.acts(x) * gain).pow(2).sum().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0, "no gradient reaches per-feature gains"


def test_feature_edits_leave_attention_sinks_as_they_are(eos_lm):
    """A pretrained model's first token carries a vector ~100x the median norm that the SAE never saw
    (`probe.sae.sinks`): feature edits and learned SAE edits leave it alone, and edit the rest."""
    from steering.learned import LearnedEdit

    rl = eos_lm(0)
    d = FeatureDictionary.from_sae(make_sae(), FEATS)
    x = resid(60).reshape(3, 20, 32)
    x[:, 0] *= 100  # the sink at position 0 of every row
    mask = torch.ones(3, 20, dtype=torch.bool)
    out = SAEFeatureEdit(rl, d, "add", torch.full((4,), 2.0), 1.0).edit(SITE, x, mask)
    assert torch.equal(out[:, 0], x[:, 0]), "the sink kept its activation"
    assert (out[:, 1:] - x[:, 1:]).norm(dim=-1).gt(0).all(), "every other position is edited"
    thr = 10 * x[:, 1:].norm(dim=-1).median().item()  # what `steering.learn.sink_thresholds` measures on the model
    lowrank = LearnedEdit(32, [1], "lowrank", rank=2)
    with torch.no_grad():
        for p in lowrank.parameters():
            p.normal_()
    for edit in (LearnedEdit(32, [], "sae", n_positions=3, dictionary=d), lowrank):
        with torch.no_grad():
            if edit.kind == "sae":
                edit.offset.fill_(1.0)
        layer = edit.layers[0]
        free = edit.delta(layer, x, torch.zeros(3, 20, dtype=torch.long))
        edit.sink_thresholds = {str(layer): thr}
        delta = edit.delta(layer, x, torch.zeros(3, 20, dtype=torch.long))
        if edit.kind == "sae":  # a file without thresholds: this forward's sinks (its SAE never saw them)
            assert free[:, 0].abs().max() == 0 and free[:, 1:].norm(dim=-1).gt(0).all()
            edit.sink_thresholds = {str(layer): float("inf")}
            free = edit.delta(layer, x, torch.zeros(3, 20, dtype=torch.long))
            edit.sink_thresholds = {}
        assert free[:, 0].abs().max() > 0, f"vacuous: the {edit.kind} edit reads the sink without a threshold"
        assert delta[:, 0].abs().max() == 0 and torch.equal(delta[:, 1:], free[:, 1:]), \
            f"the {edit.kind} edit leaves the sink alone and nothing else"


def test_a_fixed_sink_threshold_finds_a_sink_the_forwards_own_median_cannot(eos_lm, tmp_path):
    """One decoding row whose new token is a sink: it is its forward's median, so only the SAE
    training's threshold (`sink_threshold_of`, read beside the SAE) tells it apart."""
    import json

    from experiments.study.sae_stage import TRAIN_STATE, sink_threshold_of

    rl, d = eos_lm(0), FeatureDictionary.from_sae(make_sae(), FEATS)
    x = resid(60).reshape(3, 20, 32)
    (tmp_path / "sae").mkdir()
    assert sink_threshold_of(tmp_path / "sae") is None, "an SAE trained elsewhere has no recorded threshold"
    thr = 10 * x.norm(dim=-1).median().item()
    (tmp_path / TRAIN_STATE).write_text(json.dumps({"train": {"sinks_left_out": {"n_sinks": 0, "sink_threshold": thr}}}))
    assert sink_threshold_of(tmp_path / "sae") is None, "a training that found no sinks: nothing to leave out"
    (tmp_path / TRAIN_STATE).write_text(json.dumps({"train": {"sinks_left_out": {"n_sinks": 3, "sink_threshold": thr}}}))
    assert sink_threshold_of(tmp_path / "sae") == thr
    (tmp_path / "other").mkdir()
    assert sink_threshold_of(tmp_path / "other") is None, "the state describes sae/ beside it, no other SAE"
    step = x[:1, :1] * 100  # [1, 1, d]: one row, one new token, a sink
    one = torch.ones(1, 1, dtype=torch.bool)
    per_forward = SAEFeatureEdit(rl, d, "add", torch.full((4,), 2.0), 1.0).edit(SITE, step, one)
    fixed = SAEFeatureEdit(rl, d, "add", torch.full((4,), 2.0), 1.0, sink_threshold=thr).edit(SITE, step, one)
    assert not torch.equal(per_forward, step), "the forward's own median misses the sink (the case this is for)"
    assert torch.equal(fixed, step), "the training threshold leaves the sink alone"
    ordinary = x[:1, 1:2]
    assert not torch.equal(
        SAEFeatureEdit(rl, d, "add", torch.full((4,), 2.0), 1.0, sink_threshold=thr).edit(SITE, ordinary, one), ordinary)
    with pytest.raises(ValueError, match="sink_threshold"):
        SAEFeatureEdit(rl, d, "add", torch.full((4,), 2.0), 1.0, sink_threshold=0.0)
    # the sweep's SAE-edit cells read it beside the SAE they load
    from experiments.study.candidates import sae_edit_cells
    from probe.sae.dictionary import save_sae

    save_sae(make_sae(), tmp_path / "sae")
    diff = tmp_path / "diff.json"
    diff.write_text(json.dumps({"hook_name": SITE, "pruned": [{"feature": f, "mean_base": 1.0, "mean_rl": 0.1}
                                                              for f in FEATS]}))
    (cell,) = sae_edit_cells(["add:4:always"], [1.0], rl, str(tmp_path / "sae"), str(diff), detector="")
    assert cell.make().sink_threshold == thr

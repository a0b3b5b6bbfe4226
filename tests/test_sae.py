"""SAEs (`probe.sae.dictionary`, `probe.sae.quality`) and fork feature diffs (`probe.sae.features`): planted-direction recovery, the
sae-lens on-disk format both ways, splicing against a TransformerLens hook, quality metrics against
brute force, the errors a mismatched SAE raises, `forksight sae` end to end, and the notebook."""

import json
from pathlib import Path

import pytest
import torch
from nbrun import execute_notebook
from sae_lens import SAE
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from saes import random_sae

from probe.entropy import entropy_and_logprob, pair_stats, trajectories_from_branches
from probe.models.hooks import HookSiteError
from probe.models.pair import load_pair, wrap
from probe.sae.dictionary import (
    SAEMismatchError,
    SAESpec,
    check_sae,
    collect_activations,
    load_sae,
    predicting_positions,
    save_sae,
    train_sae,
)
from probe.sae.features import (
    decoder_logit_effects,
    feature_diff,
    rank_features,
    top_contexts,
    top_tokens,
)
from probe.sae.quality import hf_logits, reconstruction_stats, sae_quality, splice
from probe.sampling.sampler import SamplerConfig, sample_branches

ROOT = Path(__file__).resolve().parents[1]
RECOVERY_COS = 0.9  # a planted direction counts as recovered if some decoder row has cosine >= this
RECOVERY_SHARE = 0.9  # ... and at least this share of the planted directions must be recovered


def planted(n: int = 20000, d: int = 32, m: int = 64, per: int = 3, seed: int = 0):
    """n activations, each a sum of `per` of m random unit directions with magnitudes in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, m)
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :per]
    codes.scatter_(1, idx, 0.5 + torch.rand(n, per, generator=g))
    return codes @ dirs, dirs


@pytest.mark.parametrize("arch, extra, n_samples", [("topk", {"k": 4}, 120_000),
                                                    ("standard", {"l1_coefficient": 1.0}, 200_000)])
def test_sae_recovers_planted_sparse_directions(arch, extra, n_samples):
    x, dirs = planted()
    spec = SAESpec(architecture=arch, d_sae=128, lr=3e-3, n_samples=n_samples, batch_size=256,
                   dead_feature_window=100, **extra)
    sae, history = train_sae(x, "blocks.0.hook_resid_post", spec)
    w = sae.W_dec.detach()
    best_cos = (dirs @ (w / w.norm(dim=1, keepdim=True)).T).max(1).values  # [m]
    share = (best_cos >= RECOVERY_COS).float().mean().item()
    assert share >= RECOVERY_SHARE, (
        f"{arch}: only {share:.0%} of planted directions have a decoder row with cosine >= {RECOVERY_COS}; "
        "an SAE that cannot find known features cannot be trusted on real ones")
    rec, _ = reconstruction_stats(sae, x)
    assert rec["fvu"] < 0.3 and history and history[-1]["fvu"] < history[0]["fvu"]
    if arch == "topk":
        assert rec["l0"] <= 4


def test_sae_lens_format_round_trips_both_ways(tmp_path):
    x, _ = planted(n=4096, d=16, m=32)
    sae, _ = train_sae(x, "blocks.1.hook_resid_post", SAESpec(d_sae=32, k=4, n_samples=20 * 256, batch_size=256))
    save_sae(sae, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    theirs = SAE.load_from_disk(tmp_path / "ours")  # sae-lens reads ours
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    # sae-lens converts the training SAE to its inference SAE on the way (save_inference_model): another code
    # path of a third-party library, so not bitwise; float32 rounding (1e-5) is the tolerance
    torch.testing.assert_close(theirs.encode(x[:64]), sae.encode(x[:64]), atol=1e-5, rtol=1e-5,
                               msg="the file must hold the SAE we trained")
    for made in (random_sae(), StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))):
        made.save_model(tmp_path / type(made).__name__)  # sae-lens's own writer
        ours = load_sae(tmp_path / type(made).__name__)
        probe_x = torch.randn(8, 32)
        assert type(ours) is type(made)
        want, got = made.state_dict(), ours.state_dict()  # the promise: a file stores float32 values bit for bit
        assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items()), \
            f"{type(made).__name__}: the weights changed on save/load"
        torch.testing.assert_close(ours(probe_x), made(probe_x), atol=1e-5, rtol=1e-5,
                                   msg="same weights, same class: outputs differ by more than float32 rounding")
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae(tmp_path / "missing")


def test_a_mismatched_sae_gets_a_clear_error(tiny_model):
    tokens = torch.randint(3, 64, (2, 6))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    wide = random_sae(d_in=64)
    with pytest.raises(SAEMismatchError, match=r"SAE d_in=64 does not match 'blocks.0.hook_resid_post' of tiny-qwen2, "
                                               r"which is d_model=32 wide; allowed d_in=32. Fix:"):
        check_sae(wide, tiny_model)
    with pytest.raises(SAEMismatchError, match="SAE d_in=64"), splice(tiny_model, wide):
        pass
    with pytest.raises(SAEMismatchError, match="SAE d_in=64"):
        sae_quality(wide, tiny_model, tokens, mask, mask)
    with pytest.raises(SAEMismatchError, match=r"hook site 'blocks.5.hook_resid_post' does not fit tiny-qwen2.*"
                                               r"layer 5 is out of range for a 2-layer model"):
        check_sae(random_sae(hook="blocks.5.hook_resid_post"), tiny_model)
    with pytest.raises(SAEMismatchError, match="unknown hook site 'blocks.0.hook_resid_mid'.*valid sites"):
        check_sae(random_sae(hook="blocks.0.hook_resid_mid"), tiny_model)
    with pytest.raises(SAEMismatchError, match="no hook_name.*Fix: pass hook_name="):
        check_sae(random_sae(hook=None), tiny_model)
    assert check_sae(random_sae(hook=None), tiny_model, "blocks.1.hook_resid_post").layer == 1
    with pytest.raises(HookSiteError, match="cannot splice at 'ln_final.hook_normalized'"), \
            splice(tiny_model, random_sae(hook="ln_final.hook_normalized")):
        pass


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"])
def test_splice_equals_a_transformer_lens_hook(tiny_lm, tiny_tokenizer, site, tmp_path):
    """Oracle: our torch hook on the HF module vs TransformerLens's own hook point."""
    from transformers import PreTrainedTokenizerFast

    tiny_tokenizer.save_pretrained(tmp_path)  # TransformerLens re-loads a tokenizer by its path
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    model = wrap(tiny_lm("qwen2"), tok, backend="transformer_lens", device="cpu")
    sae = random_sae(k=8, hook=site)
    tokens = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, 6:] = False  # a padded row
    with torch.inference_mode():
        clean = hf_logits(model, tokens, mask)
        with splice(model, sae):
            ours = hf_logits(model, tokens, mask)
        tl = model.model.run_with_hooks(tokens, attention_mask=mask.long(), fwd_hooks=[(site, lambda a, hook: sae(a))])
        after = hf_logits(model, tokens, mask)
        sae.use_error_term = True
        with splice(model, sae):
            with_error = hf_logits(model, tokens, mask)
    assert torch.allclose(ours[mask], tl.float()[mask], atol=1e-4), "splice must equal TransformerLens's hook"
    assert not torch.allclose(ours, clean, atol=1e-3), "a random SAE must change the logits"
    assert torch.equal(after, clean), "the hook must be removed on exit"
    assert torch.allclose(with_error, clean, atol=1e-4), "reconstruction + error term must be the identity"


def test_collect_activations_matches_pair_stats_residuals(tiny_lm, tiny_tokenizer):
    tok = tiny_tokenizer
    pair = load_pair((tiny_lm("qwen2", 0), tok), (tiny_lm("qwen2", 1), tok), backend="nnsight", device="cpu")
    branches = sample_branches(pair.base.hf, tok, ["w5 w6 w7", "w9 w3"], SamplerConfig(n=3, max_new_tokens=5, device="cpu"))
    traj = trajectories_from_branches(branches, pad_id=0)
    ref = pair_stats(pair, traj, resid_layers=[1]).resid[1]
    ours = collect_activations(pair.rl, traj.tokens, traj.attention_mask, predicting_positions(traj.answer_mask),
                               "blocks.1.hook_resid_post", batch_size=4)
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-6), "same rows, same alignment as pair_stats"


def test_quality_metrics_equal_brute_force(tiny_model):
    sae = random_sae(hook="blocks.1.hook_resid_post")
    tokens = torch.randint(3, 64, (4, 8))
    attn = torch.ones_like(tokens, dtype=torch.bool)
    attn[1, 5:] = False
    answer = attn.clone()
    answer[:, :3] = False
    q, freq = sae_quality(sae, tiny_model, tokens, attn, answer, batch_size=3)
    with torch.inference_mode():
        logits, acts = tiny_model.run_with_sites(tokens, ["blocks.1.hook_resid_post"], attn.long())
        x = acts["blocks.1.hook_resid_post"][attn]
        f = sae.encode(x)
        fvu = ((x - sae.decode(f)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        nll = -entropy_and_logprob(logits, tokens)[1][answer].mean()
    assert q["n_tokens"] == int(attn.sum()) and q["n_answer_tokens"] == int(answer.sum())
    assert q["l0"] == pytest.approx((f > 0).sum(-1).float().mean().item())
    assert q["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert q["dead_fraction"] == pytest.approx(((f > 0).sum(0) == 0).float().mean().item())
    assert torch.allclose(freq, (f > 0).float().mean(0))
    assert q["ce_loss_clean"] == pytest.approx(nll.item(), rel=1e-4), "clean loss must match the model's own logits"
    assert q["ce_loss_increase"] == pytest.approx(q["ce_loss_spliced"] - q["ce_loss_clean"])
    gap = q["ce_loss_mean_ablated"] - q["ce_loss_clean"]
    want = (q["ce_loss_mean_ablated"] - q["ce_loss_spliced"]) / gap if gap > 0 else None  # random model: no gap
    assert q["ce_loss_recovered"] == (pytest.approx(want) if want is not None else None)


def test_feature_diff_ranks_planted_pruned_and_amplified_features():
    n, forks = 1000, torch.arange(1000) < 500
    base, rl = torch.zeros(n, 6), torch.zeros(n, 6)
    base[:500, 0] = 1.0  # pruned: always on at base forks, silent in RL
    base[:50, 1] = 2.0  # pruned, silent in RL, but rarer: ranks after feature 0
    base[:500, 2], rl[:500, 2] = 1.0, 0.5  # pruned by half: r = -1/3
    rl[:100, 3] = 1.0  # amplified: new in RL
    base[:5, 4] = 1.0  # pruned but on 1% of forks < min_freq: not listed
    base[:, 5] = rl[:, 5] = 3.0  # unchanged
    base[500:, 0] = rl[500:, 0] = 1.0  # off forks feature 0 is unchanged (the control sees 0)
    diff = feature_diff(base, rl, forks)
    assert diff.n_tokens == 500 and diff.freq_base[0] == 1 and diff.freq_rl[0] == 0
    assert diff.score[2].item() == pytest.approx(-1 / 3) and diff.score[5] == 0
    assert rank_features(diff, "pruned", min_freq=0.02) == [0, 1, 2]
    assert rank_features(diff, "amplified", min_freq=0.02) == [3]
    assert rank_features(diff, "pruned", min_freq=0.0)[:4] == [0, 1, 4, 2], "no floor: rare feature 4 joins at r=-1"
    assert feature_diff(base, rl, ~forks).score[0] == 0
    with pytest.raises(ValueError, match="direction='lost'; allowed"):
        rank_features(diff, "lost")
    with pytest.raises(ValueError, match="no tokens selected"):
        feature_diff(base, rl, torch.zeros(n, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, 6, generator=g).relu_() - 0.3, torch.rand(n, 6, generator=g) - 0.5
    one, chunked = feature_diff(a, b, forks, chunk=n), feature_diff(a, b, forks, chunk=7)
    for k in ("freq_base", "freq_rl", "mean_base", "mean_rl", "score"):
        assert torch.allclose(getattr(one, k), getattr(chunked, k), atol=1e-6), f"{k}: chunking changed the diff"


def test_top_contexts_merge_shared_prefixes_and_count_branches(tiny_tokenizer):
    tokens = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8], [5, 3, 4, 8]])
    positions = torch.tensor([[0, 1], [1, 1], [2, 1], [0, 2]])  # rows 0, 1 share the prefix "w5 w6"
    acts = torch.tensor([2.0, 2.0, 1.0, 0.0])
    recs = top_contexts(acts, positions, tokens, tiny_tokenizer, k=5, extra={"flag": torch.tensor([1, 1, 0, 0])})
    assert [r["context"] for r in recs] == ["w5w6", "w5w3"], "distinct prefixes, highest first; inactive dropped"
    assert recs[0]["next_tokens"] == {"w7": 1, "w9": 1} and recs[0]["n_occurrences"] == 2 and recs[0]["flag"] == 1


def test_decoder_logit_effect_equals_final_norm_then_unembedding(tiny_lm):
    hf = tiny_lm("qwen2")
    with torch.no_grad():
        hf.model.norm.weight.uniform_(0.5, 1.5)  # a non-trivial norm weight
    sae = random_sae()
    feats = [0, 5, 7]
    eff = decoder_logit_effects(sae, hf, feats)
    raw = decoder_logit_effects(sae, hf, feats, through_final_norm=False)
    d = sae.W_dec.detach()[feats]
    d = d / d.norm(dim=1, keepdim=True)
    with torch.no_grad():
        brute = hf.lm_head(hf.model.norm(d))  # the real modules; norm(d) = weight * d / rms(d)
    brute = brute - brute.mean(-1, keepdim=True)
    rms = (d.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps).sqrt()
    assert torch.allclose(eff / rms, brute, atol=1e-5), "effect = centred logits of the final norm of d, up to 1/rms"
    plain = d @ hf.lm_head.weight.T
    assert torch.allclose(raw, plain - plain.mean(-1, keepdim=True), atol=1e-6)
    top = top_tokens(eff[0], type("T", (), {"convert_ids_to_tokens": lambda self, i: f"t{i}"})(), k=2, exclude=[0])
    assert len(top["promotes"]) == 2 and "t0" not in [t for t, _ in top["promotes"] + top["suppresses"]]
    assert top["promotes"][0][1] == pytest.approx(eff[0][1:].max().item())


@pytest.fixture(scope="module")
def organism_pair(tmp_path_factory):
    from experiments.training.model import OrganismConfig, build_organism, save_checkpoint

    root = tmp_path_factory.mktemp("pair")
    for name, seed, depth in (("base", 0, 2), ("rl", 1, 2), ("wide", 2, 3)):
        model, tok = build_organism(OrganismConfig(depth=depth), seed=seed)
        save_checkpoint(model, tok, root / name)
    return root


def test_sae_train_and_diff_end_to_end(organism_pair, tmp_path, monkeypatch):
    from experiments.cli import build_parser
    from experiments.study.sae_stage import (
        SAEDiffConfig,
        SAETrainConfig,
        run_sae_diff,
        run_sae_train,
    )

    parser = build_parser()
    common = ["--base", str(organism_pair / "base"), "--rl", str(organism_pair / "rl"), "--backend", "nnsight",
              "--device", "cpu"]
    train_argv = ["sae", "train", *common, "--layer", "1", "--d-sae", "64", "--k", "8", "--train-samples", "5120",
                  "--sae-batch-size", "256", "--n-train-problems", "24", "--samples", "2", "--rl-mix", "0.25",
                  "--n-eval-problems", "6", "--eval-samples", "2"]
    args = parser.parse_args([*train_argv, "--out", str(tmp_path / "t")])
    head = args.func(args)
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert head["hook_name"] == metrics["hook_name"] == "blocks.1.hook_resid_post"
    for name in ("base", "rl"):
        q = metrics["quality"][name]
        assert q["l0"] <= 8 and 0 <= q["fvu"] and 0 <= q["dead_fraction"] <= 1 and q["ce_loss_spliced"] > 0
    assert metrics["train"]["n_problems_from_rl"] == 6 and metrics["target"]["l0_max"] == 32
    for f in ("sae/cfg.json", "sae/sae_weights.safetensors", "sae_training.png", "feature_density.png"):
        assert (tmp_path / "t" / f).stat().st_size > 0, f"{f} missing"
    assert SAE.load_from_disk(tmp_path / "t" / "sae").cfg.d_sae == 64
    # interrupted after training (metrics.json not yet written): the rerun scores the saved SAE, trains nothing
    import experiments.study.sae_stage as stage

    (tmp_path / "t" / "metrics.json").unlink()
    weights = (tmp_path / "t" / "sae" / "sae_weights.safetensors").read_bytes()

    def no_training(*a, **k):
        raise AssertionError("the SAE was trained again although train_state.json matched")

    monkeypatch.setattr(stage, "train_sae", no_training)
    args.func(args)
    again = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert again["train"]["resumed_after_training"] and not metrics["train"]["resumed_after_training"]
    assert again["fvu"] == metrics["fvu"] and again["train"]["n_activations"] == metrics["train"]["n_activations"]
    assert (tmp_path / "t" / "sae" / "sae_weights.safetensors").read_bytes() == weights
    other = stage.SAETrainConfig(**{**metrics["config"], "k": 4, "out": str(tmp_path / "t")})
    assert stage._trained(other, tmp_path / "t") is None, "another k is another SAE: train it"
    monkeypatch.undo()
    # interrupted while training: the sampled trajectories wait on disk, the rerun does not sample them again
    crash = parser.parse_args([*train_argv, "--out", str(tmp_path / "u")])

    def power_cut(*a, **k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(stage, "train_sae", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        crash.func(crash)
    assert sorted(p.name for p in (tmp_path / "u").glob(".trajectories-*")) == [".trajectories-base.safetensors",
                                                                               ".trajectories-rl.safetensors"]
    monkeypatch.undo()
    calls = []
    real = stage.sample_trajectories
    monkeypatch.setattr(stage, "sample_trajectories", lambda *a, **k: calls.append(1) or real(*a, **k))
    crash = parser.parse_args([*train_argv, "--out", str(tmp_path / "u"), "--activation-memory-gb", "3"])
    crash.func(crash)  # another memory budget (the usual fix after an OOM) still reuses the samples
    resumed = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert len(calls) == 2, "only the scoring samples (base and RL); the training trajectories came from disk"
    assert resumed["fvu"] == pytest.approx(metrics["fvu"]) and not list((tmp_path / "u").glob(".trajectories-*"))
    monkeypatch.undo()
    args = parser.parse_args(["sae", "diff", *common, "--sae", str(tmp_path / "t" / "sae"), "--out", str(tmp_path / "d"),
                              "--n-problems", "6", "--samples", "3", "--min-freq", "0", "--top", "3", "--n-contexts", "2"])
    head = args.func(args)
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["n_forks"] > 0 and head["n_forks"] == m["n_forks"] and m["pruned"] and m["amplified"]
    for rec in m["pruned"]:
        assert rec["score"] < 0 and rec["logit_effect"]["promotes"] and rec["contexts"]
    assert (tmp_path / "d" / "fork_frequencies.png").exists() and (tmp_path / "d" / "top_features.png").exists()
    wide = str(organism_pair / "wide")  # d_model 96: the SAE (d_in 64) belongs to another model
    with pytest.raises(SAEMismatchError, match="SAE d_in=64 does not match 'blocks.1.hook_resid_post' of .*d_model=96"):
        run_sae_diff(SAEDiffConfig(base=wide, rl=wide, out=str(tmp_path / "x"),
                                   sae=str(tmp_path / "t" / "sae"), backend="nnsight", device="cpu", n_problems=2))
    with pytest.raises(HookSiteError, match="layer 7 is out of range"):
        run_sae_train(SAETrainConfig(base=str(organism_pair / "base"), rl="", layer=7, out=str(tmp_path / "y"),
                                     device="cpu", backend="nnsight"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists(), "bad input must fail before writing"


@pytest.mark.slow
def test_feature_inspection_notebook_executes(tmp_path):
    """The notebook on the shipped pair and the shipped SAE in quick mode: it must not rot."""
    text = execute_notebook("feature_inspection.ipynb", tmp_path)
    assert "pruned" in text and "text-decoration: underline" in text, "the notebook must list features and mark forks"


def test_shipped_sae_meets_the_quality_target_and_fits_the_shipped_pair():
    """The committed real run (experiments/results/sae): its numbers and its SAE must stay consistent."""
    from experiments.paths import ORGANISMS_DIR
    from probe.models.checkpoint import load_causal_lm

    results = ROOT / "experiments" / "results" / "sae"
    m = json.loads((results / "metrics.json").read_text())
    assert m["fvu"] <= 0.2 and m["l0"] <= 32 and m["target"]["met"], "the default-layer SAE must reach FVU <= 0.2 at L0 <= 32"
    for k in ("dead_fraction", "ce_loss_increase"):
        assert m[k] is not None and m["quality"]["base"][k] == m[k]
    sae = load_sae(results / "sae")
    hf, tok = load_causal_lm(ORGANISMS_DIR / "base", device="cpu")
    assert check_sae(sae, wrap(hf, tok, backend="nnsight", device="cpu")).name == m["hook_name"]
    diff = json.loads((results / "diff" / "metrics.json").read_text())
    assert diff["pruned"] and all(f["score"] < 0 and f["freq_base"] >= diff["summary"]["min_freq"] for f in diff["pruned"])
    assert [f["score"] for f in diff["pruned"]] == sorted(f["score"] for f in diff["pruned"]), "ranked, most pruned first"

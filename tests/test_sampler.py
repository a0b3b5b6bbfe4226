"""Oracle tests for probe.sampling.sampler: every fast path against a slow reference it must equal."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from probe.sampling.sampler import (
    Branches,
    NonFiniteLogitsError,
    SamplerConfig,
    SamplingState,
    sample_branches,
)

ARCHS = ["qwen2", "llama", "gpt2"]
EOS, PAD = 1, 0
PROMPTS = ["w3 w4 w5", "w9", "w10 w11 w12 w13 w14 w15", "w20 w21", "w7 w8 w30 w31"]


def completion(b: Branches, row: int) -> list[int]:
    return b.tokens[row][b.mask[row]].tolist()


def greedy_uncached(model, prompt: list[int], steps: int, with_logprobs: bool = False):
    """The slow reference: full forward over the whole sequence at every step, no cache."""
    seq, out, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logp = model(torch.tensor([seq]), use_cache=False).logits[0, -1].log_softmax(-1)
            nxt = int(logp.argmax())
            out.append(nxt)
            logprobs.append(float(logp[nxt]))
            seq.append(nxt)
            if nxt == EOS:
                break
    return (out, torch.tensor(logprobs)) if with_logprobs else out


def boost_eos(model, bias: float):
    """Make eos likelier (a permanent lm_head hook) so rows finish at different steps."""
    def hook(mod, args, out):
        out = out.clone()
        out[..., EOS] += bias
        return out
    model.get_output_embeddings().register_forward_hook(hook)
    return model


@contextmanager
def add_to_layer(model, state: SamplingState, vec: torch.Tensor, layer: int = 1, log=None):
    """A steering intervention: adds `vec` to a decoder layer's output at every position."""
    def hook(mod, args, out):
        if log is not None:
            log.append((state.phase, state.step, state.row_ids.clone(), state.tokens.clone()))
        return out + vec
    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def decoder_layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


# 1. cached vs uncached --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_uncached(tiny_lm, tiny_tokenizer, arch):
    model = boost_eos(tiny_lm(arch), 0.5)
    b = sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(max_new_tokens=12, temperature=0))
    for i, p in enumerate(b.prompt_tokens):
        ref, ref_logprobs = greedy_uncached(model, p, 12, with_logprobs=True)
        why = (f"{arch} prompt {i}: KV-cached greedy differs from full recomputation; the cache, "
               "positions or padding mask is wrong, so every measurement built on samples is too")
        assert completion(b, i) == ref, why
        torch.testing.assert_close(b.logprobs[i][b.mask[i]], ref_logprobs, atol=1e-5, rtol=0, msg=why)


def test_steered_cached_equals_steered_uncached(tiny_lm, tiny_tokenizer):
    model = tiny_lm("qwen2")
    vec = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 2
    b = sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(max_new_tokens=10, temperature=0),
                        intervention=lambda s: add_to_layer(model, s, vec))
    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: out + vec)
    try:
        ref = [greedy_uncached(model, p, 10) for p in b.prompt_tokens]
    finally:
        handle.remove()
    for i in range(len(PROMPTS)):
        assert completion(b, i) == ref[i], (
            f"prompt {i}: a hook steering every position gives different tokens through the KV "
            "cache than through full recomputation; position-relative interventions would be wrong")


# 2. equals HF generate ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_generate(tiny_lm, tiny_tokenizer, arch):
    model = boost_eos(tiny_lm(arch), 0.5)
    b = sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(max_new_tokens=12, temperature=0))
    for i, p in enumerate(b.prompt_tokens):
        ids = torch.tensor([p])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, pad_token_id=PAD, eos_token_id=EOS)
        assert completion(b, i) == gen[0, len(p):].tolist()[: len(completion(b, i))], (
            f"{arch} prompt {i}: greedy differs from transformers generate(do_sample=False)")
        assert b.finish_reason[i] == ("eos" if EOS in gen[0, len(p):].tolist() else "length")


# 3. interventions ---------------------------------------------------------------------------------

def test_zero_hook_is_identity_and_nonzero_hook_steers(tiny_lm, tiny_tokenizer):
    model = tiny_lm("qwen2")
    cfg = SamplerConfig(n=3, max_new_tokens=10, seed=3)
    plain = sample_branches(model, tiny_tokenizer, PROMPTS, cfg)
    vec = torch.randn(32, generator=torch.Generator().manual_seed(0))
    zero = sample_branches(model, tiny_tokenizer, PROMPTS, cfg,
                           intervention=lambda s: add_to_layer(model, s, 0 * vec))
    for name in ("tokens", "mask", "logprobs", "entropy"):
        assert torch.equal(getattr(plain, name), getattr(zero, name)), (
            f"{name}: a zero steering vector changed the samples; steering effects would be confounded "
            "with the intervention machinery itself")
    steered = sample_branches(model, tiny_tokenizer, PROMPTS, cfg,
                              intervention=lambda s: add_to_layer(model, s, 3 * vec))
    assert not torch.equal(plain.tokens, steered.tokens), "a large steering vector had no effect"
    assert not model.model.layers[1]._forward_hooks, "the steering hook was left registered"


def test_hook_removed_when_generation_raises(tiny_lm, tiny_tokenizer):
    model = tiny_lm("qwen2")
    calls = []

    def boom(mod, args, out):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return out

    model.model.layers[0].register_forward_hook(boom)
    model.train()
    vec = torch.zeros(32)
    with pytest.raises(RuntimeError, match="injected failure"):
        sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(max_new_tokens=8),
                        intervention=lambda s: add_to_layer(model, s, vec))
    assert not model.model.layers[1]._forward_hooks, (
        "the intervention's hook survived an exception: later runs would be silently steered")
    assert model.training, "the model's train/eval mode must be restored after an exception"


def test_state_seen_by_intervention(tiny_lm, tiny_tokenizer):
    model = boost_eos(tiny_lm("qwen2"), 2.0)
    log = []
    cfg = SamplerConfig(n=2, max_new_tokens=12, batch_size=6)
    b = sample_branches(model, tiny_tokenizer, PROMPTS, cfg,
                        intervention=lambda s: add_to_layer(model, s, torch.zeros(32), log=log))
    phases = [(p, s) for p, s, _, _ in log]
    assert phases.count(("prompt", -1)) == 2, "one prefill per row batch (10 rows, batch_size 6)"
    for phase, step, rows, toks in log:
        if phase == "prompt":
            assert (rows == -1).all(), "prompt-phase items stand for whole prompts"
            continue
        assert toks.shape == (len(rows), step + 1), "state.tokens holds the generated tokens so far"
        assert torch.equal(toks, b.tokens[rows, : step + 1]), "state.tokens disagrees with the output"
    sizes = [len(r) for p, _, r, _ in log if p == "generate"]
    assert min(sizes) < max(sizes), "finished rows should have been dropped from the forward batch"


def test_intervention_context_is_entered_once_and_state_updated_before_every_forward(tiny_lm, tiny_tokenizer):
    """The documented contract: `intervention(state)` is called once per sample_branches call, its
    context entered once around all forward passes, `state` updated in place before each of them."""
    from contextlib import contextmanager

    model = boost_eos(tiny_lm("qwen2"), 2.0)
    calls, entered, seen = [], [], []

    def intervention(state):
        calls.append(state)

        @contextmanager
        def ctx():
            entered.append(1)
            h = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append((state.phase, state.step)))
            try:
                yield
            finally:
                h.remove()
        return ctx()

    cfg = SamplerConfig(n=2, max_new_tokens=5, batch_size=6)
    sample_branches(model, tiny_tokenizer, PROMPTS, cfg, intervention=intervention)
    assert len(calls) == 1 and len(entered) == 1, "one call and one entry per sample_branches call"
    forwards = [(p, s) for p, s in seen]
    assert forwards.count(("prompt", -1)) == 2 and ("generate", 0) in forwards
    steps = [s for p, s in forwards if p == "generate"]
    assert steps == sorted(steps) or steps.count(0) == 2, "each forward sees the step it reads, updated in place"


# 4-6. batching, padding and seeds ---------------------------------------------------------------

def test_batched_equals_one_prompt_at_a_time(tiny_lm, tiny_tokenizer):
    model = boost_eos(tiny_lm("qwen2"), 1.5)  # rows finish early: exercises dropping finished rows
    cfg = SamplerConfig(n=4, max_new_tokens=10, top_k=20, top_p=0.9, seed=7, batch_size=7)
    full = sample_branches(model, tiny_tokenizer, PROMPTS, cfg)
    assert set(full.finish_reason) == {"eos", "length"}, "want rows finishing at different steps"
    for i, p in enumerate(PROMPTS):
        alone = sample_branches(model, tiny_tokenizer, [p], cfg, prompt_keys=[i])
        rows = slice(4 * i, 4 * i + 4)
        assert torch.equal(alone.tokens, full.tokens[rows]), (
            f"prompt {i}: samples depend on what else is in the batch; results would change with "
            "batch_size or with the prompt set")
        torch.testing.assert_close(alone.logprobs, full.logprobs[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.entropy, full.entropy[rows], atol=1e-5, rtol=0)
    one_row = sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(**{**vars(cfg), "batch_size": 1}))
    assert torch.equal(one_row.tokens, full.tokens), "batch_size=1 (no cache expansion) differs"


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_unpadded_runs(tiny_lm, tiny_tokenizer, arch):
    model = tiny_lm(arch)
    cfg = SamplerConfig(max_new_tokens=12, temperature=0)
    padded = sample_branches(model, tiny_tokenizer, PROMPTS, cfg)
    for i, p in enumerate(PROMPTS):
        alone = sample_branches(model, tiny_tokenizer, [p], cfg)
        assert torch.equal(alone.tokens[0], padded.tokens[i]), (
            f"{arch} prompt {i} (length {len(padded.prompt_tokens[i])}): left padding changed greedy "
            "tokens; position_ids or the attention mask of padded rows is wrong")
        torch.testing.assert_close(alone.entropy[0], padded.entropy[i], atol=1e-5, rtol=0)


def test_seeds(tiny_lm, tiny_tokenizer):
    model = tiny_lm("qwen2")
    runs = [sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(n=4, max_new_tokens=12, seed=s))
            for s in (0, 0, 1)]
    assert torch.equal(runs[0].tokens, runs[1].tokens), "same seed must reproduce samples exactly"
    assert torch.equal(runs[0].logprobs, runs[1].logprobs), "same seed must reproduce logprobs exactly"
    assert not torch.equal(runs[0].tokens, runs[2].tokens), "a different seed gave the same samples"
    b = runs[0]
    assert b.tokens.shape == (20, 12) and b.prompt_index.tolist() == [i for i in range(5) for _ in range(4)]
    assert b.sample_index.tolist() == list(range(4)) * 5, "rows must be prompt-major: i * n + j"
    assert not torch.equal(b.tokens[0], b.tokens[1]), "samples of one prompt should differ"


# 8. bad inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("n", 0), ("max_new_tokens", 0), ("temperature", -1.0),
                                         ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("seed", -1),
                                         ("batch_size", 0), ("n", 2.0)])
def test_bad_config_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"SamplerConfig\.{field}={value!r}.*allowed.*Fix"):
        SamplerConfig(**{field: value})


def test_bad_prompts(tiny_lm, tiny_tokenizer):
    model, cfg = tiny_lm("qwen2"), SamplerConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts=\[\].*non-empty"):
        sample_branches(model, tiny_tokenizer, [], cfg)
    with pytest.raises(ValueError, match=r"prompt 1 \(''\) has no tokens"):
        sample_branches(model, tiny_tokenizer, ["w3", ""], cfg)
    with pytest.raises(ValueError, match=r"prompt 0 \(\[\]\) has no tokens"):
        sample_branches(model, tiny_tokenizer, [[]], cfg)
    with pytest.raises(ValueError, match=r"wrap a single prompt"):
        sample_branches(model, tiny_tokenizer, "w3 w4", cfg)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 64\)"):
        sample_branches(model, tiny_tokenizer, [[3, 99]], cfg)
    with pytest.raises(ValueError, match=r"prompt_keys has 1 keys for 2 prompts"):
        sample_branches(model, tiny_tokenizer, ["w3", "w4"], cfg, prompt_keys=[0])
    with pytest.raises(ValueError, match=r"resolves to meta.*model is on cpu"):
        sample_branches(model, tiny_tokenizer, ["w3"], SamplerConfig(device="meta"))


def test_tokenizer_specials(tiny_lm, tiny_tokenizer):
    model = tiny_lm("qwen2")
    no_eos = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    with pytest.raises(ValueError, match=r"eos_token_id=None.*Fix: set tokenizer.eos_token"):
        sample_branches(model, no_eos, [[3]], SamplerConfig())
    no_pad = SimpleNamespace(eos_token_id=EOS, pad_token_id=None)
    b = sample_branches(boost_eos(model, 3.0), no_pad, [[3, 4]], SamplerConfig(n=8, max_new_tokens=16))
    assert "eos" in b.finish_reason
    assert (b.tokens[~b.mask] == EOS).all(), "without a pad token, padding falls back to eos"


def test_nan_logits_name_prompt_and_step(tiny_lm, tiny_tokenizer):
    model = tiny_lm("qwen2")
    forward = model.forward
    calls = []

    def poisoned(*args, **kwargs):  # NaN for prompt 2's rows (n=2 -> rows 4, 5) at step 3
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            out.logits[4:6] = float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(NonFiniteLogitsError, match=r"prompt index\(es\) \[2\] at step 3"):
        sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(n=2, max_new_tokens=8))
    model.forward = forward
    calls.clear()

    def poisoned_prefill(*args, **kwargs):  # NaN for the prompt containing w7 (prompt 4), step 0
        out = forward(*args, **kwargs)
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:
            out.logits[(ids == 7).any(-1)] = float("inf")
        return out

    model.forward = poisoned_prefill
    with pytest.raises(NonFiniteLogitsError, match=r"prompt index\(es\) \[4\] at step 0"):
        sample_branches(model, tiny_tokenizer, PROMPTS, SamplerConfig(n=3, temperature=0))


def test_position_ids_count_each_rows_real_tokens_from_zero_on_either_padding_side():
    from probe.models.kv_cache import position_ids

    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[True, True, True, False, False]])
    assert position_ids(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids(right).tolist() == [[0, 1, 2, 2, 2]]
    assert position_ids(right).dtype == torch.long



def test_logits_to_keep_is_found_through_a_peft_wrapper(tiny_lm):
    """`takes_logits_to_keep` looks through peft (PeftModel.forward takes **kwargs), so the GRPO loss and
    the learned-edit trainer ask a LoRA-wrapped model for the logits they read only."""
    from peft import LoraConfig, get_peft_model

    from probe.models.kv_cache import takes_logits_to_keep

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    peft_model = get_peft_model(tiny_lm("qwen2"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert "logits_to_keep" not in __import__("inspect").signature(type(peft_model).forward).parameters
    assert takes_logits_to_keep(peft_model) and takes_logits_to_keep(peft_model.get_base_model())
    assert not takes_logits_to_keep(NoKeep())

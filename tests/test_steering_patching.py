"""Cross-model patching while sampling: alpha 0 is the identity, alpha 1 at every token makes the RL
model's layer-L residual the base model's on the same prefix (the shadow's KV cache is in step)."""

import pytest
import torch

from probe.sampling.sampler import SamplerConfig, sample_branches
from steering import patch

PROMPTS = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
CFG = SamplerConfig(n=3, max_new_tokens=8, batch_size=4, seed=2, device="cpu")


@pytest.mark.parametrize("gate,kwargs", [("always", {"where": "all"}), ("base_entropy", {"threshold": 1.8}),
                                         ("entropy", {"threshold": 1.8})])
def test_patching_alpha_zero_equals_no_patching(eos_lm, tiny_tokenizer, gate, kwargs):
    rl, base = eos_lm(0), eos_lm(1)
    plain = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG)
    zero = patch(rl, base, layers=1, alpha=0.0, gate=gate, trace=True, **kwargs)
    patched = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=zero)
    for f in ("tokens", "mask", "logprobs", "entropy"):
        assert torch.equal(getattr(plain, f), getattr(patched, f)), f"{f}: alpha 0 ({gate}) changed sampling"
    assert zero.trace.dense(CFG.n, CFG.max_new_tokens)["steered"][plain.mask].any(), "the gate never fired"
    half = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=patch(rl, base, 1, 0.5, gate=gate, **kwargs))
    assert not torch.equal(plain.tokens, half.tokens), "alpha 0.5 changed nothing: was the patch applied?"
    assert not any(m._forward_hooks or m._forward_pre_hooks for x in (rl, base) for m in x.modules())


@pytest.mark.parametrize("layer", [0, 1])
def test_patching_alpha_one_makes_the_layer_residual_the_base_residual(eos_lm, tiny_tokenizer, layer):
    rl, base = eos_lm(0), eos_lm(1)
    seen = []  # (step, ids, activation) of the RL model's layer output, after the patch
    with patch(rl, base, layers=layer, alpha=1.0, where="all") as p:
        def grab_hook(module, args, out):
            st = p.state
            seen.append((st.step, (st.prompt_index if st.phase == "prompt" else st.row_ids).clone(), out.clone()))

        grab = rl.model.layers[layer].register_forward_hook(grab_hook)
        later = [base.lm_head, *base.model.layers[layer + 1:]]  # what a shadow that reads one residual skips
        ran = [m.register_forward_hook(lambda m, a, o: seen_later.append(m)) for m in later]
        seen_later = []
        try:
            branches = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=p)
        finally:
            for h in (grab, *ran):
                h.remove()
    assert not seen_later, "the base ran past the patched layer: patching reads its residual there only"
    lengths = branches.mask.sum(1).tolist()
    assert len(set(lengths)) > 1, "rows should end at different steps (rows get dropped)"
    # reassemble each row's patched residual: its prompt's prefill, then every generated token it read
    prompt_act, gen = {}, [[] for _ in lengths]
    for step, ids, act in seen:
        for k, i in enumerate(ids.tolist()):
            if step == -1:  # a prompt may be prefilled in two row batches: same values
                prompt_act[i] = act[k, act.shape[1] - len(branches.prompt_tokens[i]) :]
            elif step < lengths[i] - 1:  # finished rows can ride along until dropped: skip those
                gen[i].append(act[k])
    base_acts = []
    hook = base.model.layers[layer].register_forward_hook(lambda m, a, out: base_acts.append(out))
    try:
        for r in range(len(lengths)):
            prompt = branches.prompt_tokens[int(branches.prompt_index[r])]
            seq = torch.tensor(prompt + branches.tokens[r][branches.mask[r]].tolist())[None]
            with torch.inference_mode():
                base(seq[:, :-1])  # the last token is never read by the sampler
            want = base_acts.pop()[0]
            got = torch.cat([prompt_act[int(branches.prompt_index[r])], *gen[r]])
            assert got.shape == want.shape, f"row {r}: {got.shape} patched positions vs {want.shape}"
            assert torch.allclose(got, want, atol=1e-5), (
                f"row {r}: the patched RL residual at layer {layer} is not the base's on the same prefix "
                f"(max diff {(got - want).abs().max():.2e}): the shadow's cache is out of step")
    finally:
        hook.remove()
    with torch.inference_mode():  # and the patch is not vacuous: unpatched, the two models differ there
        seq = torch.tensor([branches.prompt_tokens[0]])
        a = rl(seq, output_hidden_states=True).hidden_states[layer + 1]
        b = base(seq, output_hidden_states=True).hidden_states[layer + 1]
    assert not torch.allclose(a, b, atol=1e-3)


def test_the_memory_budget_counts_the_shadows_kv_cache(eos_lm, tiny_tokenizer, monkeypatch):
    from probe.models import budget

    rl, base = eos_lm(0), eos_lm(1)
    p = patch(rl, base, layers=1, alpha=1.0, where="all")
    assert p.kv_models == (base,), "patching runs the base in step: its KV cache is the sampler's to budget"
    alone, both = budget.sampling_rows(rl, 20, budget=10**7), budget.sampling_rows(rl, 20, budget=10**7, extra_models=(base,))
    assert both < alone and abs(2 * both - alone) <= 2, "two equal models' caches: half the rows"
    full = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=patch(rl, base, 1, 1.0, where="all"))
    rows = []
    handle = rl.get_input_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    length = max(len(tiny_tokenizer(x).input_ids) for x in PROMPTS) + CFG.max_new_tokens  # what the sampler budgets
    per_pair = budget.sampling_rows(rl, length, budget=10**12, extra_models=(base,))
    monkeypatch.setenv("FORKSIGHT_MEMORY_GB", str(2.5 * 10**12 / per_pair / 2**30))  # two rows of both caches
    assert budget.sampling_rows(rl, length) >= 4, "the RL model alone would take twice as many rows"
    try:
        small = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=patch(rl, base, 1, 1.0, where="all"))
    finally:
        handle.remove()
    assert max(rows) <= 2 and torch.equal(full.tokens, small.tokens), "batched within the budget, same samples"

"""Applying steering vectors: the zero-coefficient oracle, hook hygiene after errors, the entropy
gate's exact firing rule, and batch-vs-row equality for every gate."""

import copy
import math

import pytest
import torch

from probe.detector import ForkDetector
from probe.models.pair import wrap
from probe.sampling.sampler import SamplerConfig, sample_branches
from steering import SteeringVector, after_tokens
from steering.gates import entropy_gate, token_entropy

PROMPTS = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
CFG = SamplerConfig(n=3, max_new_tokens=8, batch_size=4, seed=1, device="cpu")  # batches split prompts


def _vector(layers=(1,), seed=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({x: scale * torch.randn(32, generator=g) for x in layers}, method="custom")


def _detector(layer=0, seed=7):
    g = torch.Generator().manual_seed(seed)
    p = {"w": torch.randn(32, generator=g), "b": torch.tensor(0.0), "mean": torch.zeros(32), "std": torch.ones(32) * 0.3}
    return ForkDetector({layer: p}, {"hook_site": "blocks.{L}.hook_resid_post"})


def _gate_kwargs(gate, base):
    """Gate settings that fire on some decisions and not others, on `eos_lm` models."""
    return {"always": {}, "entropy": {"threshold": 1.8}, "base_entropy": {"threshold": 1.8, "base": base},
            "disagree": {"threshold": 6.4, "base": base}, "detector": {"detector": _detector()},
            "planning": {"planning": after_tokens(range(3, 40))}}[gate]


def _no_hooks(*models) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for model in models for m in model.modules())


GATES = ["always", "entropy", "base_entropy", "disagree", "detector", "planning"]


@pytest.mark.parametrize("case", GATES + ["forward-hf", "forward-nnsight", "forward-transformer_lens"])
def test_coefficient_zero_equals_no_hook(eos_lm, tiny_lm, tiny_tokenizer, case):
    if case.startswith("forward-"):
        _zero_outside_the_sampler(tiny_lm, tiny_tokenizer, case.removeprefix("forward-"))
        return
    gate, rl, base = case, eos_lm(0), eos_lm(1)
    plain = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG)
    steer = _vector().apply(rl, coef=0.0, gate=gate, trace=True, **_gate_kwargs(gate, base))
    zero = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    for f in ("tokens", "mask", "logprobs", "entropy"):
        assert torch.equal(getattr(plain, f), getattr(zero, f)), (
            f"{f}: coef 0 with gate {gate!r} differs from no hook: the gate machinery (probe pass, KV-cache "
            "crop, shadow model) changes sampling by itself")
    fired = steer.trace.dense(CFG.n, CFG.max_new_tokens)["steered"][zero.mask]
    assert fired.any() and (gate == "always" or not fired.all()), f"gate {gate!r} is vacuous here: {fired.float().mean()}"
    steered = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG,
                              intervention=_vector(scale=3.0).apply(rl, coef=1.0, gate=gate, **_gate_kwargs(gate, base)))
    assert not torch.equal(plain.tokens, steered.tokens), "a non-zero vector changed nothing: was the hook attached?"
    assert _no_hooks(rl, base)


def _zero_outside_the_sampler(tiny_lm, tiny_tokenizer, backend):
    """Plain forward passes on every backend: coef 0 is exact, and coef 1 equals a hand-written hook."""
    hf = tiny_lm("qwen2", 0)
    model = hf if backend == "hf" else wrap(hf, copy.deepcopy(tiny_tokenizer), backend, "cpu")
    run = (lambda ids: hf(ids).logits) if backend == "hf" else model.logits
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    vec = _vector(layers=(0, 1), scale=3.0)
    with torch.inference_mode():
        clean = run(ids)
        with vec.apply(model, coef=0.0):
            assert torch.equal(run(ids), clean), f"{backend}: coef 0 changed the logits"
        with vec.apply(model, coef=1.0):
            steered = run(ids)
        hooks = [hf.model.layers[x].register_forward_hook(lambda m, a, o, v=vec.directions[x]: o + v) for x in (0, 1)]
        try:
            by_hand = hf(ids).logits
        finally:
            for h in hooks:
                h.remove()
    assert not torch.allclose(steered, clean), f"{backend}: the vector did not reach the model"
    assert torch.allclose(steered, by_hand, atol=1e-4), f"{backend} steering differs from the hand-written hook"
    assert _no_hooks(hf) and (backend != "transformer_lens" or _no_hooks(model.model))


@pytest.mark.parametrize("where", ["planning", "shadow", "with_body"])
def test_no_hook_remains_after_an_exception(eos_lm, tiny_tokenizer, where):
    rl, base = eos_lm(0), eos_lm(1)
    calls = []

    def exploding(tokens):  # fails at the 4th decision, mid-generation
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return torch.ones(tokens.shape[0], dtype=torch.bool)

    vec = _vector()
    if where == "planning":
        steer = vec.apply(rl, coef=2.0, gate="planning", planning=exploding, trace=True)
        with pytest.raises(RuntimeError, match="boom"):
            sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    elif where == "shadow":  # the base model (disagree gate) fails inside its own forward
        steer = vec.apply(rl, coef=2.0, gate="disagree", threshold=0.5, base=base)

        def bomb_hook(module, args):
            exploding(torch.zeros(1, 0, dtype=torch.long))

        bomb = base.model.layers[1].register_forward_pre_hook(bomb_hook)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
        finally:
            bomb.remove()
    else:
        steer = vec.apply(rl, coef=2.0, gate="entropy", threshold=1.0)
        with pytest.raises(RuntimeError, match="boom"):
            with steer:
                sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
                raise RuntimeError("boom")
    assert _no_hooks(rl, base), f"a hook survived an exception ({where}): later runs would be silently steered"
    assert steer.state is None and steer._pass is None, "the steering kept per-run state after the exception"
    again = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG)
    assert torch.equal(again.tokens, sample_branches(rl, tiny_tokenizer, PROMPTS, CFG).tokens)


def test_entropy_gate_fires_exactly_where_entropy_exceeds_threshold(eos_lm, tiny_tokenizer):
    # hand-made distributions: uniform over 4 (log 4), over 2 (log 2), a point mass (0)
    logits = torch.full((3, 8), float("-inf"))
    logits[0, :4], logits[1, :2], logits[2, 0] = 0.0, 0.0, 0.0
    h = token_entropy(logits)
    assert torch.allclose(h, torch.tensor([math.log(4), math.log(2), 0.0]))
    assert entropy_gate(logits, math.log(2)).tolist() == [True, False, False], "the gate is strictly above"
    assert entropy_gate(logits, math.log(2) - 1e-4).tolist() == [True, True, False]
    assert entropy_gate(logits[None].expand(2, 3, 8), 1.0).tolist() == [[True, False, False]] * 2

    # in the sampler: the decision uses this position's own unsteered entropy on the steered prefix
    rl, thr, coef = eos_lm(0), 1.8, 2.0
    vec = _vector(layers=(0,))
    v = vec.directions[0]
    cfg = SamplerConfig(n=2, max_new_tokens=8, seed=3, device="cpu")
    steer = vec.apply(rl, coef=coef, gate="entropy", threshold=thr, trace=True)
    branches = sample_branches(rl, tiny_tokenizer, PROMPTS[:2], cfg, intervention=steer)
    tr = steer.trace.dense(cfg.n, cfg.max_new_tokens)
    m = branches.mask
    assert torch.equal(tr["steered"][m], tr["entropy_before"][m] > thr), "steered where entropy <= threshold, or not where >"
    assert 0 < tr["steered"][m].sum() < m.sum(), "hand-picked threshold should split the decisions"
    assert (tr["coef"][m] == torch.where(tr["steered"][m], coef, 0.0)).all()
    assert torch.allclose(tr["entropy_after"][m], branches.entropy[m], atol=1e-5), "after = what was sampled from"
    # uncached oracle: re-run each prefix with the vector added where the trace says it was
    for r in range(branches.tokens.shape[0]):
        prompt = branches.prompt_tokens[int(branches.prompt_index[r])]
        seq = torch.tensor(prompt + branches.tokens[r][m[r]].tolist())
        for j in range(int(m[r].sum())):
            pos = len(prompt) - 1 + j  # the decision position that sampled token j
            for current, key in ((False, "entropy_before"), (True, "entropy_after")):
                where = [len(prompt) - 1 + i for i in range(j + (current and bool(tr["steered"][r, j])))
                         if tr["steered"][r, i]]
                hook = rl.model.layers[0].register_forward_hook(
                    lambda mod, a, o, w=where: o + coef * v * torch.isin(torch.arange(o.shape[1]), torch.tensor(w, dtype=torch.long))[None, :, None])
                try:
                    with torch.inference_mode():
                        want = token_entropy(rl(seq[None, : pos + 1]).logits[0, -1])
                finally:
                    hook.remove()
                assert torch.allclose(tr[key][r, j], want, atol=1e-4), (
                    f"row {r} token {j}: {key} {tr[key][r, j]:.5f} != uncached {want:.5f}")


@pytest.mark.parametrize("gate", GATES)
def test_steering_a_batch_equals_steering_its_rows_one_at_a_time(eos_lm, tiny_tokenizer, gate):
    rl, base = eos_lm(0), eos_lm(1)
    steer = _vector(scale=3.0).apply(rl, coef=1.0, gate=gate, trace=True, **_gate_kwargs(gate, base))
    batch = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    big = steer.trace.dense(CFG.n, CFG.max_new_tokens)
    assert len(set(batch.mask.sum(1).tolist())) > 1, "rows should end at different steps (the sampler drops them)"
    assert gate == "always" or 0 < big["steered"][batch.mask].float().mean() < 1, f"gate {gate!r} is vacuous here"
    n = CFG.n
    for i, p in enumerate(PROMPTS):
        alone = sample_branches(rl, tiny_tokenizer, [p], CFG, intervention=steer, prompt_keys=[i])
        small = steer.trace.dense(n, CFG.max_new_tokens)
        rows = slice(i * n, (i + 1) * n)
        assert torch.equal(alone.tokens, batch.tokens[rows]), f"gate {gate!r}: prompt {i} sampled alone differs"
        assert torch.allclose(alone.logprobs, batch.logprobs[rows], atol=1e-5)
        assert torch.equal(small["steered"], big["steered"][rows]), f"gate {gate!r} decided differently in a batch"
        fin = alone.mask
        for k in ("entropy_before", "entropy_after"):
            assert torch.allclose(small[k][fin], big[k][rows][fin], atol=1e-5), f"{k} differs batched vs alone"
    # outside the sampler (teacher forcing): a batch of rows equals each row alone, position by position
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [15, 3, 16, 4, 17, 5]])
    if gate in ("always", "entropy", "base_entropy", "disagree", "detector"):
        with torch.inference_mode(), _vector(scale=3.0).apply(rl, coef=1.0, gate=gate, **_gate_kwargs(gate, base)):
            together = rl(ids).logits
            one_by_one = torch.cat([rl(ids[r : r + 1]).logits for r in range(3)])
        assert torch.allclose(together, one_by_one, atol=1e-4), f"gate {gate!r}: batch of rows != rows alone"
    assert _no_hooks(rl, base)

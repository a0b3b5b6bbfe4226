"""Row-level application: a fraction of each prompt's samples steered (by sample index), with their own
prefill; the rest sampled exactly as the unsteered model samples them."""

from __future__ import annotations

import pytest
import torch

from probe.metrics.frontier import m_of_q, splice
from probe.metrics.outcomes import Outcomes
from probe.sampling.sampler import SamplerConfig, sample_branches
from steering import SteeringVector
from steering.breadth_reward import novel_reward

PROMPTS = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
CFG = SamplerConfig(n=4, max_new_tokens=6, batch_size=5, seed=3, device="cpu")  # batches split prompts


def _vector(scale=3.0):
    return SteeringVector({1: scale * torch.randn(32, generator=torch.Generator().manual_seed(0))})


@pytest.mark.parametrize("where", ["generated", "all"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_row_level_touches_exactly_the_chosen_rows(tiny_lm, tiny_tokenizer, where, fraction):
    model = tiny_lm("qwen2", 0)
    plain = sample_branches(model, tiny_tokenizer, PROMPTS, CFG)
    full = sample_branches(model, tiny_tokenizer, PROMPTS, CFG, intervention=_vector().apply(model, where=where))
    part = sample_branches(model, tiny_tokenizer, PROMPTS, CFG,
                           intervention=_vector().apply(model, where=where, fraction=fraction))
    m = m_of_q(fraction, CFG.n)
    steered = part.sample_index < m
    assert steered.any() and not steered.all()
    for f in ("tokens", "mask"):
        assert torch.equal(getattr(part, f)[steered], getattr(full, f)[steered]), \
            f"{f}: a steered row must be exactly the row of a fully steered run (its own steered prefill)"
        assert torch.equal(getattr(part, f)[~steered], getattr(plain, f)[~steered]), \
            f"{f}: an unsteered row must be exactly the unsteered model's row"
    torch.testing.assert_close(part.logprobs[~steered], plain.logprobs[~steered], atol=1e-5, rtol=0)
    assert not torch.equal(full.tokens, plain.tokens), "vacuous: the vector must change some samples"


def test_row_level_equals_splicing_the_outcomes(tiny_lm, tiny_tokenizer):
    """The sweep forms row-level cells by splicing outcomes instead of sampling again: equal by construction."""
    model = tiny_lm("qwen2", 0)

    def keys(br):  # a stand-in canonical key: the completion's tokens
        rows = [tuple(t[mk].tolist()) for t, mk in zip(br.tokens, br.mask)]
        return Outcomes([rows[i * CFG.n:(i + 1) * CFG.n] and [str(r) for r in rows[i * CFG.n:(i + 1) * CFG.n]]
                         for i in range(len(PROMPTS))], [True] * len(PROMPTS))

    plain = keys(sample_branches(model, tiny_tokenizer, PROMPTS, CFG))
    full = keys(sample_branches(model, tiny_tokenizer, PROMPTS, CFG, intervention=_vector().apply(model, where="all")))
    part = keys(sample_branches(model, tiny_tokenizer, PROMPTS, CFG,
                                intervention=_vector().apply(model, where="all", fraction=0.5)))
    assert part.keys == splice(full, plain, m_of_q(0.5, CFG.n)).keys


def test_fraction_outside_the_unit_interval_is_refused(tiny_lm):
    with pytest.raises(ValueError, match=r"fraction=1.5 is outside \[0, 1\]"):
        _vector().apply(tiny_lm("qwen2", 0), fraction=1.5)


def test_novel_reward_pays_only_solutions_the_unsteered_samples_missed():
    keys = ["a", "b", "b", None, "a", "c"]  # one group of 6: samples 0..2 steered, 3..5 unsteered (found a, c)
    r = novel_reward(keys, 6, 3)
    assert r.tolist() == [0.0, 0.5, 0.5, 0.0, 0.0, 0.0]


def test_a_shadowed_intervention_refuses_separate_prefills(tiny_lm, tiny_tokenizer):
    from steering import patch
    from steering.shadow import ShadowError

    rl, base = tiny_lm("qwen2", 0), tiny_lm("qwen2", 1)
    with pytest.raises(ShadowError, match="prefills some prompts more than once"):
        sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=patch(rl, base, 1, 0.5, fraction=0.5))
    assert not any(m._forward_hooks or m._forward_pre_hooks for model in (rl, base) for m in model.modules())

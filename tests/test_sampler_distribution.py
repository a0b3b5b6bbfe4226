"""Distribution tests for probe.sampling.sampler: sampled frequencies, the counter-based RNG,
and filtering (the fast-path oracles and bad input are in tests/test_sampler.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Qwen2Config

from probe.sampling.rng import counter_uniforms
from probe.sampling.sampler import (
    SamplerConfig,
    filtered_logprobs,
    sample_branches,
)

EOS, PAD = 1, 0


# 7. distributions ---------------------------------------------------------------------------------

TOY_LOGITS = torch.tensor([2.0, -1.0, 0.5, 0.0, 1.5, -0.5, 1.0, 0.2])  # id 1 = eos, kept unlikely


class FixedLogitsLM(nn.Module):
    """A stand-in causal LM whose next-token logits never change (for distribution checks)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.config = Qwen2Config(vocab_size=len(logits), hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)
        self.emb = nn.Embedding(len(logits), 1)
        self.register_buffer("fixed", logits.clone())

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=True, logits_to_keep=0):
        return SimpleNamespace(logits=self.fixed.expand(*input_ids.shape, -1))


def hand_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[float]:
    """Brute-force reference of the filtered distribution, in plain Python floats."""
    x = [v / (temperature or 1.0) for v in logits.double().tolist()]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = order[:top_k] if top_k else order
    z = sum(math.exp(x[i]) for i in keep)
    kept, mass = [], 0.0
    for i in keep:
        if mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(x[i]) / z
    z = sum(math.exp(x[i]) for i in kept)
    return [math.exp(x[i]) / z if i in kept else 0.0 for i in range(len(x))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (1.0, 6, 0.7)])
def test_sample_frequencies_match_filtered_softmax(tiny_tokenizer, temperature, top_k, top_p):
    model = FixedLogitsLM(TOY_LOGITS)
    cfg = SamplerConfig(n=3000, max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p,
                        batch_size=4096)
    b = sample_branches(model, tiny_tokenizer, [[2, 3]], cfg)
    probs = torch.tensor(hand_filtered(TOY_LOGITS, temperature, top_k, top_p))
    drawn = b.tokens[b.mask]
    counts = torch.bincount(drawn, minlength=len(TOY_LOGITS)).double()
    assert (counts[probs == 0] == 0).all(), (
        f"tokens excluded by top-k={top_k}/top-p={top_p} were sampled: {counts.tolist()}")
    expected = probs[probs > 0] * len(drawn)
    chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (  # p < 1e-4 for <= 7 degrees of freedom: frequencies are off
        f"token frequencies {counts.tolist()} do not match the filtered softmax {probs.tolist()} "
        f"(chi2 {chi2:.1f}); measured diversity would be biased")
    hand_entropy = -sum(p * math.log(p) for p in probs.tolist() if p > 0)
    torch.testing.assert_close(b.entropy[b.mask], torch.full((len(drawn),), hand_entropy),
                               atol=1e-5, rtol=0, msg="reported entropy is not the filtered one's")
    torch.testing.assert_close(b.logprobs[b.mask], probs.log()[drawn].float(), atol=1e-5, rtol=0,
                               msg="reported logprob is not under the filtered distribution")


def test_greedy_reports_temperature_one_distribution(tiny_tokenizer):
    b = sample_branches(FixedLogitsLM(TOY_LOGITS), tiny_tokenizer, [[2]],
                        SamplerConfig(max_new_tokens=3, temperature=0))
    assert b.tokens[0].tolist() == [0, 0, 0], "temperature 0 must be argmax"
    torch.testing.assert_close(b.logprobs[0], TOY_LOGITS.log_softmax(-1)[[0, 0, 0]])
    ent = float(-(TOY_LOGITS.softmax(-1) * TOY_LOGITS.log_softmax(-1)).sum())
    torch.testing.assert_close(b.entropy[0], torch.full((3,), ent))


def test_counter_uniforms_are_uniform_and_keyed():
    u = counter_uniforms(0, torch.arange(2000), torch.zeros(2000, dtype=torch.long), 50)
    hist = torch.histc(u.float(), bins=20, min=0, max=1)
    chi2 = float(((hist - u.numel() / 20) ** 2 / (u.numel() / 20)).sum())
    assert chi2 < 50.0, f"uniforms are not uniform (chi2 {chi2:.1f} over 20 bins)"
    lag = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(float(lag)) < 0.01, "consecutive steps are correlated"
    one = counter_uniforms(0, torch.tensor([1234]), torch.tensor([0]), 50)
    assert torch.equal(one[0], u[1234]), "a row's uniforms must not depend on the other rows"


def test_filtered_logprobs_keeps_top_token():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    logp = filtered_logprobs(logits, 1.0, 0, 0.01)
    assert logp[0].tolist() == [0.0, float("-inf"), float("-inf")], "top-p must keep the top token"

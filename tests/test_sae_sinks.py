"""Attention sinks (`probe.sae.sinks`): found by norm, left out of an SAE's scores, kept as they
are by the splice."""

import pytest
import torch
from saes import random_sae

from probe.sae.quality import hf_logits, sae_quality, splice
from probe.sae.sinks import find_sinks, sink_mask


def test_attention_sinks_are_left_out_of_the_scores_and_kept_by_the_splice(tiny_model):
    """A pretrained LM's first token carries a vector of huge norm (SmolLM2: ~145x the median): it is
    no row of the scores, and the splice leaves it as it is, replacing every other position."""
    x = torch.randn(50, 8)
    x[[3, 17]] *= 100
    sink, rec = find_sinks(x)
    assert sink.nonzero().squeeze(-1).tolist() == [3, 17]
    assert rec["sink_threshold"] == pytest.approx(10 * x.norm(dim=-1).median().item())
    assert torch.equal(sink_mask(x)[0], sink) and sink_mask(x, threshold=1e9)[0].sum() == 0
    c = x - x.mean(0)
    assert rec["n_sinks"] == 2 and rec["sink_variance_share"] == pytest.approx(
        (c[sink] ** 2).sum().item() / (c**2).sum().item(), rel=1e-5) and rec["sink_variance_share"] > 0.9

    site = "blocks.1.hook_resid_post"
    sae = random_sae(hook=site)
    layer = tiny_model.hf.model.layers[1]
    planted = torch.randn(32) * 1e3  # the same huge vector at position 0 of every row

    def plant(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 0] = planted
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer.register_forward_hook(plant)
    try:
        tokens = torch.randint(3, 64, (4, 8))
        attn = torch.ones_like(tokens, dtype=torch.bool)
        answer = attn.clone()
        answer[:, :3] = False
        q, _ = sae_quality(sae, tiny_model, tokens, attn, answer, batch_size=3)
        with torch.inference_mode():
            acts = tiny_model.run_with_sites(tokens, [site], attn.long())[1][site]
            rest = acts[:, 1:].reshape(-1, 32)
            fvu = ((rest - sae(rest)) ** 2).sum() / ((rest - rest.mean(0)) ** 2).sum()
            seen = []
            with splice(tiny_model, sae, site, sink_threshold=q["sink_threshold"]):  # hooks run in order: plant, splice, grab
                grab = layer.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
                try:
                    hf_logits(tiny_model, tokens, attn)
                finally:
                    grab.remove()
    finally:
        handle.remove()
    assert q["n_sink_tokens"] == 4 and q["n_tokens"] == 4 * 7, "position 0 of each row is a sink, nothing else"
    assert q["fvu"] == pytest.approx(fvu.item(), rel=1e-4), "FVU over the other tokens only"
    assert torch.equal(seen[-1][:, 0], planted.expand(4, 32)), "the splice keeps the sink"
    assert torch.allclose(seen[-1][:, 1:], sae(acts[:, 1:]), atol=1e-5), "and reconstructs every other position"

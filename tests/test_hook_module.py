"""probe.models.hooks.hook_module: the one torch hook at a resolved HF site (read, replace, stop)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probe.models.hooks import ResolvedHook, StopForward, hook_module, resolve_hook


class Block(nn.Module):
    """Doubles its input; returns it alone, in a tuple or in a list (GPT-1 blocks return lists)."""

    def __init__(self, wrap: str):
        super().__init__()
        self.wrap = wrap

    def forward(self, hidden_states, extra=None):
        y = 2 * hidden_states
        return {"plain": y, "tuple": (y, "extra"), "list": [y, "extra"]}[self.wrap]


class Toy(nn.Module):
    def __init__(self, wrap: str):
        super().__init__()
        self.block = Block(wrap)


def site(port: str) -> ResolvedHook:
    return ResolvedHook("blocks.0.hook_resid_post", "blocks.{L}.hook_resid_post", 0, "block", port, None)


@pytest.mark.parametrize("wrap", ["plain", "tuple", "list"])
def test_an_output_hook_reads_the_first_element_and_replaces_it_keeping_the_container(wrap):
    toy, seen = Toy(wrap), []
    x = torch.ones(1, 2, 3)
    handle = hook_module(toy, site("output"), lambda h: seen.append(h.clone()))
    out = toy.block(x)
    handle.remove()
    assert torch.equal(seen[0], 2 * x)
    assert torch.equal(out if wrap == "plain" else out[0], 2 * x)  # None leaves it
    handle = hook_module(toy, site("output"), lambda h: h + 1)
    out = toy.block(x)
    handle.remove()
    if wrap == "plain":
        assert torch.equal(out, 2 * x + 1)
    else:
        assert type(out) is {"tuple": tuple, "list": list}[wrap] and out[1] == "extra"
        assert torch.equal(out[0], 2 * x + 1)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_an_input_hook_reads_and_replaces_a_positional_or_keyword_hidden_state(as_keyword):
    toy, seen = Toy("plain"), []
    x = torch.ones(1, 2, 3)
    call = (lambda: toy.block(hidden_states=x)) if as_keyword else (lambda: toy.block(x))
    handle = hook_module(toy, site("input"), lambda h: seen.append(h))
    assert torch.equal(call(), 2 * x) and torch.equal(seen[0], x)
    handle.remove()
    handle = hook_module(toy, site("input"), lambda h: h + 1)
    assert torch.equal(call(), 2 * (x + 1))
    handle.remove()
    assert torch.equal(call(), 2 * x), "removing the handle removes the edit"


def test_stop_forward_ends_a_real_models_forward_after_the_site(tiny_lm):
    model, reached = tiny_lm("llama"), []
    model.lm_head.register_forward_hook(lambda m, a, o: reached.append("unembedding"))
    ids = torch.tensor([[3, 4, 5]])

    def stop(h):
        raise StopForward

    handle = hook_module(model, resolve_hook("blocks.0.hook_resid_post", model), stop)
    with pytest.raises(StopForward):
        model(ids)
    handle.remove()
    assert reached == []
    model(ids)
    assert reached == ["unembedding"]


def test_a_stopping_shadow_stops_only_its_own_forward(tiny_lm):
    from steering.shadow import Shadow

    model = tiny_lm("llama")
    ids, mask = torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long)
    shadow = Shadow(model, ("blocks.0.hook_resid_post",), logits=False)
    handles = shadow.register()
    try:
        assert shadow.step(None, (), {"input_ids": ids, "attention_mask": mask}) is None
        assert shadow.acts["blocks.0.hook_resid_post"].shape == (1, 3, 32)
        out = model(ids, attention_mask=mask)  # another forward while the capture hooks stay registered
    finally:
        for h in handles:
            h.remove()
    assert out.logits.shape == (1, 3, 64)

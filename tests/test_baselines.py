"""Two reviewer baselines (issue #12 item 8): layer restoration (`steering.layer_restore`) and
batch-diversity repulsion (`steering.repulsion`).

Restoration: restoring every block of an RL model whose non-block weights equal the base's *is*
the base (logits and samples), restoring none changes nothing, one block equals a hand-built
model, and the RL weights come back bit for bit, also after an exception. Repulsion: strength 0
is no intervention, the push equals the documented formula on every forward (rows dropped, rows
finished), prompts never influence each other (batched vs alone), samples of one prompt do, and
hooks are gone afterwards."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from probe.sampling.sampler import SamplerConfig, sample_branches
from steering.apply import SteeringError
from steering.gates import after_tokens
from steering.layer_restore import block_path, restore_layers
from steering.repulsion import Repulsion, repel

PROMPTS = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
IDS = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def _share_non_block_weights(rl, base) -> None:
    """Copy every tensor outside the decoder blocks (embeddings, final norm, head) from base to rl."""
    prefix = block_path(rl, 0).rsplit(".", 1)[0] + "."  # e.g. "model.layers."
    with torch.no_grad():
        for k, v in base.state_dict().items():
            if not k.startswith(prefix):
                rl.state_dict()[k].copy_(v)


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


# --- layer restoration -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_restoring_every_block_of_a_matched_pair_is_the_base(tiny_lm, arch):
    base, rl = tiny_lm(arch, 0), tiny_lm(arch, 1)
    _share_non_block_weights(rl, base)
    rl_snap, base_snap = _snapshot(rl), _snapshot(base)
    want, before = _logits(base), _logits(rl)
    assert not torch.allclose(want, before), "the pair is vacuous: the RL blocks already equal the base's"
    with restore_layers(rl, base, range(rl.config.num_hidden_layers)) as hf:
        assert hf is rl
        got = _logits(rl)
    assert torch.equal(got, want), f"{arch}: all blocks restored (non-block weights equal) must be the base exactly"
    with restore_layers(rl, base, []):
        assert torch.equal(_logits(rl), before), "restoring no layers changed the logits"
    assert torch.equal(_logits(rl), before)
    assert _same(rl, rl_snap), "the RL weights did not come back bit for bit"
    assert _same(base, base_snap), "restoring modified the base model"


@pytest.mark.parametrize("layer", [0, 1])
def test_restoring_one_block_equals_a_hand_built_model(tiny_lm, layer):
    base, rl = tiny_lm("qwen2", 0), tiny_lm("qwen2", 1)  # non-block weights differ here: only block L moves
    by_hand = copy.deepcopy(rl)
    by_hand.model.layers[layer].load_state_dict(base.model.layers[layer].state_dict())
    with restore_layers(rl, base, layer):
        got = _logits(rl)
    assert torch.equal(got, _logits(by_hand)), f"block {layer} restored != the RL model with that block loaded by hand"
    assert not torch.equal(got, _logits(rl)), "restoring a block changed nothing"


def test_weights_come_back_after_an_exception(tiny_lm):
    base, rl = tiny_lm("qwen2", 0), tiny_lm("qwen2", 1)
    snap = _snapshot(rl)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.inference_mode(), restore_layers(rl, base, [0, 1]):
            assert not _same(rl, snap)
            raise RuntimeError("boom")
    assert _same(rl, snap), "an exception in the body left the RL model with the base's blocks"


def test_restoration_refuses_mismatched_blocks_and_bad_layers(tiny_lm):
    base, rl = tiny_lm("qwen2", 0), tiny_lm("qwen2", 1)
    wide = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=128))
    snap = _snapshot(rl)
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight.*\(64, 32\).*\(48, 32\)"):
        with restore_layers(rl, wide, 0):
            pass
    with pytest.raises(ValueError, match=r"layers \[2\] are out of range.*2 blocks.*base model 2"):
        with restore_layers(rl, base, [1, 2]):
            pass
    with pytest.raises(ValueError, match=r"layers \[-1\]"):
        with restore_layers(rl, base, -1):
            pass
    half = copy.deepcopy(base).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        with restore_layers(rl, half, 0):
            pass
    assert _same(rl, snap), "a refused restoration touched the weights"


def test_restoration_around_the_sampler(eos_lm, tiny_tokenizer):
    base, rl = eos_lm(0), eos_lm(1)
    _share_non_block_weights(rl, base)
    cfg = SamplerConfig(n=3, max_new_tokens=8, batch_size=4, seed=1, device="cpu")
    want = sample_branches(base, tiny_tokenizer, PROMPTS, cfg)
    plain = sample_branches(rl, tiny_tokenizer, PROMPTS, cfg)
    assert not torch.equal(want.tokens, plain.tokens), "vacuous: RL and base sample the same"
    with restore_layers(rl, base, [0, 1]):
        got = sample_branches(rl, tiny_tokenizer, PROMPTS, cfg)
    for f in ("tokens", "mask", "logprobs", "entropy"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f"{f}: every block restored should sample as the base"
    assert torch.equal(sample_branches(rl, tiny_tokenizer, PROMPTS, cfg).tokens, plain.tokens)


# --- batch-diversity repulsion -------------------------------------------------------------------

CFG = SamplerConfig(n=4, max_new_tokens=10, batch_size=8, seed=1, device="cpu")  # 2 prompts per row batch


def _no_hooks(*models) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for model in models for m in model.modules())


def test_repel_formula_by_hand():
    x = torch.tensor([[[3.0, 0.0]], [[1.0, 0.0]], [[0.0, 5.0]], [[7.0, 7.0]]])  # [4 rows, 1 pos, 2]
    push = repel(x, [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3])], strength=0.5, eps=0.01)
    s = (3.0 + 1.0) / 2  # mean norm of the group {0, 1}; centroid (2, 0); d = (+-1, 0)
    size = 0.5 * s * 1.0 / (1.0 + 0.01 * s)
    assert torch.allclose(push[0, 0], torch.tensor([size, 0.0])) and torch.allclose(push[1, 0], torch.tensor([-size, 0.0]))
    assert (push[2:] == 0).all(), "a row alone in its group must get no push"
    same = repel(torch.ones(3, 1, 4), [torch.arange(3)], strength=1.0, eps=0.01)
    assert (same == 0).all(), "identical rows (same tokens so far) must get no push, not a random-direction one"


@pytest.mark.parametrize("gate", ["always", "entropy", "planning"])
def test_repulsion_strength_zero_equals_no_intervention(eos_lm, tiny_tokenizer, gate):
    rl = eos_lm(0)
    kw = {"always": {}, "entropy": {"threshold": 1.8}, "planning": {"planning": after_tokens(range(3, 40))}}[gate]
    plain = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG)
    zero = Repulsion(rl, layers=[0, 1], strength=0.0, gate=gate, trace=True, **kw)
    got = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=zero)
    for f in ("tokens", "mask", "logprobs", "entropy"):
        assert torch.equal(getattr(plain, f), getattr(got, f)), f"{f}: strength 0 ({gate}) changed sampling"
    steered = zero.trace.dense(CFG.n, CFG.max_new_tokens)["steered"]
    assert not steered[:, 0].any(), "the first token comes from the shared prefill: nothing to push apart"
    assert steered[plain.mask].any() and (gate == "always" or not steered[plain.mask][1:].all()), f"gate {gate!r} is vacuous"
    pushed = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG,
                             intervention=Repulsion(rl, [0, 1], strength=0.5, gate=gate, **kw))
    assert not torch.equal(plain.tokens, pushed.tokens), "strength 0.5 changed nothing: was the hook attached?"
    assert _no_hooks(rl)


def test_repulsion_push_matches_the_formula_on_every_forward(eos_lm, tiny_tokenizer):
    rl, layer, strength, eps = eos_lm(0), 1, 0.3, 0.01
    rec = []
    steer = Repulsion(rl, layer, strength, eps=eps)
    raw_hook = rl.model.layers[layer].register_forward_hook(lambda m, a, o: rec.append([o.clone()]))
    try:
        with steer:  # registers the edit after raw_hook, before out_hook
            def out_hook(m, a, o):
                st = steer.state
                rec[-1] += [o.clone(), st.phase, st.active.clone(), st.prompt_index.clone()]

            out = rl.model.layers[layer].register_forward_hook(out_hook)
            try:
                branches = sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
            finally:
                out.remove()
    finally:
        raw_hook.remove()
    assert len(set(branches.mask.sum(1).tolist())) > 1, "rows should end at different steps"
    assert any(len(r[3]) < CFG.batch_size for r in rec if r[2] == "generate"), "no row was ever dropped"
    assert any(not r[3].all() for r in rec if r[2] == "generate"), "no finished row ever rode along"
    n_pushed = 0
    for raw, edited, phase, active, pidx in rec:
        want = raw.clone()
        if phase == "generate":
            for i in range(len(active)):
                group = [j for j in range(len(active)) if active[j] and pidx[j] == pidx[i]]
                if not active[i] or len(group) < 2:
                    continue
                h = raw[group, 0]  # [k, d]
                m, s = h.mean(0), h.norm(dim=-1).mean()
                d = raw[i, 0] - m
                want[i, 0] = raw[i, 0] + strength * s * d / (d.norm() + eps * s)
                n_pushed += 1
        assert torch.allclose(edited, want, atol=1e-5), f"{phase}: the edit differs from the documented formula"
    assert n_pushed > 20 and _no_hooks(rl)


@pytest.mark.parametrize("batch_size", [4, 8])
def test_repulsion_never_couples_different_prompts(eos_lm, tiny_tokenizer, batch_size):
    rl = eos_lm(0)
    cfg = SamplerConfig(n=4, max_new_tokens=10, batch_size=batch_size, seed=1, device="cpu")
    steer = Repulsion(rl, [0, 1], strength=0.5, trace=True)
    together = sample_branches(rl, tiny_tokenizer, PROMPTS, cfg, intervention=steer)
    big = steer.trace.dense(cfg.n, cfg.max_new_tokens)["steered"]
    plain = sample_branches(rl, tiny_tokenizer, PROMPTS, cfg)
    assert not torch.equal(together.tokens, plain.tokens), "vacuous: repulsion changed nothing"
    for i, p in enumerate(PROMPTS):
        alone = sample_branches(rl, tiny_tokenizer, [p], cfg, intervention=steer, prompt_keys=[i])
        rows = slice(i * cfg.n, (i + 1) * cfg.n)
        assert torch.equal(alone.tokens, together.tokens[rows]), f"prompt {i}: its samples depend on other prompts"
        assert torch.allclose(alone.logprobs, together.logprobs[rows], atol=1e-5)
        assert torch.equal(steer.trace.dense(cfg.n, cfg.max_new_tokens)["steered"], big[rows])
    # ... while the samples of one prompt do depend on each other (the point of the method):
    # rows j < 2 draw the same uniforms with n = 2 and n = 4, so only the coupling can separate them
    two = SamplerConfig(n=2, max_new_tokens=10, batch_size=8, seed=1, device="cpu")
    pick = [i * cfg.n + j for i in range(len(PROMPTS)) for j in range(2)]
    assert torch.equal(sample_branches(rl, tiny_tokenizer, PROMPTS, two).tokens, plain.tokens[pick])
    assert not torch.equal(sample_branches(rl, tiny_tokenizer, PROMPTS, two, intervention=steer).tokens,
                           together.tokens[pick]), "samples of one prompt did not influence each other"
    assert _no_hooks(rl)


def test_repulsion_hooks_are_gone_after_an_exception_and_misuse_is_refused(eos_lm, tiny_tokenizer):
    rl, calls = eos_lm(0), []

    def exploding(tokens):  # fails at the 4th decision, mid-generation
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return torch.ones(tokens.shape[0], dtype=torch.bool)

    steer = Repulsion(rl, [0, 1], strength=0.5, gate="planning", planning=exploding, trace=True)
    with pytest.raises(RuntimeError, match="boom"):
        sample_branches(rl, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    assert _no_hooks(rl) and steer.state is None, "a hook or run state survived an exception"
    with pytest.raises(SteeringError, match="intervention= of probe.sampling.sampler.sample_branches"):
        with Repulsion(rl, 0, strength=0.5):
            _logits(rl)
    assert _no_hooks(rl)
    for bad, match in (({"strength": -1.0}, "strength=-1.0"), ({"strength": 0.1, "where": "all"}, "where='all'"),
                       ({"strength": 0.1, "eps": 0}, "eps=0"), ({"strength": 0.1, "layers": []}, "layers is empty")):
        with pytest.raises(ValueError, match=match):
            Repulsion(rl, **{"layers": 0, **bad})

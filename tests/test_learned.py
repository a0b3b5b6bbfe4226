"""Learned edits (steering.learned, steering.learn): zero edits change nothing, the teacher-forced
path equals the sampler's, training lowers its objective, files round-trip, bad input is refused."""

from __future__ import annotations

import sys

import pytest
import torch

from probe.entropy import entropy_and_logprob, kl, trajectories_from_branches
from probe.sampling.sampler import SamplerConfig, sample_branches
from steering.breadth_reward import breadth_advantages, pass_at_k_advantage, unique_reward
from steering.learn import LearnConfig, learn
from steering.learned import LearnedEdit, LearnedEditError, answer_buckets

PROMPTS = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
CFG = SamplerConfig(n=3, max_new_tokens=6, batch_size=4, seed=1, device="cpu")


class ToyTask:
    """Correct iff the completion mentions w5; the solution is the first word."""

    def verify(self, prompt, completion):
        return "w5" in completion.split()

    def canonical(self, prompt, completion):
        return completion.split()[0] if self.verify(prompt, completion) else None

    def n_solutions(self, prompt):
        return None

    def token_roles(self, tokens):
        return ["planning" if i % 2 == 0 else "execution" for i in range(len(tokens))]


class EvenTask(ToyTask):
    """Correct iff the completion's first word is an even w-number (about half the samples)."""

    def verify(self, prompt, completion):
        words = completion.split()
        return bool(words) and words[0][1:].isdigit() and int(words[0][1:]) % 2 == 0


def _dictionary():
    from test_sae_edit import FEATS, make_sae

    from steering.sae_edit import FeatureDictionary

    return FeatureDictionary.from_sae(make_sae(), FEATS)


def _edit(kind, seed=0):
    layers = [] if kind == "sae" else [0, 1]
    return LearnedEdit(32, layers, kind, n_positions=3, rank=2, seed=seed,
                       dictionary=_dictionary() if kind == "sae" else None)


def _random_edit(kind, seed=3, d=32):
    edit = _edit(kind, seed)
    with torch.no_grad():
        for p in edit.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return edit


def _no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["vector", "position", "mode", "sae", "lowrank"])
def test_a_fresh_edit_changes_nothing_and_a_trained_one_does(tiny_lm, tiny_tokenizer, kind):
    model = tiny_lm("qwen2", 0)
    plain = sample_branches(model, tiny_tokenizer, PROMPTS, CFG)
    fresh = _edit(kind)
    same = sample_branches(model, tiny_tokenizer, PROMPTS, CFG, intervention=fresh.apply(model))
    assert torch.equal(plain.tokens, same.tokens) and torch.allclose(plain.logprobs, same.logprobs), (
        "a freshly initialised edit must be the identity: training starts from the RL model")
    moved = sample_branches(model, tiny_tokenizer, PROMPTS, CFG, intervention=_random_edit(kind).apply(model))
    assert not torch.allclose(plain.logprobs, moved.logprobs), "a non-zero edit must change the distribution"
    assert _no_hooks(model)


@pytest.mark.parametrize("kind", ["vector", "position", "mode", "sae", "lowrank"])
@pytest.mark.parametrize("where", ["all", "generated"])
def test_teacher_forced_buckets_reproduce_the_sampler(tiny_lm, tiny_tokenizer, kind, where):
    """The training forward (answer_buckets + positions()) must steer exactly the positions, with
    exactly the directions, that the sampler steered: otherwise the objective trains another edit."""
    model, edit = tiny_lm("qwen2", 0), _random_edit(kind)
    steer = edit.apply(model, where=where)
    br = sample_branches(model, tiny_tokenizer, PROMPTS, CFG, intervention=steer)
    traj = trajectories_from_branches(br, pad_id=0)
    buckets = edit.buckets(traj.attention_mask, traj.answer_mask, br.sample_index, where)
    with torch.no_grad(), steer, steer.positions(buckets):
        logits = model(input_ids=traj.tokens, attention_mask=traj.attention_mask.long()).logits
    _, lp = entropy_and_logprob(logits, traj.tokens)
    torch.testing.assert_close(lp[traj.answer_mask], br.logprobs[br.mask], atol=2e-5, rtol=0)


def test_edits_that_read_the_residual_measure_their_sink_threshold_and_keep_it(tiny_lm, tiny_tokenizer, tmp_path,
                                                                                monkeypatch):
    """learn() fixes the attention-sink threshold of a low-rank edit from the model (10x the median
    residual norm at its layers over the first step's prompts), the file keeps it, and a resumed run
    reads it from the file instead of measuring again."""
    cfg = LearnConfig(objective="breadth", kind="lowrank", layers=(0, 1), rank=2, steps=1, prompts_per_step=3,
                      group_size=2, max_new_tokens=3, save_every=0)
    model = tiny_lm("qwen2", 0)
    edit, _ = learn(model, tiny_tokenizer, ToyTask(), lambda s, k: PROMPTS[:k], cfg, tmp_path / "lr.st")
    ids = tiny_tokenizer(PROMPTS)["input_ids"]
    for layer in (0, 1):
        seen = []
        h = model.model.layers[layer].register_forward_hook(lambda m, a, o, seen=seen: seen.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            for p in ids:
                model(input_ids=torch.tensor([p]))
        h.remove()
        norms = torch.cat([s.float().norm(dim=-1).flatten() for s in seen])
        assert edit.sink_thresholds[str(layer)] == pytest.approx(10 * norms.median().item(), rel=1e-6)
    assert LearnedEdit.load(tmp_path / "lr.st").sink_thresholds == edit.sink_thresholds

    def measured_again(*_a, **_k):
        raise AssertionError("a resumed run measured the sink thresholds again")

    monkeypatch.setattr(sys.modules["steering.learn"], "sink_thresholds", measured_again)
    resumed, log = learn(model, tiny_tokenizer, ToyTask(), lambda s, k: PROMPTS[:k],
                         LearnConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "lr.st")
    assert len(log) == 2 and resumed.sink_thresholds == edit.sink_thresholds


def test_sae_kind_round_trips_with_its_dictionary(tmp_path, tiny_lm):
    edit = _random_edit("sae")
    assert edit.layers == [int(edit.dictionary.hook_name.split(".")[1])] and edit.n_params() == 4 * 4 + 4
    edit.save(tmp_path / "s.safetensors")
    back = LearnedEdit.load(tmp_path / "s.safetensors")
    h = torch.randn(2, 5, 32)
    b = torch.tensor([[0, 1, 2, 3, 3]] * 2)
    torch.testing.assert_close(back.delta(back.layers[0], h, b), edit.delta(edit.layers[0], h, b), atol=1e-5, rtol=1e-5,
                               msg="the loaded edit moves the residual differently (tolerance: float32 rounding)")
    assert back.dictionary.features == edit.dictionary.features


def test_answer_buckets_oracle():
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]]).bool()
    ans = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0]]).bool()
    got = answer_buckets(attn, ans, n_positions=2)
    # prompt bucket 2; position before answer token a -> min(a, 1); the last answer token and padding -> -1
    assert got.tolist() == [[2, 0, 1, 1, 1, -1, -1], [2, 2, 0, -1, -1, -1, -1]]


def test_rewards_oracles():
    keys = ["a", "a", None, "b", None, None, None, "c"]
    assert unique_reward(keys, 4).tolist() == [0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert unique_reward(keys, 4).view(2, 4).sum(1).tolist() == [2.0, 1.0], "a group's total = its distinct count"
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1]).bool()
    adv = pass_at_k_advantage(correct, 4, 2)
    # group 1: n=4, 3 wrong, k=2: R = 1 - C(3,2)/C(4,2) = 0.5, s = 0.5; pos (1-R)/s = 1; neg (1 - R - C(2,1)/C(3,1))/s
    assert adv[0].item() == pytest.approx(1.0)
    assert adv[1].item() == pytest.approx((0.5 - 2 / 3) / 0.5)
    assert adv[4:].abs().max().item() == 0.0, "an all-correct group has no signal"
    # the advantage is the subset-average reward minus the mean: check by brute force over 2-subsets
    import itertools
    c = correct[:4].tolist()
    subsets = list(itertools.combinations(range(4), 2))
    mean = sum(max(c[i] for i in s) for s in subsets) / len(subsets)
    for j in range(4):
        mine = [max(c[i] for i in s) for s in subsets if j in s]
        assert adv[j].item() * 0.5 == pytest.approx(sum(mine) / len(mine) - mean)


def test_breadth_advantages_centre_the_steered_rows_and_say_the_mean_reward():
    """Groups of 4 whose first m = 2 samples were steered: "unique" centres (and scales) the steered
    rows' rewards, unsteered rows get 0, and the mean reward per group is returned; "pass_at_k" has
    no such mean; an unknown reward is refused."""
    keys = ["a", "b", "a", None, "c", "c", None, "d"]
    correct = torch.tensor([k is not None for k in keys])
    adv, mean = breadth_advantages("unique", correct, keys, 4, 2, std_normalize=False)
    r = unique_reward(keys, 4).view(2, 4)[:, :2]  # [[1, 1], [0.5, 0.5]]
    assert adv.view(2, 4)[:, 2:].abs().max().item() == 0.0, "unsteered rows carry no advantage"
    assert torch.allclose(adv.view(2, 4)[:, :2], r - r.mean(1, keepdim=True))
    assert mean == pytest.approx(r.sum().item() / 2)
    pk, none = breadth_advantages("pass_at_k", correct, keys, 4, 2, k=2)
    assert none is None and torch.equal(pk, pass_at_k_advantage(correct, 4, 2))
    with pytest.raises(ValueError, match="reward='best'"):
        breadth_advantages("best", correct, keys, 4, 2)


def test_distillation_lowers_kl_to_the_base(tiny_lm, tiny_tokenizer, tmp_path):
    rl, base = tiny_lm("qwen2", 0), tiny_lm("qwen2", 1)
    fixed = sample_branches(rl, tiny_tokenizer, PROMPTS, SamplerConfig(n=4, max_new_tokens=6, seed=9, device="cpu"))
    traj = trajectories_from_branches(fixed, pad_id=0)

    def objective(edit):
        steer = edit.apply(rl)
        buckets = answer_buckets(traj.attention_mask, traj.answer_mask, edit.n_positions)
        with torch.no_grad(), steer, steer.positions(buckets):
            q = rl(input_ids=traj.tokens, attention_mask=traj.attention_mask.long()).logits
            p = base(input_ids=traj.tokens, attention_mask=traj.attention_mask.long()).logits
        return kl(p[:, :-1], q[:, :-1])[traj.answer_mask[:, 1:]].mean().item()

    cfg = LearnConfig(objective="distill", kind="position", layers=(0, 1), n_positions=3, steps=12, lr=0.05,
                      prompts_per_step=3, group_size=4, max_new_tokens=6, save_every=5)
    before = objective(LearnedEdit(32, [0, 1], "position", n_positions=3))
    edit, log = learn(rl, tiny_tokenizer, ToyTask(), lambda step, k: PROMPTS[:k], cfg, tmp_path / "e.safetensors",
                      base_model=base)
    after = objective(edit)
    assert after < 0.8 * before, f"distillation must lower KL(base || steered) on held-out samples: {before} -> {after}"
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in rl.parameters()), "the RL model stays frozen"
    assert _no_hooks(rl) and len(log) == 12
    loaded = LearnedEdit.load(tmp_path / "e.safetensors")
    assert loaded.meta["n_params"] == edit.n_params() == 2 * 4 * 32
    assert loaded.meta["provenance"]["objective"] == "distill" and loaded.meta["provenance"]["steps"] == 12
    assert loaded.meta["provenance"]["log"] == log and loaded.meta["provenance"]["final"] == log[-1], \
        "the file ships its whole training log"
    for a, b in zip(loaded.parameters(), edit.parameters()):
        assert torch.equal(a, b.detach().cpu()), "a file stores float32 parameters bit for bit (a promise)"


def test_breadth_learning_resumes_exactly(tiny_lm, tiny_tokenizer, tmp_path):
    cfg = LearnConfig(objective="breadth", kind="vector", layers=(1,), steps=6, lr=0.05, prompts_per_step=3,
                      group_size=4, max_new_tokens=6, save_every=3, anchor=0.5)
    full, _ = learn(tiny_lm("qwen2", 0), tiny_tokenizer, ToyTask(), lambda s, k: PROMPTS[:k], cfg, tmp_path / "a.st")
    short = LearnConfig(**{**cfg.__dict__, "steps": 3})
    learn(tiny_lm("qwen2", 0), tiny_tokenizer, ToyTask(), lambda s, k: PROMPTS[:k], short, tmp_path / "b.st")
    resumed, log = learn(tiny_lm("qwen2", 0), tiny_tokenizer, ToyTask(), lambda s, k: PROMPTS[:k], cfg,
                         tmp_path / "b.st")
    assert len(log) == 6 and "anchor_kl" in log[-1]
    assert [r["step"] for r in log] == list(range(6)) and all(type(r["step"]) is int for r in log)
    assert LearnedEdit.load(tmp_path / "b.st").meta["provenance"]["log"] == log, "the file ships the resumed log"
    secs = [r["seconds"] for r in log]
    assert secs == sorted(secs), "seconds count on across the resume"
    for a, b in zip(full.parameters(), resumed.parameters()):  # `learn` promises a continuation, not bitwise
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg="the resumed edit left the uninterrupted run's "
                                   "path (atol 1e-6: rounding level, far below one step of lr 0.05)")


def test_bad_input_is_refused(tiny_lm, tmp_path):
    model = tiny_lm("qwen2", 0)
    with pytest.raises(LearnedEditError, match="d_model=48"):
        LearnedEdit(48, [0], "vector").apply(model)
    with pytest.raises(LearnedEditError, match="layers 0..1"):
        LearnedEdit(32, [5], "vector").apply(model)
    with pytest.raises(LearnedEditError, match="rank=9"):
        LearnedEdit(32, [0], "lowrank", rank=9)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LearnedEditError, match="not a readable safetensors"):
        LearnedEdit.load(bad)
    with pytest.raises(ValueError, match="base_model"):
        learn(model, None, ToyTask(), lambda s, k: PROMPTS[:k], LearnConfig(objective="distill"), tmp_path / "x")


def test_a_selected_edit_applies_with_its_recommended_settings(tiny_lm, tiny_tokenizer, tmp_path):
    from steering import load_intervention, save_selected

    model, edit = tiny_lm("qwen2", 0), _random_edit("position")
    save_selected(edit, tmp_path / "best.safetensors", coef=0.5, fraction=0.5, temperature=0.7,
                  provenance={"cell": "x"})
    sel = load_intervention(tmp_path / "best.safetensors")
    assert sel.temperature == 0.7 and sel.recommended["fraction"] == 0.5 and sel.recommended["provenance"]["cell"] == "x"
    cfg = SamplerConfig(n=4, max_new_tokens=6, seed=2, temperature=sel.temperature, device="cpu")
    got = sample_branches(model, tiny_tokenizer, PROMPTS, cfg, intervention=sel.apply(model))
    want = sample_branches(model, tiny_tokenizer, PROMPTS, cfg,
                           intervention=edit.apply(model, coef=0.5, fraction=0.5, where="all"))
    assert torch.equal(got.tokens, want.tokens), "load_intervention(...).apply(model) must use the saved settings"
    full = sample_branches(model, tiny_tokenizer, PROMPTS, cfg, intervention=sel.apply(model, fraction=1.0))
    assert not torch.equal(full.tokens, got.tokens), "a keyword overrides the recommended setting"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_intervention(bad)
    with pytest.raises(ValueError, match="needs objects outside the file"):
        save_selected(edit, tmp_path / "x.safetensors", gate="detector")


def test_shipped_learned_edits_fit_the_budget_and_are_reused_by_forksight_run():
    """experiments/results/learned: every recipe of `forksight run` ships trained on the shipped pair, within 1% of
    the RL model's parameters, with the provenance that lets the run reuse it instead of retraining."""
    from experiments.paths import ORGANISMS_DIR
    from experiments.study.learn_stage import LEARNED_DIR, MAX_PARAM_SHARE, RECIPES, shipped_edit
    from probe.models.checkpoint import load_causal_lm

    rl, _ = load_causal_lm(ORGANISMS_DIR / "rl-none", device="cpu")
    n_model = sum(p.numel() for p in rl.parameters())
    for name, recipe in RECIPES.items():
        path = shipped_edit(name, str(ORGANISMS_DIR / "base"), str(ORGANISMS_DIR / "rl-none"), LearnConfig(**recipe))
        assert path == str(LEARNED_DIR / f"{name}.safetensors"), f"{name}: no shipped edit matches its recipe"
        edit = LearnedEdit.load(path)
        assert edit.n_params() <= MAX_PARAM_SHARE * n_model and edit.meta["provenance"]["model_params"] == n_model
        edit.check_model(rl)


@pytest.mark.parametrize("objective", ["distill", "breadth"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(objective, tiny_lm, tiny_tokenizer, tmp_path,
                                                             monkeypatch):
    """`micro_batch` splits the teacher-forced rows (real models' logits do not fit at once) into
    chunks cut to their longest row: every mean keeps its whole-batch denominator, so the step's
    gradient equals the unchunked one. (Compared before Adam: at a zero-initialised edit some
    gradients are float noise, which Adam's normalisation would blow up to a visible step.)"""
    import sys

    mod = sys.modules["steering.learn"]
    grads, logs, backward = {}, {}, mod._backward

    def recording(cfg, rl_model, base_model, steer, *args):
        out = backward(cfg, rl_model, base_model, steer, *args)
        grads[cfg.micro_batch] = [p.grad.clone() for p in steer.edit_module.parameters()]
        return out

    monkeypatch.setattr(mod, "_backward", recording)
    for mb in (0, 5):
        cfg = LearnConfig(objective=objective, kind="position", layers=(0, 1), n_positions=3, steps=1, lr=0.05,
                          prompts_per_step=3, group_size=8, max_new_tokens=6, anchor=0.5, micro_batch=mb,
                          save_every=0)
        _, logs[mb] = learn(tiny_lm("qwen2", 0), tiny_tokenizer, EvenTask(), lambda s, k: PROMPTS[:k], cfg,
                            tmp_path / f"mb{mb}.st", base_model=tiny_lm("qwen2", 1))
    scale = max(g.abs().max().item() for g in grads[0])
    assert logs[0][-1]["loss"] != 0 and scale > 1e-4, "vacuous: the step must have a real gradient"
    for a, b in zip(grads[0], grads[5]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * scale, msg="chunking the rows changed the gradient "
                                   "beyond the float summation order")



@pytest.mark.parametrize("objective", ["distill", "breadth"])
def test_a_step_gradient_equals_the_loss_over_full_logits(objective, tiny_lm, tiny_tokenizer, tmp_path, monkeypatch):
    """The step forms logits only at the positions a term reads (`_logits_at`) and each KL or
    log-prob only at its own tokens; the gradient is the one of the plain formula over the whole
    batch's full logits, masked afterwards (here written out: KL(base || steered) at planning tokens
    or -advantage x log p at answer tokens, plus the anchor's KL(RL || steered) at execution tokens)."""
    from probe.metrics.evaluate import ROLE_CODE

    mod = sys.modules["steering.learn"]
    seen, backward = {}, mod._backward

    def recording(cfg, rl_model, base_model, steer, b, scored, m, rec):
        out = backward(cfg, rl_model, base_model, steer, b, scored, m, rec)
        params = list(steer.edit_module.parameters())
        seen["step"] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        tokens, attn = b.tokens, b.attn
        with steer, steer.positions(b.buckets):
            q = rl_model(input_ids=tokens, attention_mask=attn).logits[:, :-1]
        with torch.no_grad():
            plain = rl_model(input_ids=tokens, attention_mask=attn).logits[:, :-1]
        sel = (b.ans & (b.roles == ROLE_CODE["execution"]))[:, 1:]
        if cfg.objective == "distill":
            where = mod._distill_positions(cfg, base_model, b)[:, 1:]
            with torch.no_grad():
                p_base = base_model(input_ids=tokens, attention_mask=attn).logits[:, :-1]
            main = kl(p_base, q)[where].sum() / where.sum()
        else:
            adv = breadth_advantages(cfg.reward, scored.correct, scored.canonical, cfg.group_size, m, k=cfg.k,
                                     std_normalize=cfg.std_normalize)[0]
            lp = q.float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
            where = b.ans[:, 1:]
            main = -(adv[:, None] * lp)[where].sum() / where.sum()
        (main + cfg.anchor * kl(plain, q)[sel].sum() / sel.sum()).backward()
        seen["full"] = [p.grad.clone() for p in params]
        assert where.any() and sel.any(), "vacuous: both terms must read some tokens"
        return out

    monkeypatch.setattr(mod, "_backward", recording)
    # step 2 is compared (a fresh edit changes nothing, so at step 1 the anchor's gradient is 0); half
    # the rows unsteered and chunks of 2 rows: some chunks have no token any term reads
    cfg = LearnConfig(objective=objective, kind="lowrank", layers=(0, 1), rank=2, steps=2, lr=0.05,
                      prompts_per_step=3, group_size=8, max_new_tokens=6, anchor=0.5, distill_at="planning",
                      fraction=0.5, micro_batch=2, save_every=0)
    _, log = learn(tiny_lm("qwen2", 0), tiny_tokenizer, EvenTask(), lambda s, k: PROMPTS[:k], cfg, tmp_path / "g.st",
                   base_model=tiny_lm("qwen2", 1))
    assert log[-1]["anchor_kl"] > 1e-6, "vacuous: the anchor must pull on the compared step"
    scale = max(g.abs().max().item() for g in seen["full"])
    assert scale > 1e-4, "vacuous: the step must have a real gradient"
    for a, b in zip(seen["full"], seen["step"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * scale, msg="the step's gradient left the full-logits "
                                   "formula beyond float summation order")

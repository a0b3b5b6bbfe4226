"""GRPO learner against hand-worked tensors, and the trainer's reproducibility and resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from experiments.paths import ORGANISMS_DIR
from experiments.training.grpo import GRPOConfig, build_rollouts, train_grpo
from experiments.training.grpo_loss import (
    LossConfig,
    Rollouts,
    clip_cov_select,
    group_advantages,
    grpo_loss,
    kl_cov_select,
    pass_at_k_advantages,
    regime_advantages,
    shapley_distinct_shares,
    token_covariance,
)
from probe.sampling.sampler import Branches

BASE = ORGANISMS_DIR / "base"


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    std = group_advantages(r, 4, std_normalize=True)
    s = math.sqrt(0.75 * 0.25)  # population std of [1, 0, 0, 0]
    assert torch.allclose(std[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s + 1e-6))
    assert torch.equal(std[4:], torch.zeros(4)), "a group with equal rewards carries no signal"
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(r, 1)


def _batch(logp_old, adv, mask, entropy=None):
    rows, seq = logp_old.shape
    return Rollouts(
        input_ids=torch.zeros(rows, seq, dtype=torch.long),
        attention_mask=torch.ones(rows, seq, dtype=torch.long),
        position_ids=torch.arange(seq).expand(rows, seq),
        answer_mask=mask,
        old_logprobs=logp_old,
        old_entropy=entropy if entropy is not None else torch.zeros(rows, seq),
        rewards=torch.zeros(rows),
        advantages=adv,
    )


def test_vanilla_loss_is_token_normalised_policy_gradient():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    old = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.25, 1.0, 1.0]]))
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    loss, _ = grpo_loss(new, torch.zeros(2, 3), _batch(old, adv, mask), LossConfig())
    # ratio = 1 everywhere: loss = -(1 + 1 - 2) / 3 tokens
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    want = torch.tensor([[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0]])
    assert torch.allclose(new.grad, want), "d loss / d logp must be -A / n_tokens on answer tokens only"


def test_ratio_clipping_stops_the_gradient_past_epsilon():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.9)]], requires_grad=True)
    loss, stats = grpo_loss(new, torch.zeros(1, 2), _batch(old, torch.tensor([1.0]), mask), LossConfig())
    loss.backward()
    # token 0: ratio 1.5 > 1.2 with A > 0 -> clipped, no gradient; token 1: ratio 0.9 inside
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == pytest.approx(-0.9 / 2)
    assert stats["ratio_clipped_frac"] == pytest.approx(0.5)


def test_token_covariance_and_cov_selections_by_hand():
    mask = torch.tensor([[True, True], [True, False]])
    logp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    cov = token_covariance(logp, adv, mask)
    # mean logp over masked = -2; mean A over masked tokens = (1 + 1 - 2) / 3 = 0
    assert torch.allclose(cov, torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    kl = kl_cov_select(cov, mask, LossConfig(intervention="kl-cov", kl_cov_ratio=0.34))
    assert kl.tolist() == [[True, False], [False, False]], "KL-Cov takes the highest-covariance token"
    cfg = LossConfig(intervention="clip-cov", clip_cov_ratio=0.34, clip_cov_low=0.5, clip_cov_high=5)
    cc = clip_cov_select(cov, mask, cfg, torch.Generator().manual_seed(0))
    assert cc.tolist() == [[True, False], [False, False]], "Clip-Cov draws only from [low, high] covariance"


def test_interventions_change_the_gradient_where_they_should():
    mask = torch.ones(2, 3, dtype=torch.bool)
    old = torch.log(torch.full((2, 3), 0.5))
    adv = torch.tensor([1.0, -1.0])
    ent = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.05, 0.8]])
    batch = _batch(old, adv, mask, entropy=ent)

    def grad(cfg, logp=None):
        new = (old if logp is None else logp).clone().requires_grad_(True)
        loss, stats = grpo_loss(new, torch.zeros(2, 3), batch, cfg)
        loss.backward()
        return new.grad, stats

    g_forks, s = grad(LossConfig(intervention="forks-only", fork_rho=0.33))  # ceil(0.33 * 6) = 2 forks
    assert (g_forks != 0).tolist() == [[False, True, False], [False, False, True]], "gradient only on top-entropy tokens"
    assert s["intervened_frac"] == pytest.approx(2 / 6)
    g_cc, _ = grad(LossConfig(intervention="clip-cov", clip_cov_ratio=0.2, clip_cov_low=-1, clip_cov_high=1))
    assert (g_cc == 0).sum() == 1, "Clip-Cov detaches exactly ratio * n_tokens tokens"
    moved = old + torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    g_kl, _ = grad(LossConfig(intervention="kl-cov", kl_cov_ratio=0.17, kl_cov_coef=1.0), logp=moved)
    g_none, _ = grad(LossConfig(), logp=moved)
    assert not torch.allclose(g_kl, g_none), "KL-Cov must add a penalty once the policy moved"
    ent_new = torch.ones(2, 3, requires_grad=True)
    loss, _ = grpo_loss(old.clone().requires_grad_(True), ent_new, batch, LossConfig(intervention="entropy-bonus", entropy_coef=0.5))
    loss.backward()
    assert torch.allclose(ent_new.grad, torch.full((2, 3), -0.5 / 6)), "entropy bonus pushes entropy up"


# --- regimes that change the advantage: each against its paper's formula by brute force ------------
def test_pass_at_k_advantage_equals_the_mean_over_k_subsets_by_brute_force():
    from itertools import combinations

    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0,  0, 0, 0, 0, 0, 1,  1, 1, 1, 1, 1, 0,  0, 0, 0, 0, 0, 0])
    g, k = 6, 3
    for std in (False, True):
        adv = pass_at_k_advantages(rewards, g, k, std_normalize=std)
        for p in range(4):
            grp = rewards[p * g:(p + 1) * g].tolist()
            subsets = list(combinations(range(g), k))
            r_group = sum(max(grp[j] for j in s) for s in subsets) / len(subsets)  # expected pass@k
            sigma = math.sqrt(r_group * (1 - r_group))
            for i in range(g):
                mine = [max(grp[j] for j in s) for s in subsets if i in s]
                want = sum(mine) / len(mine) - r_group  # arXiv:2508.10751: E[subset reward | i in it] - R
                if std:
                    want = want / (sigma + 1e-6) if sigma > 0 else 0.0
                assert adv[p * g + i].item() == pytest.approx(want, abs=1e-6), (
                    f"group {p} sample {i} (std={std}): the analytical pass@k advantage must equal the subset average")
    with pytest.raises(ValueError, match="pass_k"):
        pass_at_k_advantages(rewards, g, 7)


def test_vpo_distinct_credit_is_the_shapley_value_of_distinct_correct_by_brute_force():
    from itertools import permutations

    keys = ["a", "a", None, "b", "c", None, "c", "c"]  # two groups of 4 (4! orderings each)
    g = 4
    shares = shapley_distinct_shares(keys, g)
    for p in range(2):
        grp = keys[p * g:(p + 1) * g]
        F = lambda idx, grp=grp: len({grp[j] for j in idx if grp[j] is not None})  # noqa: E731  distinct correct
        orders = list(permutations(range(g)))
        for i in range(g):
            marg = [F(o[:o.index(i) + 1]) - F(o[:o.index(i)]) for o in orders]
            assert shares[p * g + i].item() == pytest.approx(sum(marg) / len(marg)), "credit must be the Shapley value"
        assert shares[p * g:(p + 1) * g].sum().item() == pytest.approx(F(range(g))), "shares sum to the set objective"
    adv = regime_advantages(torch.tensor([float(k is not None) for k in keys]), g, LossConfig(intervention="vpo-distinct"),
                            keys=keys)
    assert torch.allclose(adv, shares - shares.view(2, g).mean(1).repeat_interleave(g)), "advantage = share - group mean"
    assert adv[3] > adv[0] > adv[2], "a unique correct answer beats a duplicated one, which beats a wrong one"
    with pytest.raises(ValueError, match="canonical key"):
        regime_advantages(torch.ones(4), 4, LossConfig(intervention="vpo-distinct"))


def test_nsr_and_w_reinforce_give_the_papers_reinforce_gradient():
    # arXiv:2506.01347: grad L_NSR = + sum over wrong samples' tokens of grad log pi; W-REINFORCE adds
    # - lambda * (the same over right samples); token-normalised here, ratio 1 at the first mini-batch
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [True, True, False]])
    old = torch.log(torch.full((4, 3), 0.5))
    n_tok = mask.sum().item()
    for iv, lam in (("nsr", 0.0), ("w-reinforce", 0.1), ("w-reinforce", 0.5)):
        cfg = LossConfig(intervention=iv, w_reinforce_lambda=lam if iv == "w-reinforce" else 0.1)
        adv = regime_advantages(rewards, 2, cfg)
        new = old.clone().requires_grad_(True)
        loss, _ = grpo_loss(new, torch.zeros(4, 3), _batch(old, adv, mask), cfg)
        loss.backward()
        per_row = torch.where(rewards > 0.5, -torch.tensor(lam), torch.tensor(1.0))  # d loss / d log pi
        want = (per_row[:, None] * mask) / n_tok
        assert torch.allclose(new.grad, want), f"{iv} (lambda {lam}): gradient must be the paper's REINFORCE term"
    assert torch.equal(regime_advantages(rewards, 2, LossConfig()), group_advantages(rewards, 2)), \
        "the token-loss interventions keep GRPO's group advantages"


def test_build_rollouts_aligns_prompt_and_completion():
    b = Branches(
        prompt_index=torch.tensor([0, 0, 1, 1]),
        sample_index=torch.tensor([0, 1, 0, 1]),
        tokens=torch.tensor([[7, 8, 1], [9, 1, 0], [7, 1, 0], [8, 8, 8]]),
        mask=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        logprobs=-torch.ones(4, 3),
        entropy=torch.ones(4, 3),
        finish_reason=["eos", "eos", "eos", "length"],
        prompt_tokens=[[5, 6, 7], [5]],
    )
    r = build_rollouts(b, torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, False, pad_id=0)
    assert r.input_ids[0].tolist() == [5, 6, 7, 7, 8, 1]
    assert r.input_ids[2].tolist() == [0, 0, 5, 7, 1, 0]
    assert r.attention_mask[2].tolist() == [0, 0, 1, 1, 1, 0]
    assert r.position_ids[2].tolist()[2:5] == [0, 1, 2], "left padding must not shift positions"
    assert r.answer_mask[1].tolist() == [False, False, False, True, True, False]
    assert r.advantages.tolist() == [0.5, -0.5, 0.0, 0.0]


def test_bad_rl_configs_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="G >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="unknown intervention"):
        LossConfig(intervention="entropy-magic")
    with pytest.raises(ValueError, match="cannot start this RL run"):
        train_grpo(GRPOConfig(base=str(tmp_path), out=str(tmp_path / "o")), LossConfig())


def _tiny(out, **kw):
    base = dict(base=str(BASE), out=str(out), steps=4, prompts_per_step=4, group_size=4, lr=1e-4,
                mini_batches=2, eval_problems=4, eval_samples=2, final_eval_samples=0, save_every=2,
                device="cpu")
    return GRPOConfig(**{**base, **kw})


@pytest.mark.slow
def test_rl_is_bit_reproducible_and_resume_equals_uninterrupted(tmp_path):
    loss = LossConfig(intervention="clip-cov")
    train_grpo(_tiny(tmp_path / "a"), loss)
    train_grpo(_tiny(tmp_path / "b"), loss)
    train_grpo(_tiny(tmp_path / "c"), loss, stop_after=3)  # killed after step 3: last save at 2
    train_grpo(_tiny(tmp_path / "c"), loss)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    for other in ("b", "c"):
        o = load_file(str(tmp_path / other / "model.safetensors"))
        for k in a:
            assert torch.equal(a[k], o[k]), f"run {other}: {k} differs (seeded RL must be exact)"
    def measured(run: str) -> list[dict]:  # every logged number but the step's wall-clock seconds
        rows = [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        assert all(r.pop("seconds") >= 0 for r in rows), "each step logs its wall time"
        return rows

    log_a = measured("a")
    assert log_a == measured("c"), "resumed log must equal the uninterrupted one"
    assert [r["step"] for r in log_a] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_few_rl_steps_raise_reward(tmp_path):
    # a fixed pool of 16 problems, all of them in every step: reward is comparable across steps
    cfg = _tiny(tmp_path / "r", steps=10, prompts_per_step=16, group_size=8, lr=5e-4, problem_pool=16,
                eval_problems=4, eval_samples=2, save_every=100)
    train_grpo(cfg, LossConfig())
    log = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    first = sum(r["reward_mean"] for r in log[:3]) / 3
    last = sum(r["reward_mean"] for r in log[-3:]) / 3
    assert last > first + 0.03, f"reward did not rise on a fixed problem pool: {first:.3f} -> {last:.3f}"


@pytest.mark.slow
def test_lora_rl_resumes_exactly_and_ships_an_adapter_that_loads_as_base_plus_adapter(tmp_path):
    from probe.models.adapters import AdapterError
    from probe.models.checkpoint import load_causal_lm

    loss = LossConfig()
    kw = dict(lora_rank=4, steps=3, save_every=1, eval_every=2)
    train_grpo(_tiny(tmp_path / "a", **kw), loss)
    train_grpo(_tiny(tmp_path / "c", **kw), loss, stop_after=2)  # killed after step 2
    train_grpo(_tiny(tmp_path / "c", **kw), loss)
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files, \
        f"a LoRA run ships its adapter, never merged weights: {files}"
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), \
        "a resumed float32 LoRA run must equal the uninterrupted one bit for bit (same seed, device, versions)"
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k), "the adapter never moved off its init"
    state = load_file(str(next((tmp_path / "a" / "state").glob("step-*")) / "model.safetensors"))
    assert state and all("lora" in k for k in state), "the resumable state holds only the adapter's parameters"
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert ["pass_at_1" in r for r in log] == [True, False, True], "eval_every=2 scores steps 0 and 2 (the last)"

    tokens = torch.tensor([[1, 5, 9, 12, 7]])
    merged, _ = load_causal_lm(f"{BASE}+{tmp_path / 'a'}", device="cpu")
    base, _ = load_causal_lm(BASE, device="cpu")
    with torch.no_grad():
        diff = (merged(tokens).logits - base(tokens).logits).abs().max().item()
    assert diff > 0, "BASE+ADAPTER must apply the adapter"
    other = tmp_path / "other-base"
    base.model.embed_tokens.weight.data[0] += 1.0  # another base: same architecture, other weights
    base.save_pretrained(str(other))
    _.save_pretrained(str(other))
    with pytest.raises(AdapterError, match="trained from base"):
        load_causal_lm(f"{other}+{tmp_path / 'a'}", device="cpu")


def test_organism_rl_again_on_a_finished_run_trains_and_rewrites_nothing(tmp_path, capsys):
    from experiments.cli import main

    out = tmp_path / "r"
    args = ["organism", "rl", "--base", str(BASE), "--out", str(out), "--steps", "1", "--prompts-per-step", "2",
            "--group-size", "2", "--eval-problems", "2", "--eval-samples", "1", "--final-eval-samples", "0",
            "--save-every", "1", "--device", "cpu"]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0
    assert '"already_trained": true' in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "a finished run is left as it is"
    assert main([*args[:-4], "--save-every", "1", "--steps", "2", "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 2, "more steps: it trains on"

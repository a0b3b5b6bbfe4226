"""Oracle tests for the probe's pure functions: hand-computed tensors, brute force, synthetic laws."""

import json
import math

import pytest
import torch

from probe.detector import ForkDetector, auroc, split_groups
from probe.entropy import kl, token_stats
from probe.forks import (
    ROLE_CODES,
    entropy_change_share_ci,
    entropy_change_share_on_forks,
    fork_overlap,
    role_split,
)
from probe.law import (
    bootstrap_law,
    extrapolation_error,
    fit_entropy_law,
    read_log_keys,
    read_train_log,
)
from probe.models.pair import ContextLengthError, HookedModel

# --- entropy / logprob / KL -----------------------------------------------------------------------


class FixedLogits(HookedModel):
    """A HookedModel stand-in that returns preset logits (no network)."""

    def __init__(self, logits, n_ctx=16):
        self._logits, self._n_ctx, self.name = logits, n_ctx, "fixed"

    @property
    def n_ctx(self):
        return self._n_ctx

    def logits(self, tokens, attention_mask=None):
        self.check_context(tokens.shape[1])
        return self._logits[: tokens.shape[0], : tokens.shape[1]]


def test_token_stats_entropy_and_logprob_by_hand_and_aligned_to_the_predicted_token():
    q = math.log(3.0)
    # position 0 predicts token 1: p = [1/4, 3/4, 0]; position 1 predicts token 2: uniform over 3
    logits = torch.tensor([[[0.0, q, -float("inf")], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1, 0]])
    ent, lp = token_stats(FixedLogits(logits), tokens)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ent[0].tolist() == pytest.approx([0.0, h1, math.log(3)], abs=1e-6), \
        "stats at t must come from logits at t-1 (the distribution that sampled token t)"
    assert lp[0].tolist() == pytest.approx([0.0, math.log(0.75), math.log(1 / 3)], abs=1e-6)
    ent, lp = token_stats(FixedLogits(logits), tokens, answer_mask=torch.tensor([[False, False, True]]))
    assert ent[0, 1] == 0 and ent[0, 2] == pytest.approx(math.log(3)), "outside the answer mask stats are 0"
    with pytest.raises(ValueError, match="position 0"):
        token_stats(FixedLogits(logits), tokens, answer_mask=torch.tensor([[True, True, True]]))
    with pytest.raises(ValueError, match="subset of attention_mask"):
        token_stats(FixedLogits(logits), tokens, torch.tensor([[1, 1, 0]]), torch.tensor([[False, True, True]]))
    with pytest.raises(ContextLengthError, match="n_ctx=2"):
        token_stats(FixedLogits(logits, n_ctx=2), tokens)


def test_kl_by_hand_both_directions_and_zero_on_itself():
    p = torch.tensor([[0.0, 0.0], [math.log(0.25), math.log(0.75)]])  # [1/2, 1/2] and [1/4, 3/4]
    q = torch.tensor([[math.log(0.25), math.log(0.75)], [0.0, 0.0]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    want_rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl(p, q).tolist() == pytest.approx([want, want_rev], abs=1e-6)
    assert kl(p, p).abs().max() < 1e-7, "KL of a distribution with itself is 0"
    inf = torch.tensor([[0.0, -float("inf")]])  # p puts no mass where q is 0: finite
    assert kl(inf, torch.zeros(1, 2)).item() == pytest.approx(math.log(2))


# --- forks across models --------------------------------------------------------------------------


def test_fork_overlap_and_entropy_change_share_by_hand():
    a = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)
    ov = fork_overlap(a, b)
    assert ov["jaccard"] == pytest.approx(1 / 3) and ov["a_in_b"] == 0.5 and ov["b_in_a"] == 0.5
    assert fork_overlap(a, torch.zeros_like(a))["a_in_b"] == 0 and fork_overlap(b & ~b, b & ~b)["jaccard"] is None

    h_base = torch.tensor([[2.0, 1.0, 1.0, 0.5, 9.0]])
    h_rl = torch.tensor([[0.5, 0.0, 1.5, 0.5, 0.0]])  # dH = -1.5, -1, +0.5, 0, (padding)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    forks = torch.tensor([[1, 0, 0, 0, 1]], dtype=torch.bool)  # the padded "fork" is ignored
    assert entropy_change_share_on_forks(h_base, h_rl, mask, forks) == pytest.approx(1.5 / 3.0)
    assert entropy_change_share_on_forks(h_base, h_rl, mask, forks, signed=True) == pytest.approx(-1.5 / -2.0)
    assert entropy_change_share_on_forks(h_base, h_base, mask, forks) is None, "no change: share undefined"
    with pytest.raises(ValueError, match="shapes differ"):
        entropy_change_share_on_forks(h_base, h_rl[:, :3], mask, forks)


def test_role_split_by_hand():
    P, E, OTHER = ROLE_CODES["planning"], ROLE_CODES["execution"], ROLE_CODES["other"]
    entropy = torch.tensor([[2.0, 0.1, 1.0, 0.3, 7.0]])
    roles = torch.tensor([[P, E, P, E, OTHER]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    forks = torch.tensor([[1, 0, 0, 1, 0]], dtype=torch.bool)
    s = role_split(entropy, mask, roles, forks)
    assert s["planning"] == {"n_tokens": 2, "entropy_mean": pytest.approx(1.5), "n_forks": 1,
                             "fork_rate": 0.5, "fork_share": 0.5}
    assert s["execution"]["entropy_mean"] == pytest.approx(0.2) and s["execution"]["fork_share"] == 0.5
    assert s["other"]["n_tokens"] == 0 and s["other"]["entropy_mean"] is None, "padding is not a token"


# --- AUROC and the detector -----------------------------------------------------------------------


def _brute_auroc(s, y):
    pos, neg = s[y].tolist(), s[~y].tolist()
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_equals_brute_force_pairwise_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(2, 40, (1,), generator=g))
        s = torch.randint(0, 5 if trial % 2 else 1000, (n,), generator=g).float()  # many ties when odd
        y = torch.rand(n, generator=g) < 0.4
        y[0], y[1] = True, False
        assert auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12), "rank formula must equal pairs"
    assert auroc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([True, False, False])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))


def _synthetic_resid(n_groups=40, per_group=25, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_groups * per_group
    signal = torch.randn(n, d, generator=g)
    labels = signal[:, 0] + 0.3 * torch.randn(n, generator=g) > 0.8  # ~20% positives, linear in feature 0
    noise = torch.randn(n, d, generator=g)  # a layer that knows nothing
    groups = torch.arange(n_groups).repeat_interleave(per_group)
    return {0: noise, 3: signal * 5 + 2}, labels, groups


def test_detector_reads_a_linear_signal_beats_its_control_and_splits_by_group(tmp_path):
    resid, labels, groups = _synthetic_resid()
    det = ForkDetector.fit(resid, labels, groups, seed=1, meta={"hook_site": "blocks.{L}.hook_resid_post"})
    rep = det.meta["report"]["layers"]
    assert rep["3"]["auroc_test"] > 0.95, "a linearly decodable label must be decoded on held-out groups"
    assert abs(rep["3"]["auroc_control"] - 0.5) < 0.15, "shuffled labels must give chance AUROC"
    assert abs(rep["0"]["auroc_test"] - 0.5) < 0.15, "a layer without the signal must give chance AUROC"
    assert det.best_layer == 3
    test = split_groups(groups, 0.25, seed=1)
    assert not set(groups[test].tolist()) & set(groups[~test].tolist()), "no group on both sides"
    assert det.meta["report"]["n_test"] == int(test.sum())

    path = det.save(tmp_path / "det.safetensors")
    back = ForkDetector.load(path)
    x = resid[3][:50]
    for layer, p in det.params.items():  # the promise: a file stores float32 values bit for bit
        assert all(torch.equal(back.params[layer][k], v) for k, v in p.items()), f"layer {layer} changed on save/load"
    torch.testing.assert_close(back.predict_proba(x), det.predict_proba(x), atol=1e-6, rtol=0,
                               msg="the loaded probe scores differently (float32 rounding of a sigmoid in [0, 1]: 1e-6)")
    assert back.meta == det.meta and back.predict_proba(x, layer=0).shape == (50,)
    with pytest.raises(KeyError, match="layers \\[0, 3\\]"):
        det.predict_proba(x, layer=1)
    with pytest.raises(ValueError, match="d_model=8"):
        det.predict_proba(torch.zeros(2, 5), layer=3)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fork detector"):
        ForkDetector.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="at least 2"):
        ForkDetector.fit(resid, labels, torch.zeros_like(groups))


# --- the entropy-performance law ------------------------------------------------------------------


def test_law_fit_recovers_known_a_b_from_noisy_synthetic_data():
    g = torch.Generator().manual_seed(0)
    a, b = 0.35, 1.10
    h = torch.linspace(1.2, 0.05, 200, dtype=torch.float64)  # entropy falls during training
    r = -a * h.exp() + b + 0.005 * torch.randn(200, generator=g, dtype=torch.float64)
    fit = fit_entropy_law(h, r)
    assert fit.a == pytest.approx(a, abs=0.01) and fit.b == pytest.approx(b, abs=0.01)
    assert fit.ceiling == pytest.approx(-a + b, abs=0.01) and fit.r2 > 0.99
    exact = fit_entropy_law([0.0, math.log(2), math.log(3)], [1.0, 0.5, 0.0])  # R = -0.5 x + 1.5
    assert (exact.a, exact.b, exact.r2) == pytest.approx((0.5, 1.5, 1.0), abs=1e-12)
    ext = extrapolation_error(h, r, fit_fraction=0.5)
    assert ext["n_fit"] == 100 and ext["n_test"] == 100
    assert ext["mae"] < 0.02, "a law fit on the first half must predict the second half"
    with pytest.raises(ValueError, match="2 distinct entropies"):
        fit_entropy_law([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one reward per entropy"):
        fit_entropy_law([0.5, 0.6], [0.1])


def test_read_train_log_skips_other_records_and_names_missing_keys(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": i, "entropy_mean": 1.0 - 0.1 * i, "reward_mean": 0.1 * i} for i in range(4)]
    lines.insert(2, {"step": 2, "eval_pass_at_1": 0.5})
    log.write_text("\n".join(map(json.dumps, lines)) + "\n")
    h, r = read_train_log(log)
    assert h.tolist() == pytest.approx([1.0, 0.9, 0.8, 0.7]) and r.tolist() == pytest.approx([0, 0.1, 0.2, 0.3])
    log.write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="keys present: \\['loss'\\]"):
        read_train_log(log)
    log.write_text("{oops\n")
    with pytest.raises(ValueError, match=":1 is not JSON"):
        read_train_log(log)
    with pytest.raises(FileNotFoundError):
        read_train_log(tmp_path / "missing.jsonl")


def test_bootstrap_law_brackets_the_generating_coefficients():
    g = torch.Generator().manual_seed(0)
    h = torch.linspace(0.05, 0.6, 120, dtype=torch.float64)
    r = -0.8 * h.exp() + 1.7 + 0.01 * torch.randn(120, generator=g, dtype=torch.float64)
    boot = bootstrap_law(h, r, n_boot=300, seed=1)
    fit = fit_entropy_law(h, r)
    assert boot["a"][0] < fit.a < boot["a"][1] and boot["b"][0] < fit.b < boot["b"][1]
    # the interval's half-width matches ordinary least squares' 1.96 standard errors of the slope
    x = h.exp()
    resid = r - fit.predict(h)
    se = (resid.pow(2).sum() / (len(h) - 2)).sqrt() / (x - x.mean()).pow(2).sum().sqrt()
    half = (boot["a"][1] - boot["a"][0]) / 2
    assert 0.7 < half / (1.96 * se.item()) < 1.4
    assert boot["r2"][0] > 0.9 and boot["n_failed"] == 0
    assert bootstrap_law(h, r, n_boot=300, seed=1) == boot, "seeded"
    flat = bootstrap_law(torch.tensor([0.1, 0.1, 0.1, 0.2]), torch.tensor([1.0, 2.0, 3.0, 4.0]), n_boot=200)
    assert flat["n_failed"] > 0, "resamples with one distinct entropy cannot be fitted and are counted"


def test_entropy_change_share_ci_resamples_problems_around_the_point_estimate():
    g = torch.Generator().manual_seed(0)
    hb, hr = torch.rand(40, 6, generator=g), torch.rand(40, 6, generator=g)
    mask = torch.ones(40, 6, dtype=torch.bool)
    forks = torch.zeros(40, 6, dtype=torch.bool)
    forks[:, 0] = True
    groups = torch.arange(40) // 4  # 10 problems x 4 trajectories
    point = entropy_change_share_on_forks(hb, hr, mask, forks)
    lo, hi = entropy_change_share_ci(hb, hr, mask, forks, groups, n_boot=500)
    assert lo < point < hi and 0 <= lo and hi <= 1
    assert entropy_change_share_ci(hb, hb, mask, forks, groups) is None, "no change, no share"


def test_read_log_keys_returns_columns_and_names_missing_keys(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"a": i, "b": 2 * i}) for i in range(4)) + '\n{"a": 9}\n')
    cols = read_log_keys(log, ("a", "b"))
    assert cols["b"].tolist() == [0.0, 2.0, 4.0, 6.0], "lines lacking a key are skipped"
    with pytest.raises(ValueError, match="keys present: \\['a', 'b'\\]"):
        read_log_keys(log, ("a", "c"))

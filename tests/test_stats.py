"""probe.stats: the one resampler (plain, paired, clustered, stratified), its intervals, exact Student-t
quantiles and the one interval formatter; and the pass@k advantage / distinct share both trainers share."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import pytest
import torch

from probe.metrics.passk import distinct_solution_shares, pass_at_k_advantages
from probe.stats import (
    bootstrap_ci,
    bootstrap_weights,
    cluster_ids,
    format_interval,
    format_number,
    mean_ci,
    paired_ci,
    percentile_interval,
    resample_indices,
    t_quantile,
)


# --- resampling ------------------------------------------------------------------------------------
def test_resample_indices_is_seeded_and_strata_extend_the_same_stream():
    one = resample_indices(7, 50, seed=3)
    assert one.shape == (1, 50, 7) and one.dtype == torch.long and 0 <= int(one.min()) and int(one.max()) <= 6
    assert torch.equal(one, resample_indices(7, 50, seed=3)), "same seed, same draws"
    assert not torch.equal(one, resample_indices(7, 50, seed=4)), "the seed must matter"
    three = resample_indices(7, 50, seed=3, strata=3)
    assert three.shape == (3, 50, 7) and torch.equal(three[0], one[0]), "stratum 0 does not depend on strata"
    assert not torch.equal(three[0], three[1]), "strata are independent draws"
    g = torch.Generator().manual_seed(3)  # the stream is torch's randint, stratum after stratum
    assert torch.equal(three[1], (torch.randint(7, (50, 7), generator=g), torch.randint(7, (50, 7), generator=g))[1])
    for bad, match in (((0, 5), "n=0"), ((5, 0), "n_boot=0")):
        with pytest.raises(ValueError, match=match):
            resample_indices(*bad)


def test_bootstrap_weights_count_draws_and_move_clusters_together():
    w = bootstrap_weights(6, 200, seed=1)
    assert w.shape == (201, 6) and w.dtype == torch.float64
    assert torch.equal(w[0], torch.ones(6, dtype=torch.float64)), "row 0 is the full sample"
    assert torch.equal(w[1:].sum(1), torch.full((200,), 6.0, dtype=torch.float64)), "each replicate draws n rows"
    idx = resample_indices(6, 200, seed=1)[0]
    assert torch.equal(w[1:], torch.stack([torch.bincount(r, minlength=6) for r in idx]).double()), \
        "weights are the draw counts of resample_indices"
    clusters = [10, 20, 10, 30, 20, 10]  # rows of one problem (e.g. its seeds) move together
    wc = bootstrap_weights(6, 200, seed=1, clusters=clusters)
    assert torch.equal(wc[:, 0], wc[:, 2]) and torch.equal(wc[:, 0], wc[:, 5]) and torch.equal(wc[:, 1], wc[:, 4])
    assert torch.equal(wc[1:, [0, 1, 3]].sum(1), torch.full((200,), 3.0, dtype=torch.float64)), "3 clusters drawn"
    assert cluster_ids(6, clusters).tolist() == [0, 1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="clusters has 2 entries for 6 rows"):
        bootstrap_weights(6, 10, clusters=[0, 1])


def test_plain_paired_and_weighted_bootstraps_agree_on_the_same_draws():
    x = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7, 0.0, 1.0, 0.3], dtype=torch.float64)
    lo, hi = bootstrap_ci(x, n_boot=300, seed=5)
    w = bootstrap_weights(8, 300, seed=5)
    assert (lo, hi) == pytest.approx(percentile_interval((w[1:] @ x) / 8), abs=1e-12), \
        "the mean of resampled rows is the weighted mean with the draw counts"
    a, b = [0.2, 0.5, 0.9, 0.1], [0.3, 0.5, 1.0, 0.4]
    diff = lambda t: (t[:, 1] - t[:, 0]).mean()  # noqa: E731
    diffs = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    assert paired_ci((a, b), diff, seed=2, n_boot=300) == pytest.approx(bootstrap_ci(diffs, n_boot=300, seed=2),
                                                                         abs=1e-12), "paired = resampling differences"
    with pytest.raises(ValueError, match="one value per problem"):
        paired_ci(([1.0, 2.0], [1.0]), diff)


def test_percentile_interval_linear_and_order_statistics():
    v = torch.arange(101, dtype=torch.float64)  # quantile q of 0..100 is 100 q
    assert percentile_interval(v) == pytest.approx((2.5, 97.5))
    assert percentile_interval(v, order_statistics=True) == (2.0, 98.0), "order statistics: below and above"
    censored = torch.tensor([1.0, 2.0, math.inf, math.inf], dtype=torch.float64)
    assert percentile_interval(censored, 0.5, order_statistics=True) == (1.0, math.inf)
    with pytest.raises(ValueError, match="alpha=1.5"):
        percentile_interval(v, 1.5)


# --- Student-t --------------------------------------------------------------------------------------
def test_t_quantile_is_exact_beyond_any_table_and_wider_than_the_normal():
    assert t_quantile(12) == pytest.approx(2.179, abs=5e-4)
    assert t_quantile(30) == pytest.approx(2.042, abs=5e-4)
    assert t_quantile(12) > t_quantile(30) > 2.0 > 1.96, "a t interval is wider than 2 sd/sqrt(n) at these df"
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6) and t_quantile(10) == pytest.approx(2.228139, abs=1e-6)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0)


def test_mean_ci_uses_the_exact_quantile():
    vals = [0.8, 0.7, 0.9] + [0.75] * 10  # 13 values: df = 12, past where a table would stop
    m, h = mean_ci(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 12)
    assert m == pytest.approx(sum(vals) / 13) and h == pytest.approx(t_quantile(12) * sd / math.sqrt(13))
    assert mean_ci([0.4]) == (0.4, 0.0)


# --- printing --------------------------------------------------------------------------------------
def test_format_interval_and_number():
    assert format_number(0.12345) == "0.123" and format_number(0.1, 2, signed=True) == "+0.10"
    assert format_number(None) == format_number(math.nan) == "n/a" and format_number(3) == "3"
    assert format_number([0.5, None]) == "[0.500, n/a]"
    assert format_interval([0.1, 0.25]) == "[0.100, 0.250]"
    assert format_interval([-0.02, 0.0], signed=True) == "[-0.020, +0.000]", "the sweep tables' signed form"
    assert format_interval(None) == "n/a" and format_interval([], missing="[n/a]") == "[n/a]"
    assert format_interval([2.0, None], 2, prefix="x", open_bound="more than x8") == "[x2.00, more than x8]"
    assert format_interval([3.0, None], open_bound="more") == "[3.000, more]"
    assert format_interval([math.nan, 1.0], prefix="x") == "[n/a, x1.000]"
    with pytest.raises(ValueError, match=r"two bounds \[lo, hi\]; got \[1, 2, 3\]"):
        format_interval([1, 2, 3])


# --- the trainers' shared signals --------------------------------------------------------------------
def test_pass_at_k_advantages_are_exact_subset_averages_for_every_group_composition():
    n, k = 6, 3
    for wrong in range(n + 1):
        grp = [1] * (n - wrong) + [0] * wrong
        subsets = list(combinations(range(n), k))
        r = Fraction(sum(max(grp[j] for j in s) for s in subsets), len(subsets))
        adv = pass_at_k_advantages(torch.tensor(grp, dtype=torch.float64), n, k)
        for i in range(n):
            mine = [max(grp[j] for j in s) for s in subsets if i in s]
            want = 0 if wrong in (0, n) else Fraction(sum(mine), len(mine)) - r
            assert adv[i].item() == pytest.approx(float(want), abs=1e-15)
    bools = pass_at_k_advantages(torch.tensor([True, False, False, False]), 4, 2)
    assert bools.dtype == torch.float32, "bool correctness gives float32 advantages"
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        pass_at_k_advantages(torch.ones(6), 4, 2)


def test_both_trainers_use_the_one_implementation():
    from experiments.training import grpo_loss
    from steering.breadth_reward import pass_at_k_advantage, unique_reward

    assert grpo_loss.pass_at_k_advantages is pass_at_k_advantages
    assert grpo_loss.shapley_distinct_shares is distinct_solution_shares is unique_reward
    correct = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]).bool()
    assert torch.equal(pass_at_k_advantage(correct, 4, 2),
                       pass_at_k_advantages(correct, 4, 2, std_normalize=True, eps=0.0))
    with pytest.raises(ValueError, match="group_size=4"):
        distinct_solution_shares(["a", None, "b"], 4)

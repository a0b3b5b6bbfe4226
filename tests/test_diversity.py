"""Oracle tests for probe.metrics.passk and probe.forks: brute force and exact arithmetic, no models."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.forks import fork_mask, fork_threshold, n_forks
from probe.metrics.passk import (
    crossover_k,
    distinct_correct,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_per_problem,
    solved_coverage,
)
from probe.stats import bootstrap_ci


def brute_pass_at_k(correct: list[bool], k: int) -> Fraction:
    """Exact fraction of the k-subsets of the samples that hold at least one correct sample."""
    subsets = list(combinations(correct, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


samples = st.lists(st.booleans(), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(samples, st.data())
def test_pass_at_k_equals_subset_enumeration(correct, data):
    n, c = len(correct), sum(correct)
    k = data.draw(st.integers(1, n))
    want = float(brute_pass_at_k(correct, k))
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (
        f"scalar pass@{k} (n={n}, c={c}) is not the probability that a random k-subset solves it"
    )
    vec = pass_at_k_per_problem(torch.tensor([c]), n, k).item()
    assert vec == pytest.approx(want, abs=1e-12), "vectorised pass@k disagrees with enumeration"
    curve = pass_at_k_curve(torch.tensor([correct]), [k])
    assert curve == {k: pytest.approx(want, abs=1e-12)}, "pass_at_k_curve on a bool matrix is off"


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=5)
    )
)
def test_pass_at_k_curve_is_mean_over_problems_for_every_k(matrix):
    n = len(matrix[0])
    curve = pass_at_k_curve(torch.tensor(matrix))
    assert sorted(curve) == list(range(1, n + 1)), "default ks must be every k in 1..n"
    for k, value in curve.items():
        want = float(sum(brute_pass_at_k(row, k) for row in matrix) / len(matrix))
        assert value == pytest.approx(want, abs=1e-12), f"pass@{k} is not the per-problem mean"
    counts = torch.tensor(matrix).sum(1)
    assert pass_at_k_curve(counts, n=n) == curve, "counts input must equal the bool-matrix input"


def test_pass_at_k_is_the_unbiased_estimator_not_the_plugin():
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 5/6, whereas the plug-in 1 - (1 - c/n)^k gives 3/4.
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6), "pass@k must be 1 - C(n-c,k)/C(n,k)"
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 0, 3) == 0.0


@pytest.mark.parametrize("c", [0, 1, 7, 500, 1990, 2000])
@pytest.mark.parametrize("k", [1, 2, 64, 1000, 1995, 2000])
def test_pass_at_k_is_exact_for_large_n(c, k):
    n = 2000  # C(2000, 1000) ~ 1e600 overflows floats; the product form must not
    want = float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))
    got = pass_at_k_per_problem(torch.tensor([c]), n, k).item()
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12), (
        "numerically unstable pass@k at large n"
    )
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_pass_at_k_rejects_k_outside_1_to_n():
    correct = torch.zeros(3, 64, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"k=128 > n=64 samples per problem; sample more or lower k"
    ):
        pass_at_k_curve(correct, [1, 128])
    with pytest.raises(ValueError, match="k=0 < 1"):
        pass_at_k(64, 3, 0)
    with pytest.raises(ValueError, match="needs n="):
        pass_at_k_curve(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0..n=4"):
        pass_at_k_per_problem(torch.tensor([5]), 4, 1)


def test_distinct_correct_counts_keys_once_and_ignores_invalid():
    keys = [[(3, 4), (3, 4), (2, 5), None], [None, None], [(0, 1), (0, 1)]]
    assert distinct_correct(keys).tolist() == [2, 0, 1], (
        "equal keys are one solution; None is invalid"
    )


def test_solved_coverage_on_hand_made_sets():
    # a solves problems {0, 1, 2}; b solves {2, 3}; nobody solves 4.
    a = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    cov = solved_coverage(a, b)
    assert {key: cov[key] for key in ("solved_a", "solved_b", "both", "only_a", "only_b")} == {
        "solved_a": 3,
        "solved_b": 2,
        "both": 1,
        "only_a": 2,
        "only_b": 1,
    }, "default coverage: a problem is solved iff some sample is correct"
    assert cov["jaccard"] == pytest.approx(1 / 4)
    # at k=1 with threshold 0.5: a solves 0, 1, 2 (pass@1 = 1/2, 1/2, 1), b solves none (1/3 < 1/2)
    cov1 = solved_coverage(a, b, k=1)
    assert (cov1["solved_a"], cov1["solved_b"], cov1["both"]) == (3, 0, 0), (
        "pass@k >= threshold rule"
    )
    assert math.isnan(solved_coverage(a[3:], b[4:5].expand(2, 3))["jaccard"]), "empty union -> NaN"


def test_crossover_k_on_hand_made_curves():
    rl = {1: 0.5, 2: 0.6, 4: 0.65, 8: 0.7, 16: 0.72}
    base = {1: 0.3, 2: 0.45, 4: 0.6, 8: 0.7, 16: 0.8}
    assert crossover_k(rl, base) == 8, "base ties RL at k=8 after trailing: that is the crossover"
    assert crossover_k(base, rl) is None, "RL never trails base and then catches up"
    assert crossover_k(rl, {str(k): v for k, v in base.items()}) == 8, "JSON string keys must work"
    assert crossover_k(rl, {1: 0.1, 2: 0.2, 4: 0.3, 8: 0.4, 16: 0.5}) is None, "never catches up"
    assert crossover_k(rl, {1: 0.9, 2: 0.1, 4: 0.9}) == 4, (
        "leading at k=1 then dipping counts from the dip"
    )


def test_bootstrap_ci_contains_estimate_reproducible_and_narrows():
    g = torch.Generator().manual_seed(1)
    small = torch.bernoulli(torch.full((50,), 0.4), generator=g)
    big = torch.bernoulli(torch.full((2000,), 0.4), generator=g)
    lo, hi = bootstrap_ci(small, n_boot=500, seed=3)
    assert lo <= small.mean().item() <= hi, "a 95% percentile CI of the mean must contain the mean"
    assert bootstrap_ci(small, n_boot=500, seed=3) == (lo, hi), "same seed must give the same CI"
    assert bootstrap_ci(small, n_boot=500, seed=4) != (lo, hi), "the seed must matter"
    blo, bhi = bootstrap_ci(big, n_boot=500, seed=3)
    assert bhi - blo < (hi - lo) / 3, "40x more problems must shrink the CI (by ~sqrt(40))"
    custom = bootstrap_ci(small, statistic=torch.mean, n_boot=500, seed=3)
    assert custom == pytest.approx((lo, hi), abs=1e-12), "vectorised mean must equal the loop path"
    assert bootstrap_ci(torch.ones(7)) == (1.0, 1.0), "constant data has a zero-width CI"
    with pytest.raises(ValueError, match="at least one problem"):
        bootstrap_ci(torch.empty(0))


def test_fork_mask_selects_exactly_the_top_fifth_and_ignores_padding():
    entropy = torch.tensor([[0.1, 2.0, 0.3, 0.4, 9.0], [1.5, 0.2, 0.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)  # 9.0s are padding
    forks = fork_mask(entropy, mask)  # 8 real tokens -> ceil(1.6) = 2 forks: 2.0 and 1.5
    want = torch.zeros_like(mask)
    want[0, 1] = want[1, 0] = True
    assert torch.equal(forks, want), "forks must be the top 20% of real tokens, never padding"
    assert fork_threshold(entropy, mask) == 1.5
    assert fork_mask(entropy, mask, rho=1.0).equal(mask), "rho=1 makes every real token a fork"
    assert not fork_mask(entropy, torch.zeros_like(mask)).any()
    with pytest.raises(ValueError, match="empty batch"):
        fork_threshold(entropy, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="rho=0"):
        fork_mask(entropy, mask, rho=0)


def test_fork_mask_breaks_ties_by_position_and_counts_exactly():
    entropy = torch.ones(3, 5)
    forks = fork_mask(entropy, torch.ones(3, 5, dtype=torch.bool))  # 15 tokens -> 3 forks, all tied
    assert forks.flatten().nonzero().squeeze(1).tolist() == [0, 1, 2], "ties: earliest row-major"
    assert n_forks(15, 0.2) == 3, "0.2 * 15 is 3.0000000000000004 in floats; must not round up to 4"
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        e = torch.rand(4, 7, generator=g)
        m = torch.rand(4, 7, generator=g) < 0.7
        f = fork_mask(e, m, rho=0.3)
        assert int(f.sum()) == n_forks(int(m.sum()), 0.3) and not (f & ~m).any()
        if f.any() and (m & ~f).any():
            assert e[f].min() >= e[m & ~f].max(), "every fork must outrank every non-fork"

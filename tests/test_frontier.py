"""Oracle tests for probe.metrics.frontier: hand-counted mixtures, brute-force splices, a looped bootstrap."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.metrics.evaluate import Scored
from probe.metrics.frontier import (
    compare_to_frontier,
    frontier_at,
    frontier_value,
    mixture_curve,
    mixture_per_problem,
    per_problem,
    restoration,
    splice,
    summary,
)
from probe.metrics.frontier_plots import plot_frontier_figure
from probe.metrics.outcomes import Outcomes, key_digest
from probe.metrics.passk import pass_at_k_per_problem

# Problem 0: base finds a, b, c; RL only a. Problem 1: base x, y; RL z.
BASE = Outcomes([["a", "b", None, "c"], ["x", None, "y", "y"]], [True, True])
RL = Outcomes([["a", "a", None, "a"], [None, "z", "z", None]], [True, True])
# splice(BASE, RL, m) by hand, m = 0..4: distinct per problem and correct counts per problem
HAND_DISTINCT = [(1, 1), (1, 2), (2, 2), (2, 2), (3, 2)]
HAND_COUNTS = [(3, 2), (3, 3), (3, 2), (3, 2), (3, 3)]


def random_outcomes(p: int, n: int, seed: int, p_correct: float, n_keys: int) -> Outcomes:
    rng = random.Random(seed)
    keys = [[f"k{rng.randrange(n_keys)}" if rng.random() < p_correct else None for _ in range(n)]
            for _ in range(p)]
    return Outcomes(keys, [i % 4 != 3 for i in range(p)])  # a quarter of the problems ineligible


def resample(o: Outcomes, rows: list[int]) -> Outcomes:
    return Outcomes([o.keys[i] for i in rows], [o.eligible[i] for i in rows])


def test_hand_counted_mixtures():
    counts, distinct = mixture_per_problem(BASE, RL, range(5))
    assert distinct.T.tolist() == [list(r) for r in HAND_DISTINCT], "union of base prefix and RL suffix miscounted"
    assert counts.T.tolist() == [list(r) for r in HAND_COUNTS], "correct count of the mixture miscounted"
    curve = mixture_curve(BASE, RL)
    assert [c["m"] for c in curve] == [0, 1, 2, 3, 4] and [c["q"] for c in curve] == [0, 0.25, 0.5, 0.75, 1]
    assert [c["distinct_correct_mean"] for c in curve] == [1, 1.5, 2, 2, 2.5]
    assert [c["restoration_distinct"] for c in curve] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1])
    assert [c["pass_at_1"] for c in curve] == [5 / 8, 6 / 8, 5 / 8, 5 / 8, 6 / 8]
    assert curve[0]["pass_at_64"] is None and curve[0]["restoration_pass_at_64"] is None, "n=4 < 64"
    assert set(curve[0]["pass_at_k"]) == {"1", "2", "4"}


def test_splice_ends_and_per_problem_match_brute_force():
    assert splice(BASE, RL, 0) == RL and splice(BASE, RL, 4) == BASE, "m=0 must be RL, m=n the base"
    for m, (want_d, want_c) in enumerate(zip(HAND_DISTINCT, HAND_COUNTS)):
        c, d = per_problem(splice(BASE, RL, m))
        assert tuple(d.tolist()) == want_d and tuple(c.tolist()) == want_c


def test_mixture_pass_at_k_equals_pass_at_k_on_the_spliced_correctness():
    base, rl = random_outcomes(12, 8, 1, 0.4, 6), random_outcomes(12, 8, 2, 0.8, 2)
    curve = mixture_curve(base, rl)
    for row in curve:
        mix = splice(base, rl, row["m"])
        counts = mix.correct.sum(1)
        for k, v in row["pass_at_k"].items():
            want = pass_at_k_per_problem(counts, 8, int(k)).mean().item()
            assert v == pytest.approx(want, abs=1e-12), f"mixture pass@{k} at m={row['m']} is off"
        got = summary(mix)
        for key in ("pass_at_1", "distinct_correct_mean"):
            assert got[key] == pytest.approx(row[key], abs=1e-12), f"summary of the splice: {key}"
        assert got["pass_at_k"] == pytest.approx(row["pass_at_k"], abs=1e-12)


outcome_pairs = st.integers(1, 4).flatmap(lambda p: st.integers(1, 6).flatmap(lambda n: st.tuples(
    *[st.lists(st.lists(st.sampled_from([None, "a", "b", "c", "d"]), min_size=n, max_size=n),
               min_size=p, max_size=p)] * 2, st.lists(st.booleans(), min_size=p, max_size=p))))


@settings(max_examples=80, deadline=None)
@given(outcome_pairs)
def test_vectorised_mixture_equals_splicing_and_restoration_ends(data):
    bk, rk, elig = data
    base, rl = Outcomes(bk, elig), Outcomes(rk, elig)
    n = base.n
    counts, distinct = mixture_per_problem(base, rl, range(n + 1))
    for m in range(n + 1):
        c, d = per_problem(splice(base, rl, m))
        assert torch.equal(counts[:, m], c) and torch.equal(distinct[:, m], d), f"vectorised mixture wrong at m={m}"
    curve = mixture_curve(base, rl)
    b, r = summary(base)["distinct_correct_mean"], summary(rl)["distinct_correct_mean"]
    if b is not None and r is not None and b > r:
        assert curve[0]["restoration_distinct"] == 0 and curve[-1]["restoration_distinct"] == 1, (
            "the mixture's ends are RL and base: restoration must be exactly 0 and 1")
    else:
        assert all(c["restoration_distinct"] is None for c in curve), "undefined unless base is broader than RL"


HAND_CURVE = [{"pass_at_1": x, "restoration_distinct": y} for x, y in [(0.8, 0.0), (0.7, 0.5), (0.6, 0.9), (0.5, 1.0)]]


@pytest.mark.parametrize("p, want", [
    (0.75, 0.25),  # interpolated on the first segment
    (0.8, 0.0), (0.6, 0.9), (0.65, 0.7),
    (0.95, 0.0),  # above every point: the highest-pass@1 point
    (0.1, 1.0),  # below every point: max over the curve
])
def test_frontier_interpolates_and_clamps(p, want):
    assert frontier_at(HAND_CURVE, p) == pytest.approx(want, abs=1e-12)


def test_frontier_of_a_non_monotone_curve_and_ties():
    zigzag = [{"pass_at_1": x, "restoration_distinct": y} for x, y in [(0.8, 0), (0.6, 0.9), (0.7, 0.5), (0.5, 1.0)]]
    # at 0.65 the candidates are vertices 0 and 0.5 and crossings 0.675, 0.7, 0.625 on the three segments
    assert frontier_at(zigzag, 0.65) == pytest.approx(0.7)
    ties = [{"pass_at_1": x, "restoration_distinct": y} for x, y in [(0.8, 0.1), (0.8, 0.3), (0.5, 1.0)]]
    assert frontier_at(ties, 0.9) == pytest.approx(0.3), "above every point: the best of the top ties"
    assert frontier_at([{"pass_at_1": 0.5, "restoration_distinct": None}], 0.4) is None


def test_frontier_value_equals_dense_polyline_sampling():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 7, generator=g, dtype=torch.float64), torch.rand(20, 7, generator=g, dtype=torch.float64)
    p = torch.rand(20, generator=g, dtype=torch.float64) * 1.2 - 0.1
    got = frontier_value(x, y, p)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    for b in range(20):
        xs = torch.cat([x[b, i] + t * (x[b, i + 1] - x[b, i]) for i in range(6)])
        ys = torch.cat([y[b, i] + t * (y[b, i + 1] - y[b, i]) for i in range(6)])
        want = ys[xs >= p[b]].max() if (xs >= p[b]).any() else y[b, x[b].argmax()]  # no ties
        assert got[b].item() == pytest.approx(want.item(), abs=1e-3), "frontier is not max y over x >= p"


def collapsed_pair(p: int = 64, n: int = 16):
    """RL always correct with one of 2 keys; base right half the time with one of 12 keys."""
    base, rl = random_outcomes(p, n, 10, 0.5, 12), random_outcomes(p, n, 11, 1.0, 2)
    return base, rl


def test_a_mixture_point_has_zero_excess():
    base, rl = collapsed_pair()
    res = compare_to_frontier(splice(base, rl, 8), base, rl, n_boot=300)
    assert res["frontier_excess"] == pytest.approx(0, abs=1e-12), "a mixture point is on the frontier"
    lo, hi = res["frontier_excess_ci"]
    assert lo <= 1e-12 and hi >= -1e-12, f"excess CI {lo, hi} of a mixture point must contain 0"
    assert res["n_boot_used"] == 300


def test_bootstrap_matches_a_replicate_loop_and_is_seeded():
    base, rl = collapsed_pair(p=24, n=8)
    cell = random_outcomes(24, 8, 12, 0.7, 12)  # more breadth than the mixture at its pass@1
    res = compare_to_frontier(cell, base, rl, n_boot=40, seed=3)
    assert res == compare_to_frontier(cell, base, rl, n_boot=40, seed=3), "same seed, same intervals"
    assert res != compare_to_frontier(cell, base, rl, n_boot=40, seed=4)
    idx = torch.randint(24, (40, 24), generator=torch.Generator().manual_seed(3))
    excess, rest, d1 = [], [], []
    for row in idx.tolist():
        b, r, c = (resample(o, row) for o in (base, rl, cell))
        curve = mixture_curve(b, r)
        d1.append(summary(c)["pass_at_1"] - summary(r)["pass_at_1"])
        db, dr, dc = (summary(o)["distinct_correct_mean"] for o in (b, r, c))
        if db is None or db <= dr:  # the full-sample gap is positive: other signs are dropped
            continue
        rest.append((dc - dr) / (db - dr))
        excess.append(rest[-1] - frontier_at(curve, summary(c)["pass_at_1"]))
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    for name, vals in [("frontier_excess", excess), ("restoration_distinct", rest), ("pass_at_1_change", d1)]:
        want = torch.quantile(torch.tensor(vals, dtype=torch.float64), q).tolist()
        assert res[f"{name}_ci"] == pytest.approx(want, abs=1e-12), f"vectorised {name} CI differs from the loop"
    assert res["n_boot_used"] == len(excess)
    assert res["frontier_excess"] > 0, "this cell has breadth a mixture does not reach"
    for name in ("restoration_distinct", "pass_at_1_change", "frontier_excess"):
        lo, hi = res[f"{name}_ci"]
        assert lo <= res[name] <= hi, f"{name} interval does not bracket its point estimate"
    full = mixture_curve(base, rl)
    assert res["frontier_restoration"] == pytest.approx(frontier_at(full, res["pass_at_1"]), abs=1e-12)


def test_full_size_bootstrap_has_pass_at_64():
    base, rl = random_outcomes(256, 64, 1, 0.4, 20), random_outcomes(256, 64, 2, 0.02, 3)
    cell = splice(base, rl, 20)
    res = compare_to_frontier(cell, base, rl)  # 1000 replicates, 65 grid points
    curve = mixture_curve(base, rl)
    assert len(curve) == 65 and curve[-1]["restoration_pass_at_64"] == 1
    row = next(c for c in curve if c["m"] == 20)
    assert res["restoration_pass_at_64"] == pytest.approx(row["restoration_pass_at_64"], abs=1e-12)
    assert res["restoration_distinct"] == pytest.approx(row["restoration_distinct"], abs=1e-12)
    assert len(res["restoration_pass_at_64_ci"]) == 2


def test_json_round_trip_and_digests():
    o = random_outcomes(256, 64, 5, 0.6, 10)
    text = json.dumps(o.to_json(), separators=(",", ":"))
    assert Outcomes.from_json(json.loads(text)) == o, "JSON round trip lost information"
    assert len(text) < 200_000, f"{len(text)} characters for 256 x 64 samples: not compact"
    # sets are digested in sorted order, whatever the process's string hashing
    want = hashlib.sha1(b"frozenset({'a', 'b'})").hexdigest()[:12]
    assert key_digest(frozenset({"b", "a"})) == want and len(key_digest(("+", 1, 2))) == 12


def test_from_scored():
    canon = [("+", 1, 2), None, ("+", 1, 2), ("*", 3, 4), None, None]
    scored = Scored(completions=[""] * 6, correct=torch.tensor([c is not None for c in canon]),
                    canonical=canon, roles=torch.zeros(6, 1, dtype=torch.long))
    o = Outcomes.from_scored(scored, 3, [True, False])
    k = key_digest(("+", 1, 2))
    assert o.keys == [[k, None, k], [key_digest(("*", 3, 4)), None, None]] and o.eligible == [True, False]
    with pytest.raises(ValueError, match="expected n=4"):
        Outcomes.from_scored(scored, 4, [True, False])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no problems"):
        Outcomes([], [])
    with pytest.raises(ValueError, match="same n"):
        Outcomes([["a"], ["a", "b"]], [True, True])
    short = Outcomes([["a", "b", None]] * 2, [True, True])
    with pytest.raises(ValueError, match="4 samples vs 2 x 3"):
        splice(BASE, short, 1)
    with pytest.raises(ValueError, match="2 problems x 4 samples vs 1 x 4"):
        mixture_curve(BASE, Outcomes([["a"] * 4], [True]))
    with pytest.raises(ValueError, match="eligibility"):
        compare_to_frontier(BASE, BASE, Outcomes(RL.keys, [True, False]))
    with pytest.raises(ValueError, match=r"fraction q=1.5 is outside \[0, 1\]"):
        mixture_curve(BASE, RL, qs=[0, 1.5])
    with pytest.raises(ValueError, match="outside 0..n=4"):
        splice(BASE, RL, 5)
    with pytest.raises(ValueError, match="format"):
        Outcomes.from_json({"n": 4})
    assert [c["m"] for c in mixture_curve(BASE, RL, qs=[0, 0.125, 0.5, 0.5, 1])] == [0, 1, 2, 4], (
        "q -> round(q n) half up, duplicates merged")


def test_undefined_restoration_when_base_equals_rl():
    res = compare_to_frontier(BASE, BASE, BASE, n_boot=20)
    assert res["restoration_distinct"] is None and res["frontier_excess_ci"] is None
    assert res["pass_at_1_change"] == 0 and res["pass_at_1_change_ci"] == [0, 0]
    assert not math.isnan(res["pass_at_1"])


def test_restoration_is_undefined_where_rl_lost_no_breadth():
    """RL broader than the base: nothing to restore. Dividing by the negative gap would rank a cell that adds
    breadth below one that removes it, so restoration, frontier and excess are None; distinct_minus_rl is not."""
    narrow, broad = collapsed_pair()  # here the "base" is the collapsed one: RL is the broader model
    broad, narrow = narrow, broad
    assert restoration(2.0, base=1.0, rl=1.5) is None and restoration(1.2, base=2.0, rl=1.0) == pytest.approx(0.2)
    more = random_outcomes(64, 16, 13, 0.9, 16)  # even more breadth than RL
    res = compare_to_frontier(more, narrow, broad, n_boot=50)
    assert res["distinct_gap"] < 0
    for k in ("restoration_distinct", "frontier_restoration", "frontier_excess"):
        assert res[k] is None and res[f"{k}_ci"] is None, k
    want = summary(more)["distinct_correct_mean"] - summary(broad)["distinct_correct_mean"]
    assert res["distinct_minus_rl"] == pytest.approx(want, abs=1e-12) and res["distinct_minus_rl"] > 0
    lo, hi = res["distinct_minus_rl_ci"]
    assert lo <= res["distinct_minus_rl"] <= hi
    assert all(row["restoration_distinct"] is None for row in mixture_curve(narrow, broad))
    assert frontier_at(mixture_curve(narrow, broad), 0.5) is None


def test_plot_writes_a_png(tmp_path):
    base, rl = collapsed_pair()
    curve = mixture_curve(base, rl)
    cells = {"mixture q=0.5": compare_to_frontier(splice(base, rl, 8), base, rl, n_boot=50)}
    plot_frontier_figure(curve, cells, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_stacked_seeds_resample_a_problem_with_all_its_seeds():
    from probe.metrics.outcomes import stack

    b1, b2 = random_outcomes(30, 8, 1, 0.5, 5), random_outcomes(30, 8, 2, 0.5, 5)
    r1, r2 = random_outcomes(30, 8, 3, 0.1, 2), random_outcomes(30, 8, 4, 0.1, 2)
    c1, c2 = splice(b1, r1, 3), splice(b2, r2, 3)
    (b, cl), (r, _), (c, _) = stack([b1, b2]), stack([r1, r2]), stack([c1, c2])
    assert cl == list(range(30)) * 2 and b.n_problems == 60
    pooled = compare_to_frontier(c, b, r, clusters=cl)
    means = [compare_to_frontier(x, y, z)["pass_at_1"] for x, y, z in ((c1, b1, r1), (c2, b2, r2))]
    assert pooled["pass_at_1"] == pytest.approx(sum(means) / 2), "stacked means are the means over seeds"
    rows = compare_to_frontier(c, b, r)  # every row its own unit: narrower, as if seeds were other problems
    width = lambda x: x["pass_at_1_change_ci"][1] - x["pass_at_1_change_ci"][0]  # noqa: E731
    assert width(pooled) > 0 and width(rows) > 0
    with pytest.raises(ValueError, match="clusters has 5 entries"):
        compare_to_frontier(c, b, r, clusters=[0] * 5)

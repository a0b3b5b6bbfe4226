"""The mixture frontier on a task that cannot count its solutions compares distinct-correct at matched counts."""

from __future__ import annotations

import pytest

from probe.metrics.frontier import (
    breadth_measure,
    compare_to_frontier,
    matched_columns,
    mixture_curve,
    splice,
)
from probe.metrics.outcomes import Outcomes
from probe.metrics.passk import rarefied_distinct, solution_counts

# A math file (eligible None everywhere). Base: few correct samples, all different. RL: many correct
# samples, mostly one solution. Counted over the paired subset RL looks broader (more correct samples
# means more distinct texts); among the same number of correct samples the base is broader.
N = 8
BASE_KEYS = [["a", "b", "c", None, None, None, None, None], ["x", "y", None, None, None, None, None, None],
             ["p", None, None, None, None, None, None, None]]
RL_KEYS = [["a", "a", "a", "a", "d", "a", "e", "a"], ["x", "x", "x", "z", "x", "w", "x", "x"],
           ["p", "p", "q", "p", "p", "p", "p", "p"]]
BASE = Outcomes(BASE_KEYS, [None] * 3)
RL = Outcomes(RL_KEYS, [None] * 3)


def test_the_measure_follows_the_tasks_rule():
    assert breadth_measure([None, None]) == "matched"
    assert breadth_measure([True, False]) == "paired" and breadth_measure([True, None]) == "paired"


def test_matched_values_by_hand():
    values, eligible = matched_columns([RL, BASE], BASE, RL)
    assert eligible.tolist() == [True, True, False], "problem 2: the base has 1 correct sample, below 2"
    # problem 0: m = 3; RL's 8 correct = a x6, d, e -> expected distinct among 3 drawn without replacement
    assert values[0, 0].item() == pytest.approx(rarefied_distinct([6, 1, 1], 3))
    assert values[0, 1].item() == 3.0 and values[1, 1].item() == 2.0
    assert values[0, 0].item() < 3.0, "RL repeats one solution, so it shows fewer among the same number"
    assert values[2].tolist() == [0.0, 0.0], "a row that does not count holds 0"


def test_a_column_with_fewer_correct_samples_than_m_shows_at_most_those():
    failing = Outcomes([["a", None, None, None, None, None, None, None]] + BASE_KEYS[1:], [None] * 3)
    values, _ = matched_columns([failing], BASE, RL)
    assert values[0, 0].item() == 1.0, "one correct sample can show one solution, not three"
    assert len(solution_counts(failing.keys[0])) == 1


def test_frontier_on_matched_counts_orders_base_above_rl():
    b_rule, r_rule = Outcomes(BASE_KEYS, [True] * 3), Outcomes(RL_KEYS, [True] * 3)  # a task that counts solutions
    paired = compare_to_frontier(b_rule, b_rule, r_rule, n_boot=50)
    assert paired["distinct_measure"] == "paired" and paired["distinct_gap"] < 0, "counted, RL looks broader"
    assert paired["restoration_distinct"] is None and paired["distinct_minus_rl"] == pytest.approx(paired["distinct_gap"]), \
        "so nothing is restored: the base as a cell is the gap's distinct change, not a restoration"
    out = compare_to_frontier(BASE, BASE, RL, n_boot=50)
    assert out["distinct_measure"] == "matched" and out["distinct_correct_n_problems"] == 2
    assert out["restoration_distinct"] == pytest.approx(1.0), "the base restores all of its own gap"
    curve = mixture_curve(BASE, RL)
    assert curve[0]["distinct_measure"] == "matched"
    assert curve[0]["restoration_distinct"] == pytest.approx(0.0) and curve[-1]["restoration_distinct"] == pytest.approx(1.0)
    assert curve[-1]["distinct_correct_mean"] > curve[0]["distinct_correct_mean"], "base broader at matched counts"


def test_failing_never_buys_matched_breadth():
    nothing = Outcomes([[None] * N for _ in range(3)], [None] * 3)
    out = compare_to_frontier(nothing, BASE, RL, n_boot=50)
    assert out["distinct_correct_mean"] is None and out["restoration_distinct"] is None, (
        "a cell that never solves a row twice has no matched breadth, never a restoration")
    assert out["distinct_correct_n_problems"] == 0 and out["pass_at_1"] == 0.0
    once = Outcomes([["a", "b", "c", "d", None, None, None, None], ["x", None, None, None, None, None, None, None],
                     RL_KEYS[2]], [None] * 3)
    values, eligible = matched_columns([once], BASE, RL, drawn=[once])
    assert eligible.tolist() == [True, False, False], "a row the cell solves once leaves its comparison"
    assert values[0, 0].item() == 3.0, "on the rows left, m is the fewest correct samples of base, RL and the cell"


def _pair_drawn(seed: int, problems: int = 1000, n: int = 16):
    """A base that rarely solves but never repeats, an RL model that solves more with one dominant answer,
    and `draw_rl`/`draw_base` to sample each again (a math file: no problem counts its solutions)."""
    import random

    rng = random.Random(seed)
    rates = [rng.choice([0.08, 0.15, 0.3, 0.6]) for _ in range(problems)]

    def draw_rl() -> Outcomes:
        return Outcomes([[(("top" if rng.random() < 0.7 else f"s{rng.randrange(6)}") if rng.random() < r else None)
                          for _ in range(n)] for r in rates], [None] * problems)

    def draw_base() -> Outcomes:
        return Outcomes([[(f"b{rng.randrange(50)}" if rng.random() < 0.1 else None) for _ in range(n)]
                         for _ in range(problems)], [None] * problems)

    return draw_base(), draw_rl(), draw_base, draw_rl


def test_a_second_draw_of_rl_scores_like_rl():
    """The rows are chosen on base's and RL's drawn counts; a cell drawn from RL's own distribution must
    not score below RL for that (it did when the cell was capped at m instead of setting it)."""
    base, rl, _, draw_rl = _pair_drawn(0)
    again = draw_rl()
    fair = compare_to_frontier(again, base, rl, n_boot=20)
    assert abs(fair["distinct_minus_rl"]) < 0.06, f"a second draw of RL is RL: {fair['distinct_minus_rl']}"
    values, eligible = matched_columns([rl, again], base, rl)  # capped at base's and RL's m instead
    capped = (values[eligible, 1] - values[eligible, 0]).mean().item()
    assert capped < fair["distinct_minus_rl"] - 0.08, f"capping scores RL's own second draw lower: {capped}"


def test_a_fresh_draw_of_a_mixture_lies_on_the_matched_frontier():
    """The mixture frontier splices base's and RL's own samples; the same mixture sampled afresh (an
    intervention that behaved exactly like it) lands on the frontier, not below it. A row-level cell
    (fresh steered samples spliced with RL's own) that behaves like a mixture lands slightly below it:
    the bias left, against the cell (module docstring)."""
    base, rl, draw_base, draw_rl = _pair_drawn(0)
    fresh = [compare_to_frontier(splice(draw_base(), draw_rl(), m), base, rl, n_boot=20)["frontier_excess"]
             for m in (2, 4, 8)]
    assert abs(sum(fresh) / 3) < 0.06, f"a fresh mixture scores on its own frontier: {fresh}"
    row_level = [compare_to_frontier(splice(draw_base(), rl, m), base, rl, n_boot=20)["frontier_excess"]
                 for m in (2, 4, 8)]
    assert -0.15 < sum(row_level) / 3 < 0.0, f"a row-level mixture scores a little below the frontier: {row_level}"


def test_a_mixture_point_lies_on_the_matched_frontier():
    cell = splice(BASE, RL, 4)
    out = compare_to_frontier(cell, BASE, RL, n_boot=50)
    assert out["frontier_excess"] == pytest.approx(0.0, abs=1e-12), "a mixture point is on the mixture's own curve"


def test_the_gap_every_restoration_divides_by_is_reported():
    out = compare_to_frontier(BASE, BASE, RL, n_boot=50)
    values, eligible = matched_columns([RL, BASE], BASE, RL)
    want = (values[eligible, 1] - values[eligible, 0]).mean().item()
    assert out["distinct_gap"] == pytest.approx(want) and out["distinct_gap"] > 0, "base minus RL, matched"
    lo, hi = out["distinct_gap_ci"]
    assert lo <= out["distinct_gap"] <= hi

"""The Countdown task: enumerator, verifier, generator, token roles."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.tasks.countdown import (
    Countdown,
    CountdownConfig,
    Problem,
    format_steps,
    parse_prompt,
)
from probe.tasks.protocol import Task

TASK = Countdown()


def _brute_force_values(numbers, max_value):
    """Every value reachable using all numbers: a slow, independent reference."""
    if len(numbers) == 1:
        return {numbers[0]}
    out = set()
    for i, j in itertools.permutations(range(len(numbers)), 2):
        rest = [numbers[k] for k in range(len(numbers)) if k not in (i, j)]
        a, b = numbers[i], numbers[j]
        for c in (a + b, a - b, a * b, a // b if a % b == 0 else -1):
            if 1 <= c <= max_value:
                out |= _brute_force_values(rest + [c], max_value)
    return out


problems = st.builds(
    lambda nums, pick: (tuple(sorted(nums)), pick),
    st.lists(st.integers(1, 12), min_size=3, max_size=3),
    st.integers(0, 10**6),
)


@settings(max_examples=150, deadline=None)
@given(problems)
def test_verifier_accepts_every_enumerated_solution(spec):
    nums, pick = spec
    reachable = sorted(_brute_force_values(list(nums), 100))
    assert reachable, "1..12 triples always reach something"
    target = reachable[pick % len(reachable)]
    p = Problem(nums, target)
    sols = TASK.solutions(p)
    assert sols, f"{p}: brute force reaches the target but the enumerator found no solution"
    for tree, steps in sols.items():
        v = TASK.check(p, format_steps(steps))
        assert v.ok, f"enumerated solution {format_steps(steps)} rejected: {v.reason}"
        assert v.tree == tree, "verifier and enumerator disagree on what counts as the same solution"


@settings(max_examples=150, deadline=None)
@given(problems, st.integers(0, 10**6), st.sampled_from(["digit", "op", "drop", "swap", "result"]))
def test_verifier_rejects_mutated_solutions(spec, seed, how):
    nums, pick = spec
    reachable = sorted(_brute_force_values(list(nums), 100))
    p = Problem(nums, reachable[pick % len(reachable)])
    rng = random.Random(seed)
    good = TASK.sample_solution(p, rng)
    steps = good.split(";")
    k = rng.randrange(len(steps))
    lhs, result = steps[k].split("=")
    if how == "result":  # a wrong arithmetic result
        steps[k] = f"{lhs}={int(result) + rng.randint(1, 5)}"
    elif how == "drop":  # a missing step
        del steps[k]
    elif how == "swap":  # a number that is not available
        steps[k] = f"{lhs}={result}".replace(lhs.split("+")[0].split("-")[0].split("*")[0].split("/")[0], "99", 1)
    elif how == "op":
        op = next(c for c in lhs if c in "+-*/")
        steps[k] = lhs.replace(op, "+" if op != "+" else "*", 1) + f"={result}"
    else:  # an extra digit on the target
        steps[-1] = steps[-1] + "7"
    bad = ";".join(steps)
    assume_changed = bad != good
    if assume_changed and not TASK.check(p, bad).ok:
        return
    # a mutation can only be accepted if it is itself a valid solution of the same problem
    assert TASK.check(p, bad).ok == (TASK.canonical(p.prompt, bad) is not None)
    if assume_changed:
        assert TASK.canonical(p.prompt, bad) in TASK.solutions(p), f"accepted {bad!r}, not a solution"


def test_verifier_reasons_name_the_problem():
    p = Problem((3, 5, 12), 24)
    assert TASK.check(p, "5-3=2;12*2=24").ok
    cases = {
        "5-3=2": "expected 2 steps",
        "5-3=3;12*3=36": "= 2, not 3",
        "5-3=2;12*2=25": "not 25",
        "5-3=2;12*12=144": "not available",
        "5-7=2;12*2=24": "not available",
        "3-5=2;12*2=24": "not a positive integer",
        "5^3=2;12*2=24": "malformed",
        "5-3=2;12+2=14": "target",
    }
    for answer, fragment in cases.items():
        v = TASK.check(p, answer)
        assert not v.ok and fragment in v.reason, f"{answer!r}: reason {v.reason!r} should say {fragment!r}"


def test_canonical_merges_commutative_and_reordered_answers():
    p = Problem((3, 5, 12), 20)
    a, b = "3+5=8;8+12=20", "5+3=8;12+8=20"
    assert TASK.canonical(p.prompt, a) == TASK.canonical(p.prompt, b)
    assert TASK.canonical(p.prompt, "12+3=15;15+5=20") != TASK.canonical(p.prompt, a)
    assert TASK.canonical(p.prompt, "3+5=8;8+12=21") is None


def test_heldout_is_fixed_and_disjoint_from_training():
    held = Countdown().heldout()
    assert held == Countdown().heldout(), "the held-out split must not depend on the instance"
    assert len({p.key for p in held}) == len(held) == CountdownConfig().heldout_size
    keys = {p.key for p in held}
    stream = TASK.train_stream(seed=0)
    train = [next(stream)[1] for _ in range(3000)]
    assert not keys & {p.key for p in train}, "a held-out problem leaked into the training stream"
    again = TASK.train_stream(seed=0, start=1234)
    assert next(again)[1] == train[1234], "resuming the stream must continue exactly"


def test_default_distribution_has_several_solutions():
    counts = [TASK.n_solutions(p.prompt) for p in TASK.heldout()]
    assert min(counts) >= 1
    several = sum(c >= 2 for c in counts) / len(counts)
    assert several > 0.5, f"only {several:.0%} of problems have >= 2 solutions: the base needs alternatives"


def test_token_roles_split_planning_and_execution():
    text = list("12*3=36;36-5=31") + ["<eos>"]
    roles = TASK.token_roles(text)
    assert "".join("P" if r == "planning" else "E" for r in roles) == "PPPPEEEEPPPPEEEE"
    assert TASK.token_roles(["<pad>"]) == ["other"]


def test_task_satisfies_the_probe_protocol():
    assert isinstance(TASK, Task)
    p = TASK.heldout()[0]
    assert parse_prompt(p.prompt) == p


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"ops": ("+", "%")}, "unknown op"),
        ({"min_number": 5, "max_number": 2}, "empty"),
        ({"max_number": 50, "max_value": 20}, "max_value"),
        ({"n_numbers": 1}, "at least 2"),
        ({"ops": ("-",), "min_number": 7, "max_number": 7, "n_numbers": 2}, "impossible"),
    ],
)
def test_bad_generator_specs_fail_with_a_reason(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Countdown(CountdownConfig(**kwargs))


def test_malformed_prompt_is_named():
    with pytest.raises(ValueError, match="not a Countdown prompt"):
        parse_prompt("hello")

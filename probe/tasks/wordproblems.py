"""Arithmetic word problems: the second organism's task (natural language, several solution orders).

A problem is a short story with three or four quantities and a question; its value is a signed
sum of terms, each term a quantity or a product of two (`Term`). Example:

    prompt:  "Ann has 3 bags of 4 pens and 7 more, then gives away 5. How many are left?"
    answer:  "3*4=12, then 12+7=19, then 19-5=14. The answer is \\boxed{14}."
    answer:  "7-5=2, then 4*3=12, then 12+2=14. The answer is \\boxed{14}."   (another order)

A solution is a sequence of steps, each combining two quantities or earlier results: a product
inside a term, two added terms (`x+y`), an added and a removed term (`x-y`, only when x > y), or
two removed terms (`x+y`, removed together). Every intermediate value is a positive integer. The
*solution path* is the order of computation: which quantities are combined first. Paths are
enumerated exactly (`paths`) and keyed as `probe.tasks.math_task.solution_steps` keys a
completion (commutative operands sorted), so the enumerator and the verifier agree.

Verification, distinct-solution keys and token roles are those of the math task
(`probe.tasks.math_task`): the held-out split written as a JSONL file is an ordinary
`--task math:FILE`. This module adds what training needs: the problem distribution, a training
stream that never meets the held-out split, and a uniformly random path per problem for SFT.

What it is not: a tokenizer (`experiments.training.tokenizer.build_text_tokenizer`) or a model.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from probe.tasks.math_file import MathRow, write_jsonl
from probe.tasks.math_task import MathTask, solution_steps
from probe.tasks.streams import training_stream

NAMES = ("Ann", "Ben", "Cal", "Dee", "Eva", "Finn", "Gus", "Ida", "Jo", "Kim", "Lou", "Max", "Nia", "Pat", "Rex",
         "Sue", "Tom", "Zoe")
ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins", "shells", "stamps", "beads", "cups", "nuts", "rocks")
ANSWER_END = ". The answer is \\boxed{{{value}}}."

Term = tuple[int, tuple[int, ...]]  # (sign +1 / -1, factors)


@dataclass(frozen=True)
class Problem:
    """A word problem: its text and the signed terms its question adds up."""

    prompt: str
    terms: tuple[Term, ...]

    @property
    def value(self) -> int:
        out = 0
        for sign, factors in self.terms:
            v = 1
            for f in factors:
                v *= f
            out += sign * v
        return out


def _easy_story(rng: random.Random) -> tuple[str, tuple[Term, ...]]:
    """One problem of one or two steps with small numbers (the real pair's task: a 135M model solves
    a few percent of the organism's three-step problems and RL finds nothing to reinforce)."""
    n, m = rng.sample(NAMES, 2)
    it = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    family = rng.randrange(6)
    if family == 0:
        return f"{n} has {a} {it} and gets {b} more. How many {it} now?", ((1, (a,)), (1, (b,)))
    if family == 1:
        a, b = max(a, b) + 1, min(a, b)
        return f"{n} has {a} {it} and gives {b} to {m}. How many are left?", ((1, (a,)), (-1, (b,)))
    if family == 2:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        return f"{n} has {a} bags of {b} {it}. How many {it} in all?", ((1, (a, b)),)
    if family == 3:
        return (f"{n} has {a} red, {b} blue and {c} green {it}. How many {it} in all?",
                ((1, (a,)), (1, (b,)), (1, (c,))))
    if family == 4:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        return f"{n} has {a} bags of {b} {it} and {c} more. How many {it} in all?", ((1, (a, b)), (1, (c,)))
    c = rng.randint(1, a + b - 1)
    return (f"{n} has {a} {it}, gets {b} more and gives {c} to {m}. How many are left?",
            ((1, (a,)), (1, (b,)), (-1, (c,))))


def _story(rng: random.Random) -> tuple[str, tuple[Term, ...]]:
    """One problem of a random family, with numbers drawn for that family (factors 2..5, other
    quantities mostly one digit, so a ~1M-parameter model learns the arithmetic on a CPU)."""
    n, m, k = rng.sample(NAMES, 3)
    it = rng.choice(ITEMS)
    f = lambda: rng.randint(2, 5)  # noqa: E731  a factor
    s = lambda lo=1, hi=9: rng.randint(lo, hi)  # noqa: E731  an added quantity
    family = rng.randrange(6)
    if family == 0:
        a, b, c = s(), s(), s()
        return (f"{n} has {a} red, {b} blue and {c} green {it}. How many {it} in all?",
                ((1, (a,)), (1, (b,)), (1, (c,))))
    if family == 1:
        a, b, c, d = f(), f(), f(), f()
        return (f"{n} buys {a} boxes of {b} {it} and {c} bags of {d} {it}. How many {it} in all?",
                ((1, (a, b)), (1, (c, d))))
    if family == 2:
        a, b, c = f(), f(), s()
        d = rng.randint(1, min(9, a * b + c - 1))
        return (f"{n} has {a} bags of {b} {it} and {c} more, then gives away {d}. How many are left?",
                ((1, (a, b)), (1, (c,)), (-1, (d,))))
    if family == 3:
        a, b = s(5, 15), s()
        c = s(1, min(9, (a + b) // 2))
        d = s(1, min(9, a + b - c - 1))
        return (f"{n} has {a} {it}, gets {b} more, gives {c} to {m} and {d} to {k}. How many are left?",
                ((1, (a,)), (1, (b,)), (-1, (c,)), (-1, (d,))))
    if family == 4:
        a, b = f(), f()
        c = s(1, max(1, min(9, a * b // 2)))
        d = s(1, max(1, min(9, a * b - c - 1)))
        return (f"{n} packs {a} boxes of {b} {it}, sells {c} and breaks {d}. How many are left?",
                ((1, (a, b)), (-1, (c,)), (-1, (d,))))
    a, b, c, d = f(), f(), s(), s()
    return (f"A shop has {a} shelves of {b} {it}, {c} in a bin and {d} at the till. How many {it} in all?",
            ((1, (a, b)), (1, (c,)), (1, (d,))))


@functools.lru_cache(maxsize=65536)
def paths(terms: tuple[Term, ...]) -> dict[tuple[str, ...], tuple[tuple[int, str, int, int], ...]]:
    """Every valid order of computation: {solution_steps key: one step list (a, op, b, result)}."""
    out: dict[tuple[str, ...], tuple] = {}

    def rec(state: tuple[Term, ...], steps: tuple) -> None:
        if len(state) == 1:
            sign, factors = state[0]
            if sign == 1 and len(factors) == 1:
                key = solution_steps(", ".join(f"{a}{op}{b}={c}" for a, op, b, c in steps))
                out.setdefault(key, steps)
            return
        for i, (sign, factors) in enumerate(state):
            if len(factors) == 2:  # multiply inside a term
                a, b = factors
                rest = state[:i] + ((sign, (a * b,)),) + state[i + 1:]
                rec(rest, steps + ((a, "*", b, a * b),))
        for i in range(len(state)):
            for j in range(len(state)):
                (si, fi), (sj, fj) = state[i], state[j]
                if i == j or len(fi) != 1 or len(fj) != 1:
                    continue
                x, y = fi[0], fj[0]
                others = tuple(t for t2, t in enumerate(state) if t2 not in (i, j))
                if si == sj and i < j:  # x + y, kept with their common sign
                    rec(others + ((si, (x + y,)),), steps + ((x, "+", y, x + y),))
                elif si == 1 and sj == -1 and x > y:
                    rec(others + ((1, (x - y,)),), steps + ((x, "-", y, x - y),))

    rec(tuple(terms), ())
    return out


def format_answer(steps, value: int) -> str:
    """Steps as the organism writes them: "a*b=c, then ..., then ... The answer is \\boxed{v}."."""
    body = ", then ".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)
    return body + ANSWER_END.format(value=value)


@dataclass(frozen=True)
class WordProblemsConfig:
    """The problem distribution. The defaults define the embedded organism."""

    heldout_size: int = 256
    """Problems in the fixed held-out split (never produced by the training stream)."""
    heldout_seed: int = 20261201
    """Seed of the held-out split."""
    easy: bool = False
    """One- and two-step problems with small numbers (the real pair's task) instead of the organism's."""

    def __post_init__(self) -> None:
        if self.heldout_size < 2:
            raise ValueError(f"heldout_size={self.heldout_size} must be >= 2 (the protocol halves it)")


class WordProblems(MathTask):
    """The word-problem task: a `MathTask` over its own held-out split, plus the generator.

    Training prompts come from the generator (`train_stream`), never from the held-out split; the
    task remembers every prompt it generated, so it verifies them too."""

    def __init__(self, config: WordProblemsConfig | None = None) -> None:
        self.config = config or WordProblemsConfig()
        held = self.heldout()
        super().__init__([MathRow(p.prompt, str(p.value), f"wp-{i:04d}") for i, p in enumerate(held)],
                         source="wordproblems", max_new_tokens=self.answer_budget)

    def _draw(self, rng: random.Random) -> Problem:
        while True:
            prompt, terms = (_easy_story if self.config.easy else _story)(rng)
            p = Problem(prompt, terms)
            if p.value > 0 and paths(terms):
                return p

    def heldout(self) -> list[Problem]:
        """The fixed held-out split: `heldout_size` distinct problems."""
        if not getattr(self, "_held", None):
            rng, seen = random.Random(self.config.heldout_seed), {}
            while len(seen) < self.config.heldout_size:
                p = self._draw(rng)
                seen.setdefault(p.prompt, p)
            self._held = list(seen.values())
        return self._held

    def heldout_rows(self) -> list[MathRow]:
        """The held-out split as math-task rows (what `--task math:FILE` reads back)."""
        return list(self.rows)

    def train_stream(self, seed: int, start: int = 0) -> Iterator[tuple[int, Problem, random.Random]]:
        """Problems never in the held-out split, deterministic in (seed, index): problem i is drawn from
        `random.Random(f"{seed}:{i}")`, so a resumed stream continues exactly."""
        for i, p, rng in training_stream(self._draw, lambda p: p.prompt, {p.prompt for p in self.heldout()}, seed, start):
            self._gold[p.prompt] = str(p.value)
            yield i, p, rng

    def train_prompts(self, seed: int, count: int, start: int = 0) -> list[str]:
        """Prompts `start .. start + count - 1` of `train_stream(seed)`."""
        stream = self.train_stream(seed, start)
        return [next(stream)[1].prompt for _ in range(count)]

    def sft_stream(self, seed: int, start: int = 0) -> Iterator[tuple[str, str]]:
        """(prompt, answer text) pairs of the training stream, the answer a uniformly random path."""
        for _, p, rng in self.train_stream(seed, start):
            yield p.prompt, self.sample_solution(p, rng)

    def sample_solution(self, problem: Problem, rng: random.Random) -> str:
        """A uniformly random solution path (and a random order of commutative operands) as answer text."""
        table = paths(problem.terms)
        steps = table[rng.choice(sorted(table))]
        steps = [(b, op, a, c) if op in "+*" and rng.random() < 0.5 else (a, op, b, c) for a, op, b, c in steps]
        return format_answer(steps, problem.value)

    def path_histogram(self) -> dict[str, int]:
        """How many held-out problems have 1, 2, ..., 9 and >= 10 solution paths."""
        counts = [min(len(paths(p.terms)), 10) for p in self.heldout()]
        return {(f"{k}" if k < 10 else ">=10"): counts.count(k) for k in range(1, 11)}

    def export(self, directory: str | Path, train_count: int = 1024, train_seed: int = 99,
               instruction: str = "") -> dict[str, Path]:
        """Write the held-out split (`heldout.jsonl`) and `train_count` training-stream problems
        (`train.jsonl`, seed `train_seed`: disjoint from every seed the trainers use by default) as
        math-task files: `--task math:DIR/heldout.jsonl,train=DIR/train.jsonl`. `instruction` is
        appended to every prompt (the real pair asks for a short answer, so the base finishes)."""
        d = Path(directory)
        train: dict[str, None] = {}  # distinct prompts, stream order (a math file's prompts are unique)
        for _, p, _ in self.train_stream(train_seed):
            train.setdefault(p.prompt)
            if len(train) == train_count:
                break
        write_jsonl(d / "heldout.jsonl", [MathRow(r.prompt + instruction, r.answer, r.id) for r in self.heldout_rows()])
        write_jsonl(d / "train.jsonl", [MathRow(p + instruction, self._gold[p], f"wp-train-{i:05d}")
                                        for i, p in enumerate(train)])
        return {"heldout": d / "heldout.jsonl", "train": d / "train.jsonl"}

    @property
    def answer_budget(self) -> int:
        """An upper bound on answer length in characters (= tokens) plus eos, over the held-out split."""
        longest = max(len(format_answer(steps, p.value)) for p in self.heldout() for steps in paths(p.terms).values())
        return longest + 16

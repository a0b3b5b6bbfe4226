"""Countdown: the organism's search task.

A problem is a few numbers and a target. An answer is a sequence of steps `a op b = c`, separated by
`;`; every number is used exactly once (the given numbers and each intermediate result), and the
last result equals the target. The text has no spaces and the tokenizer gives one token per
character (digits split as Qwen2.5 splits them). Example (numbers 3 5 12, target 24):

    prompt:  "3,5,12|24:"
    answer:  "12*3=36;36-5=31"   (invalid: 31 != 24, the verifier says so)
    answer:  "5-3=2;12*2=24"     (valid)
    answer:  "3+5=8;8+12=20"     (invalid)

Intermediate values must be positive integers no larger than `max_value`; division must be exact.
Two answers are the same solution iff their expression trees are equal after sorting the operands
of `+` and `*` (`canonical`); step order and commutative operand order do not make new solutions.

This module is the task alone: generation, exact enumeration, verification, token roles. It is not
the tokenizer (`experiments.training.tokenizer`) and knows nothing about models.

Departure from the TinyZero Countdown: all numbers must be used, values stay positive integers, and
targets are drawn by sampling a uniformly random valid expression (so targets reachable in many
ways are proportionally more frequent): most problems have several solutions, which is the point.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from probe.tasks.protocol import Role
from probe.tasks.streams import training_stream

OPS: tuple[str, ...] = ("+", "-", "*", "/")
SEP = ";"  # between steps
EQ = "="
LIST_SEP = ","  # between the given numbers in the prompt
TARGET_MARK = "|"  # between the numbers and the target in the prompt
ANSWER_MARK = ":"  # ends the prompt
END_TOKEN = "<eos>"  # the organism's end-of-sequence token (an execution token: forced at the target)
_STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")

Tree = int | tuple  # a leaf number, or (op, left, right)


@dataclass(frozen=True)
class CountdownConfig:
    """Difficulty knobs of the problem distribution. The defaults define the embedded organism."""

    n_numbers: int = 3
    """How many numbers a problem gives (each used exactly once)."""
    min_number: int = 1
    """Smallest given number."""
    max_number: int = 12
    """Largest given number."""
    max_value: int = 100
    """Bound on every intermediate value and on the target (values stay in 1..max_value)."""
    ops: tuple[str, ...] = OPS
    """Allowed operators, a subset of + - * /."""
    heldout_size: int = 256
    """Problems in the fixed held-out split (never produced by the training stream)."""
    heldout_seed: int = 20261127
    """Seed of the held-out split; fixed so every model is evaluated on the same problems."""

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise ValueError(f"unknown op(s) {bad or '(none given)'}; allowed ops are {list(OPS)}")
        if self.n_numbers < 2:
            raise ValueError(f"n_numbers={self.n_numbers}: a problem needs at least 2 numbers")
        if self.n_numbers > 5:
            raise ValueError(f"n_numbers={self.n_numbers}: exact enumeration supports at most 5")
        if not 1 <= self.min_number <= self.max_number:
            raise ValueError(
                f"number range {self.min_number}..{self.max_number} is empty or non-positive; "
                "need 1 <= min_number <= max_number"
            )
        if self.max_value < self.max_number:
            raise ValueError(
                f"max_value={self.max_value} < max_number={self.max_number}: the given numbers "
                "themselves would break the bound; raise max_value"
            )
        if self.heldout_size < 1:
            raise ValueError(f"heldout_size={self.heldout_size} must be >= 1")


@dataclass(frozen=True)
class Problem:
    """A Countdown problem: the given numbers (sorted) and the target."""

    numbers: tuple[int, ...]
    target: int

    @property
    def prompt(self) -> str:
        return LIST_SEP.join(map(str, self.numbers)) + f"{TARGET_MARK}{self.target}{ANSWER_MARK}"

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        return (self.numbers, self.target)


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer: ok, or the reason it is not a valid answer."""

    ok: bool
    reason: str = ""
    tree: Tree | None = field(default=None, compare=False)

    def __bool__(self) -> bool:
        return self.ok


def _apply(op: str, a: int, b: int, max_value: int) -> int | None:
    """a op b if it is a positive integer <= max_value, else None."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    else:
        if a % b:
            return None
        c = a // b
    return c if 1 <= c <= max_value else None


def _node(op: str, left: Tree, right: Tree) -> tuple:
    if op in "+*" and _order(right) < _order(left):
        left, right = right, left
    return (op, left, right)


def _order(t: Tree) -> tuple:
    return (0, t) if isinstance(t, int) else (1, repr(t))


@functools.lru_cache(maxsize=65536)
def _solutions(numbers: tuple[int, ...], ops: tuple[str, ...], max_value: int) -> dict[int, dict]:
    """value -> {canonical tree: one step list realising it}, over expressions using all numbers."""
    out: dict[int, dict] = {}

    def rec(items: list[tuple[int, Tree]], steps: tuple) -> None:
        if len(items) == 1:
            value, tree = items[0]
            out.setdefault(value, {}).setdefault(tree, steps)
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ta), (b, tb) = items[i], items[j]
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            for op in ops:
                if op in "+*" and i > j:
                    continue  # commutative: one order is enough
                c = _apply(op, a, b, max_value)
                if c is not None:
                    rec(rest + [(c, _node(op, ta, tb))], steps + ((a, op, b, c),))

    rec([(n, n) for n in numbers], ())
    return out


def format_steps(steps: Sequence[tuple[int, str, int, int]]) -> str:
    """[(a, op, b, c), ...] -> "a op b = c ; ..." without spaces (the answer text)."""
    return SEP.join(f"{a}{op}{b}{EQ}{c}" for a, op, b, c in steps)


def parse_prompt(prompt: str) -> Problem:
    """Inverse of `Problem.prompt`; raises ValueError naming what is malformed."""
    m = re.fullmatch(r"(\d+(?:,\d+)+)\|(\d+):", prompt.strip())
    if m is None:
        raise ValueError(f"not a Countdown prompt: {prompt!r} (expected e.g. '3,5,12|24:')")
    numbers = tuple(sorted(int(t) for t in m.group(1).split(LIST_SEP)))
    return Problem(numbers, int(m.group(2)))


class Countdown:
    """The Countdown task: a problem distribution, its enumerator and verifier.

    Implements the `probe.tasks.protocol.Task` protocol (prompts are `Problem.prompt` strings).
    """

    def __init__(self, config: CountdownConfig | None = None) -> None:
        self.config = config or CountdownConfig()
        self._heldout: list[Problem] | None = None
        self._check_feasible()

    # ---- enumeration -------------------------------------------------------------------------
    def solutions(self, problem: Problem) -> dict[Tree, tuple]:
        """All distinct valid solutions: canonical tree -> one step list realising it."""
        found = _solutions(problem.numbers, self.config.ops, self.config.max_value)
        # Key by the verifier's own canonical form, so enumerator and verifier agree even where a
        # text is ambiguous (an intermediate result equal to an unused given number).
        out: dict[Tree, tuple] = {}
        for steps in found.get(problem.target, {}).values():
            verdict = self.check(problem, format_steps(steps))
            assert verdict.ok, (problem, steps, verdict.reason)
            out.setdefault(verdict.tree, steps)
        return out

    def n_solutions(self, prompt: str) -> int:
        return len(self.solutions(parse_prompt(prompt)))

    # ---- generation --------------------------------------------------------------------------
    def _check_feasible(self) -> None:
        c = self.config
        rng = random.Random(0)
        for _ in range(50):
            nums = tuple(sorted(rng.randint(c.min_number, c.max_number) for _ in range(c.n_numbers)))
            if _solutions(nums, c.ops, c.max_value):
                return
        raise ValueError(
            f"impossible generator spec {c}: no valid expression found for 50 random number sets; "
            "widen the number range, raise max_value or allow more ops"
        )

    def _draw(self, rng: random.Random) -> Problem:
        c = self.config
        while True:
            nums = tuple(sorted(rng.randint(c.min_number, c.max_number) for _ in range(c.n_numbers)))
            table = _solutions(nums, c.ops, c.max_value)
            if not table:
                continue
            # a uniformly random valid expression decides the target
            pool = [(v, t) for v, trees in table.items() for t in trees]
            value, _ = rng.choice(pool)
            return Problem(nums, value)

    def heldout(self) -> list[Problem]:
        """The fixed held-out split: `heldout_size` distinct problems, same for every run."""
        if self._heldout is None:
            rng = random.Random(self.config.heldout_seed)
            seen: dict[tuple, Problem] = {}
            for _ in range(100 * self.config.heldout_size):
                p = self._draw(rng)
                seen.setdefault(p.key, p)
                if len(seen) == self.config.heldout_size:
                    break
            else:
                raise ValueError(
                    f"only {len(seen)} distinct problems exist under {self.config}; lower heldout_size"
                )
            self._heldout = list(seen.values())
        return self._heldout

    def heldout_prompts(self, limit: int = 0) -> list[str]:
        """Prompts of the held-out split (the first `limit` problems; 0 = all)."""
        problems = self.heldout()
        return [p.prompt for p in (problems[:limit] if limit else problems)]

    @property
    def max_new_tokens(self) -> int:
        """An upper bound on answer length in tokens (one per character) plus `<eos>`."""
        c = self.config
        digits, steps = len(str(c.max_value)), c.n_numbers - 1
        return steps * (3 * digits + 2) + (steps - 1) + 1

    def train_prompts(self, seed: int, count: int, start: int = 0) -> list[str]:
        """Prompts `start .. start + count - 1` of `train_stream(seed)` (never held out)."""
        stream = self.train_stream(seed, start)
        return [next(stream)[1].prompt for _ in range(count)]

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless `tokenizer` writes Countdown text one token per character."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in (*"0123456789", *self.config.ops, EQ, SEP, LIST_SEP, TARGET_MARK, ANSWER_MARK)
                   if t not in vocab]
        sample = "3,5,12|24:5-3=2;12*2=24"
        if not missing and tokenizer.convert_ids_to_tokens(tokenizer(sample).input_ids) != list(sample):
            missing = ["(it does not split Countdown text into single characters)"]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ValueError(
                f"the tokenizer lacks Countdown token(s): {shown}. Use the tokenizer saved beside the organism "
                "(experiments.training.tokenizer.load_tokenizer) or experiments.training.tokenizer.build_tokenizer()."
            )

    def train_stream(self, seed: int, start: int = 0):
        """Problems never in the held-out split, deterministic in (seed, index): problem i is drawn
        from `random.Random(f"{seed}:{i}")`, so a resumed stream continues exactly."""
        return training_stream(self._draw, lambda p: p.key, {p.key for p in self.heldout()}, seed, start)

    def sft_stream(self, seed: int, start: int = 0):
        """(prompt, answer text) pairs of `train_stream(seed)`, each answer a uniformly random solution
        drawn with the problem's own generator (what SFT learns from)."""
        for _, p, rng in self.train_stream(seed, start):
            yield p.prompt, self.sample_solution(p, rng)

    def solution_histogram(self) -> dict[str, int]:
        """How many held-out problems have 1, 2, ..., 9, and >= 10 distinct solutions."""
        counts = [min(len(self.solutions(p)), 10) for p in self.heldout()]
        return {(f"{k}" if k < 10 else ">=10"): counts.count(k) for k in range(1, 11)}

    def sample_solution(self, problem: Problem, rng: random.Random) -> str:
        """A uniformly random valid solution (over canonical trees), as answer text."""
        sols = self.solutions(problem)
        if not sols:
            raise ValueError(f"{problem} has no solution")
        tree = rng.choice(sorted(sols, key=repr))
        return format_steps(_steps_of(tree, rng))

    # ---- verification ------------------------------------------------------------------------
    def check(self, problem: Problem, answer: str) -> Verdict:
        """Verify an answer; the verdict says why an invalid one is invalid."""
        c = self.config
        pool: dict[int, list[Tree]] = {}
        for n in problem.numbers:
            pool.setdefault(n, []).append(n)
        steps = answer.strip().split(SEP) if answer.strip() else []
        if len(steps) != len(problem.numbers) - 1:
            return Verdict(False, f"expected {len(problem.numbers) - 1} steps, got {len(steps)}")
        tree: Tree | None = None
        for k, s in enumerate(steps):
            m = _STEP.fullmatch(s)
            if m is None:
                return Verdict(False, f"step {k}: malformed {s!r} (want 'a op b = c', e.g. '12*3=36')")
            a, op, b, claimed = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            if op not in c.ops:
                return Verdict(False, f"step {k}: operator {op!r} not in {list(c.ops)}")
            if not pool.get(a):
                return Verdict(False, f"step {k}: {a} is not available (numbers are used once)")
            ta = pool[a].pop()
            if not pool.get(b):
                return Verdict(False, f"step {k}: {b} is not available (numbers are used once)")
            tb = pool[b].pop()
            value = _apply(op, a, b, c.max_value)
            if value is None:
                return Verdict(False, f"step {k}: {a} {op} {b} is not a positive integer <= {c.max_value}")
            if value != claimed:
                return Verdict(False, f"step {k}: {a} {op} {b} = {value}, not {claimed}")
            tree = _node(op, ta, tb)
            pool.setdefault(value, []).append(tree)
        if claimed != problem.target:
            return Verdict(False, f"final value {claimed} != target {problem.target}")
        return Verdict(True, tree=tree)

    def verify(self, prompt: str, completion: str) -> bool:
        return self.check(parse_prompt(prompt), completion).ok

    def canonical(self, prompt: str, completion: str) -> Hashable | None:
        v = self.check(parse_prompt(prompt), completion)
        return v.tree if v.ok else None

    # ---- token roles -------------------------------------------------------------------------
    @staticmethod
    def token_roles(tokens: Sequence[str]) -> list[Role]:
        """Roles of answer tokens (one character each): operand digits and operators are planning
        (which numbers, which operation); '=', result digits, ';' and the end token are execution
        (forced by the rules). Anything else (padding, unknown) is 'other'."""
        roles: list[Role] = []
        in_result = False
        for t in tokens:
            if t == EQ:
                roles.append("execution")
                in_result = True
            elif t == SEP:
                roles.append("execution")
                in_result = False
            elif t.isdigit():
                roles.append("execution" if in_result else "planning")
            elif t in OPS:
                roles.append("planning")
            elif t == END_TOKEN:
                roles.append("execution")
            else:
                roles.append("other")
        return roles


def _steps_of(tree: Tree, rng: random.Random) -> list[tuple[int, str, int, int]]:
    """Steps that compute `tree`: a random valid order of independent steps and a random order of
    commutative operands (so the demonstrations cover every surface form of a solution)."""
    steps: list[tuple[int, str, int, int]] = []

    # post-order gives one valid order; for independent subtrees shuffle which is computed first
    def walk(t: Tree) -> int:
        if isinstance(t, int):
            return t
        op, left, right = t
        if rng.random() < 0.5:
            a = walk(left)
            b = walk(right)
        else:
            b = walk(right)
            a = walk(left)
        if op in "+*" and rng.random() < 0.5:
            a, b = b, a
        c = _apply(op, a, b, 10**9)
        assert c is not None
        steps.append((a, op, b, c))
        return c

    walk(tree)
    return steps

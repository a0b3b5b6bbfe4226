"""Math problems from a JSONL file, verified with math-verify: `--task math:PATH`.

What it is: the `probe.tasks.protocol.Task` protocol (plus what a study needs to draw problems) for any
file of problems with final answers, so a base model and its RL checkpoint (e.g. Qwen2.5-Math and
its RL-zero run, OLMo-2 and its RLVR checkpoint, or the word-problem organism) can be studied on
their own task. The pieces, each a function of plain strings:

- The file: one JSON object per line with `prompt` and `answer` (a string or a number), optional
  `id`. Blank lines are skipped; a line that is not a JSON object, lacks `prompt` / `answer`, or
  repeats an earlier prompt is an error naming the line (`probe.tasks.math_file.read_jsonl`).
- Final answer (`extract_answer`): the last `\\boxed{...}` (braces balanced); else the text after
  the last "the answer is" (its `$...$` if there is one, else its first number, else the rest of
  the line); else the last number in the completion. No answer: the completion is wrong.
- Verification (`equivalent`): math-verify's `verify(parse(gold), parse(answer))`, on `$...$`-wrapped
  strings. Two plain integers (thousands separators allowed) are compared as integers first: the
  same verdict math-verify gives (tested), without its sympy cost. Results are cached.
- Distinct solutions (`canonical`): the *solution path* of a correct completion is the sequence of
  arithmetic steps it states, `a op b [op c ...] = r`, read left to right, numbers normalised
  (thousands separators and trailing zeros dropped, unicode / LaTeX operators as + - * /) and the
  operands of an all-`+` or all-`*` step sorted (`3*4=12` and `4 × 3 = 12` are one step). A
  correct completion that states no step falls back to its lower-cased, whitespace-collapsed text.
  `n_solutions` is None (a file cannot enumerate solutions), so `probe.metrics.evaluate` averages
  distinct-correct over the problems the model solved and its metrics say so
  (`distinct_correct_subset`).
- Token roles (`token_roles`, task-agnostic, on the tokens' surface text): in every stated step,
  the digits and operators left of `=` are *planning* (which quantities to combine, how), the `=`
  and the result are *execution* (forced by arithmetic), everything else is *other*. A token with
  a planning character is planning, else one with an execution character is execution.

Spec (`parse_spec`): `math:PATH[,train=PATH][,chat][,max_new_tokens=N]`.
- PATH is the held-out set: the study's protocol halves it (even rows select, odd rows test;
  `experiments.study.protocol`).
- Training-distribution prompts (SAE activations, steering-vector derivation, learned edits) come
  from `train=PATH` when given (shuffled by the stage's seed, cycled); without it, from the
  held-out file's *selection* half (even rows), so the test half stays unseen by every choice.
- `chat` wraps every prompt in the tokenizer's chat template (one user turn, generation prompt
  added; a BOS the template writes is dropped, since the tokenizer adds its own). The wrapping
  happens in `check_tokenizer`, which every stage calls before drawing prompts.
- `max_new_tokens`: the completion budget (default 2048). A tokenizer with a finite
  `model_max_length` caps the default at that minus the longest prompt; an explicit value is kept
  as given, and the sampler refuses a prompt + budget longer than the model's context.

What it is not: a grader of proofs or of intermediate steps (only the final answer is checked), or
a problem generator (`probe.tasks.wordproblems` generates the organism's problems).
"""

from __future__ import annotations

import functools
import random
import re
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from probe.tasks.math_file import MathRow, read_jsonl
from probe.tasks.protocol import Role

DEFAULT_MAX_NEW_TOKENS = 2048
_NUM = r"(?:(?<![\w)\]}])-)?\d+(?:,\d{3})*(?:\.\d+)?"
_OP = r"(?:\\times|\\cdot|\\div|[-+*/×÷])"
_STEP = re.compile(rf"(?P<lhs>{_NUM}(?:\s*{_OP}\s*{_NUM})+)\s*(?P<eq>=)\s*(?P<rhs>{_NUM})")
_NUMBER = re.compile(rf"{_NUM}(?:/\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(?P<rest>[^\n]*)", re.IGNORECASE)
_INT = re.compile(r"[-+]?\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+")
_OPS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "÷": "/"}


# ---- answers ------------------------------------------------------------------------------------
def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def extract_answer(completion: str) -> str | None:
    """The completion's final answer as a string (see the module docstring), or None."""
    boxed = _boxed(completion)
    if boxed:
        return boxed
    said = list(_ANSWER_IS.finditer(completion))
    if said:
        rest = said[-1].group("rest").strip()
        latex = re.search(r"\$([^$]+)\$", rest)
        if latex:
            return latex.group(1).strip()
        num = _NUMBER.search(rest)
        if num:
            return num.group(0)
        rest = rest.rstrip(". ")
        if rest:
            return rest
    nums = _NUMBER.findall(completion)
    return nums[-1] if nums else None


def _clean(ans: str) -> str:
    ans = ans.strip().strip("$").strip()
    inner = _boxed(ans)
    ans = inner if inner is not None else ans
    return ans.rstrip(".").strip()


@functools.lru_cache(maxsize=1 << 16)
def equivalent(gold: str, answer: str) -> bool:
    """Is `answer` the same final answer as `gold`? math-verify's rule (integers compared directly)."""
    g, a = _clean(gold), _clean(answer)
    ints = [(_INT.fullmatch(x) or _THOUSANDS.fullmatch(x)) and x.replace(",", "") for x in (g, a)]
    if all(ints):
        return int(ints[0]) == int(ints[1])
    return _math_verify(g, a)


def _math_verify(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    t = 5 if threading.current_thread() is threading.main_thread() else None
    g = parse(f"${gold}$", parsing_timeout=t) or parse(gold, parsing_timeout=t)
    a = parse(f"${answer}$", parsing_timeout=t) or parse(answer, parsing_timeout=t)
    return bool(g and a and verify(g, a, timeout_seconds=t))


# ---- solution paths -----------------------------------------------------------------------------
def _norm_number(s: str) -> str:
    s = s.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def solution_steps(text: str) -> tuple[str, ...]:
    """The arithmetic steps a completion states, normalised, in order (e.g. ("3*4=12", "12+5=17"))."""
    steps = []
    for m in _STEP.finditer(text):
        lhs = m.group("lhs")
        ops = [_OPS.get(o, o) for o in re.findall(_OP, lhs)]
        nums = [_norm_number(x) for x in re.findall(_NUM, lhs)]
        if len(nums) != len(ops) + 1:
            continue
        if len(set(ops)) == 1 and ops[0] in "+*":
            nums = sorted(nums, key=lambda x: (float(x), x))
        expr = nums[0] + "".join(o + x for o, x in zip(ops, nums[1:]))
        steps.append(f"{expr}={_norm_number(m.group('rhs'))}")
    return tuple(steps)


def canonical_key(text: str) -> Hashable:
    """The solution path of a completion: its normalised steps, or its normalised text without any."""
    steps = solution_steps(text)
    return ("steps", steps) if steps else ("text", " ".join(text.lower().split()))


# ---- token roles --------------------------------------------------------------------------------
@functools.cache
def byte_alphabet() -> dict[str, int]:
    """GPT-2 byte-level alphabet (character -> byte), as Qwen / Llama-3 / OLMo tokenizers write tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, k = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_surface(token: str) -> str:
    """A token's text as it reads: byte-level ('Ġ' = space) or SentencePiece ('▁' = space) markers undone."""
    dec = byte_alphabet()
    if token and all(c in dec for c in token):
        return bytes(dec[c] for c in token).decode("utf-8", errors="replace")
    return token.replace("▁", " ")


def roles_by_rule(tokens: Sequence[str]) -> list[Role]:
    """Planning = digits and operators of a stated step left of `=`; execution = the `=` and its result."""
    surf = [token_surface(t) for t in tokens]
    text = "".join(surf)
    char = [""] * len(text)
    for m in _STEP.finditer(text):
        for i in range(*m.span("lhs")):
            if not text[i].isspace():
                char[i] = "planning"
        for i in (*range(*m.span("eq")), *range(*m.span("rhs"))):
            char[i] = "execution"
    roles: list[Role] = []
    pos = 0
    for s in surf:
        got = set(char[pos:pos + len(s)])
        roles.append("planning" if "planning" in got else "execution" if "execution" in got else "other")
        pos += len(s)
    return roles


# ---- the task -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MathSpec:
    """A parsed `math:` task spec."""

    path: str
    train: str = ""
    chat: bool = False
    max_new_tokens: int = 0
    """0 = the default (2048, capped by the tokenizer's model_max_length)."""


def parse_spec(spec: str) -> MathSpec:
    """`math:PATH[,train=PATH][,chat][,max_new_tokens=N]` -> MathSpec; ValueError naming the bad part."""
    body = spec[len("math:"):] if spec.startswith("math:") else spec
    parts = body.split(",")
    if not parts[0]:
        raise ValueError(f"task {spec!r} names no file. Fix: --task math:problems.jsonl")
    out = {"path": parts[0]}
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if key == "chat" and not eq:
            out["chat"] = True
        elif key == "train" and value:
            out["train"] = value
        elif key == "max_new_tokens" and value.isdigit() and int(value) > 0:
            out["max_new_tokens"] = int(value)
        else:
            raise ValueError(f"task {spec!r}: option {p!r} is not one of train=PATH, chat, max_new_tokens=N (N >= 1). "
                             "Fix: e.g. --task math:test.jsonl,train=train.jsonl,chat,max_new_tokens=4096")
    return MathSpec(**out)


class MathTask:
    """Problems with final answers (rows of a JSONL file), verified with math-verify.

    Implements `probe.tasks.protocol.Task` plus `heldout_prompts`, `train_prompts`, `max_new_tokens` and
    `check_tokenizer` (what a study needs). Prompts are the file's prompts, or their chat-template
    wrapping once `check_tokenizer` has seen a tokenizer (with `chat`)."""

    def __init__(self, rows: Sequence[MathRow], train_rows: Sequence[MathRow] = (), chat: bool = False,
                 max_new_tokens: int = 0, source: str = "") -> None:
        if not rows:
            raise ValueError("a math task needs at least one held-out row")
        self.rows, self.train_rows = list(rows), list(train_rows)
        self.chat, self.source, self._budget = chat, source, max_new_tokens
        self._gold: dict[str, str] = {r.prompt: r.answer for r in (*self.train_rows, *self.rows)}
        self._wrap: dict[str, str] = {}
        self._cap: int | None = None

    @classmethod
    def from_spec(cls, spec: str) -> MathTask:
        s = parse_spec(spec)
        return cls(read_jsonl(s.path), read_jsonl(s.train) if s.train else (), s.chat, s.max_new_tokens, spec)

    # ---- prompts ---------------------------------------------------------------------------------
    def _shown(self, prompt: str) -> str:
        if self.chat and not self._wrap:
            raise ValueError("this math task wraps prompts in the chat template, which needs the tokenizer: call "
                             "task.check_tokenizer(tokenizer) before drawing prompts")
        return self._wrap.get(prompt, prompt)

    def heldout_prompts(self, limit: int = 0) -> list[str]:
        """The file's prompts in file order (the first `limit`; 0 = all)."""
        rows = self.rows[:limit] if limit else self.rows
        return [self._shown(r.prompt) for r in rows]

    def train_prompts(self, seed: int, count: int, start: int = 0) -> list[str]:
        """Prompts `start .. start + count - 1` of the training stream: the `train=` rows shuffled by
        `seed` and cycled; without a training file, the held-out selection half (even rows)."""
        pool = [r.prompt for r in self.train_rows] or [r.prompt for r in self.rows[0::2]]
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        return [self._shown(pool[order[i % len(pool)]]) for i in range(start, start + count)]

    @property
    def max_new_tokens(self) -> int:
        """Completion budget in tokens (eos included); see the module docstring for the default."""
        if self._budget:
            return self._budget
        return DEFAULT_MAX_NEW_TOKENS if self._cap is None else max(1, min(DEFAULT_MAX_NEW_TOKENS, self._cap))

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless `tokenizer` can write every prompt (it must have an eos token and
        reproduce each prompt when decoding its ids); bind the chat template when `chat` is set."""
        if not isinstance(getattr(tokenizer, "eos_token_id", None), int):
            raise ValueError("the tokenizer has no eos token, so generation cannot stop. Fix: set tokenizer.eos_token")
        if self.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"task {self.source!r} asks for the chat template but this tokenizer has none. "
                                 "Fix: drop ',chat' from --task, or use the instruct model's tokenizer")
            bos = getattr(tokenizer, "bos_token", None)
            for r in (*self.rows, *self.train_rows):
                text = tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                                     add_generation_prompt=True)
                self._wrap[r.prompt] = text[len(bos):] if bos and text.startswith(bos) else text
            for r in (*self.rows, *self.train_rows):
                self._gold[self._wrap[r.prompt]] = r.answer
        for i, r in enumerate((*self.rows, *self.train_rows)):
            text = self._shown(r.prompt)
            back = tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids, skip_special_tokens=False)
            if " ".join(back.split()) != " ".join(text.split()):
                raise ValueError(f"the tokenizer cannot write row {i} of {self.source or 'the task'} (id {r.id}): "
                                 f"{text[:60]!r} decodes back as {back[:60]!r} (characters outside its vocabulary). "
                                 "Fix: use the tokenizer saved beside the model the file was made for")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 10**7:
            longest = max(len(tokenizer(self._shown(r.prompt)).input_ids) for r in self.rows)
            self._cap = limit - longest

    # ---- the Task protocol -----------------------------------------------------------------------
    def answer(self, prompt: str) -> str:
        """The gold answer of a prompt of this task (raw or chat-wrapped)."""
        try:
            return self._gold[prompt]
        except KeyError:
            raise ValueError(f"prompt {prompt[:60]!r} is not in {self.source or 'this task'}; only its own prompts "
                             "can be verified") from None

    def verify(self, prompt: str, completion: str) -> bool:
        pred = extract_answer(completion)
        return pred is not None and equivalent(self.answer(prompt), pred)

    def canonical(self, prompt: str, completion: str) -> Hashable | None:
        return canonical_key(completion) if self.verify(prompt, completion) else None

    def n_solutions(self, prompt: str) -> int | None:
        return None

    @staticmethod
    def token_roles(tokens: Sequence[str]) -> list[Role]:
        return roles_by_rule(tokens)

"""Diversity metrics over sampled branches: pass@k, distinct correct answers, coverage, and the two
per-sample training signals built on them (the pass@k advantage and the distinct-solution share).

What it is: pure functions on tensors of per-sample correctness and per-problem answer keys. No
model, no tokenizer, no task: `probe.metrics.evaluate` turns sampled branches into these inputs.
The GRPO trainer (`experiments.training.grpo_loss`) and the learned-edit trainer (`steering.learn`)
both take their pass@k advantage (`pass_at_k_advantages`) and their distinct-solution reward
(`distinct_solution_shares`) from here.

What it is not: a sampler, a scorer, or a statistics module. Nothing here knows how a completion
was produced or checked; intervals are `probe.stats`'.

Where it departs from the papers:
- `pass_at_k` is the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), computed
  as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) as in their reference code, in float64 and in
  log space for the vectorised form, so it stays exact to ~1e-12 for n in the thousands.
- A problem counts as *solved at k* when its pass@k estimate is >= a threshold (0.5 by default:
  "more likely than not within k tries"). With k = n that is simply "some sample is correct",
  which is the default (`k=None`) and what Yue et al. (2025) call coverage. Coverage at k (the
  expected share of problems that k of the n samples solve) is the mean unbiased pass@k, so
  `pass_at_k_curve` is the coverage curve; there is no second estimator of it.
- Distinct-correct is averaged over a stated subset of problems (`distinct_eligible`): the task's
  `n_solutions >= 3` where it can count solutions, else the problems solved. A comparison of
  models averages every model over the problems eligible for all of them (`paired_eligible`), so a
  model that solves more problems is not averaged over other problems than its rival.
- Its confidence intervals (`probe.metrics.evaluate`, `probe.metrics.frontier`) are percentile
  bootstraps over *problems* (samples of one problem are not independent draws of the metric),
  drawn by `probe.stats`.
- `pass_at_k_advantages` is the analytical pass@k advantage of arXiv:2508.10751: with N samples
  of a prompt, N_neg incorrect, the group reward is R = 1 - C(N_neg, k) / C(N, k) (the expected
  pass@k of a random k-subset); a sample's advantage is the mean reward of the k-subsets holding
  it minus R: A_pos = 1 - R, A_neg = 1 - R - C(N_neg - 1, k - 1) / C(N - 1, k - 1); optionally /
  sigma, sigma = sqrt(R (1 - R)). The binomials are exact integers (`math.comb`), so the
  advantages are exact to float64 rounding. Groups with every sample alike carry no signal (0).
- `distinct_solution_shares` credits each sample its Shapley share of the group's distinct
  correct solutions: 1 / c for a correct sample whose solution appears c times in its group.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def check_k(k: int, n: int) -> int:
    """Return k as an int if it is a budget in 1..n (n = samples per problem), else raise."""
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise TypeError(f"k={k!r} must be an int in 1..{n}")
    k = operator.index(k)
    if k > n:
        raise ValueError(f"k={k} > n={n} samples per problem; sample more or lower k")
    if k < 1:
        raise ValueError(f"k={k} < 1; pass@k needs at least one draw (use k in 1..{n})")
    return k


def default_ks(n: int) -> list[int]:
    """The budgets reported by default for n samples per problem: 1, 2, 4, ... <= n, plus n itself."""
    if n < 1:
        raise ValueError(f"n={n} samples per problem; need at least 1")
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k).

    n: samples drawn, c: how many were correct (0 <= c <= n), k: budget (1 <= k <= n).
    Returns the probability that a uniformly random k-subset of the n samples holds a correct one.
    """
    if n < 1:
        raise ValueError(f"n={n} samples; need at least 1")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct out of n={n}; need 0 <= c <= n")
    check_k(k, n)
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_per_problem(
    counts: Int[Tensor, " problems"], n: int, k: int
) -> Float[Tensor, " problems"]:
    """Vectorised unbiased pass@k: one float64 value per problem.

    counts: correct samples per problem (each in 0..n); n: samples per problem; k: 1..n.
    """
    check_k(k, n)
    counts = torch.as_tensor(counts).long()
    if counts.numel() and (counts.min() < 0 or counts.max() > n):
        raise ValueError(f"correct counts must lie in 0..n={n}; got {counts.min()}..{counts.max()}")
    i = torch.arange(1, n + 1, dtype=torch.float64)  # (n,)
    # log(1 - k/i) for i > k; i <= k makes the product 0 (a correct sample is always drawn)
    logs = torch.where(i > k, torch.log1p(-k / i.clamp(min=k + 1)), -torch.inf)  # (n,)
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # suffix[j] = sum_{i>j} logs
    suffix = torch.cat([suffix, torch.zeros(1, dtype=torch.float64)])  # (n+1,), empty sum at n
    return -torch.expm1(suffix[n - counts])  # 1 - prod_{i=n-c+1}^{n} (1 - k/i)


def _counts_and_n(
    correct: Bool[Tensor, "problems n"] | Int[Tensor, " problems"], n: int | None
) -> tuple[Tensor, int]:
    correct = torch.as_tensor(correct)
    if correct.dtype == torch.bool:
        if correct.ndim != 2:
            raise ValueError(
                f"boolean `correct` must be (problems, n); got shape {tuple(correct.shape)}"
            )
        if n is not None and n != correct.shape[1]:
            raise ValueError(f"n={n} disagrees with correct.shape[1]={correct.shape[1]}; drop n")
        counts, n = correct.sum(1), correct.shape[1]
    else:
        if correct.ndim != 1 or n is None:
            raise ValueError("integer `correct` is per-problem counts (problems,) and needs n=")
        counts = correct
    if counts.numel() == 0:
        raise ValueError("no problems: pass@k over an empty set is undefined")
    return counts.long(), int(n)


def pass_at_k_curve(
    correct: Bool[Tensor, "problems n"] | Int[Tensor, " problems"],
    ks: Iterable[int] | None = None,
    *,
    n: int | None = None,
) -> dict[int, float]:
    """Mean unbiased pass@k over problems, for each k in `ks` (default: every k in 1..n).

    correct: either a (problems, n) bool matrix of per-sample correctness, or per-problem counts of
    correct samples (problems,) together with `n=`. Raises if any k is outside 1..n.
    """
    counts, n = _counts_and_n(correct, n)
    ks = range(1, n + 1) if ks is None else [check_k(k, n) for k in ks]
    return {k: pass_at_k_per_problem(counts, n, k).mean().item() for k in ks}


def distinct_correct(keys: Sequence[Sequence[Hashable | None]]) -> Int[Tensor, " problems"]:
    """Distinct valid answers per problem.

    keys: per problem, one canonical key per sample, None for an invalid sample (the task's
    `canonical` contract). Equal keys are one solution. Returns int64 counts (problems,).
    """
    return torch.tensor([len({k for k in row if k is not None}) for row in keys], dtype=torch.long)


def solution_counts(keys: Sequence[Hashable | None]) -> list[int]:
    """How many samples of one problem wrote each distinct correct solution, largest first.

    keys: one canonical key per sample, None for an incorrect one. `sum` is the number of correct
    samples, `len` the problem's distinct-correct count."""
    return sorted(Counter(k for k in keys if k is not None).values(), reverse=True)


def rarefied_distinct(counts: Sequence[int], m: int) -> float:
    """Expected distinct solutions among `m` of a problem's correct samples drawn without replacement.

    counts: `solution_counts` of the problem (N = sum(counts) correct samples); 1 <= m <= N.
    Returns sum_i [1 - C(N - n_i, m) / C(N, m)] (rarefaction, Hurlbert 1971): distinct-correct at a
    matched number of correct samples. Two models compared at the same m answer "how many different
    solutions among m correct ones", which distinct-correct alone confounds with how many samples are
    correct (a model that solves a problem once can show at most one solution).
    """
    total = sum(counts)
    if any(c < 1 for c in counts) or not 1 <= m <= total:
        raise ValueError(f"need counts >= 1 and 1 <= m <= sum(counts) = {total}; got counts {list(counts)}, m={m}")
    denom = math.comb(total, m)
    return float(sum(1 - math.comb(total - c, m) / denom for c in counts))


MIN_SOLUTIONS = 3
"""A problem counts toward a distinct-correct mean by the task's rule when it has at least this many
distinct solutions (fewer cannot show breadth); tasks that cannot count solutions use the solved problems."""


def distinct_rule(task: Any, prompts: Sequence[str]) -> list[bool | None]:
    """Per prompt: True / False where `task.n_solutions` counts its solutions (>= `MIN_SOLUTIONS` or
    not), None where it cannot (a math file): the `rule` of `distinct_eligible` and
    `probe.metrics.outcomes.Outcomes.from_scored`'s `eligible`."""
    return [None if s is None else s >= MIN_SOLUTIONS for s in map(task.n_solutions, prompts)]


def distinct_eligible(
    rule: Sequence[bool | None], solved: Bool[Tensor, "*models problems"]
) -> Bool[Tensor, "*models problems"]:
    """Which problems a distinct-correct mean is over, per model.

    rule: per problem, the task's verdict where it can count solutions (True: n_solutions >= 3,
    False: fewer) or None where it cannot (a math file). solved: per model and problem, whether
    some sample was correct (one row for one model). A problem with a rule counts by the rule, the
    same for every model; one without counts where that model solved it.
    """
    solved = torch.as_tensor(solved, dtype=torch.bool)
    if solved.shape[-1] != len(rule):
        raise ValueError(f"rule has {len(rule)} problems, solved has {solved.shape[-1]}; pass one entry per problem")
    known = torch.tensor([r is not None for r in rule], dtype=torch.bool)  # (problems,)
    by_rule = torch.tensor([bool(r) for r in rule], dtype=torch.bool)  # (problems,)
    return torch.where(known, by_rule, solved)


def paired_eligible(eligible: Bool[Tensor, "models problems"]) -> Bool[Tensor, " problems"]:
    """The problems a comparison of models averages distinct-correct over: eligible for every model.

    eligible: each model's `distinct_eligible`. Where the task counts solutions every model's
    eligibility is the same rule, so this keeps it; where it cannot, it keeps the problems every
    compared model solved at least once (the paired subset). Means over it are like with like.
    """
    eligible = torch.as_tensor(eligible, dtype=torch.bool)
    if eligible.ndim != 2 or eligible.shape[0] < 1:
        raise ValueError(f"eligible must be (models, problems) with >= 1 model; got shape {tuple(eligible.shape)}")
    return eligible.all(0)


def subset_label(rule: Sequence[bool | None], *, paired: bool) -> str:
    """Words for the problems `distinct_eligible` (paired=False) or `paired_eligible` (paired=True)
    selects under `rule`: what `distinct_correct_subset` records beside a mean."""
    known = sum(r is not None for r in rule)
    solved = "solved by every compared model" if paired else "solved"
    if known == len(rule):
        return "n_solutions>=3"
    if known == 0:
        return ("problems every compared model solved" if paired else "solved problems") + " (n_solutions unknown)"
    return f"n_solutions>=3, or {solved} where n_solutions is unknown"


def solved_coverage(
    correct_a: Bool[Tensor, "problems n_a"],
    correct_b: Bool[Tensor, "problems n_b"],
    *,
    k: int | None = None,
    threshold: float = 0.5,
) -> dict[str, int | float | None]:
    """Compare which problems two models solve.

    A problem is solved at k when its unbiased pass@k is >= `threshold` (in (0, 1]). The default
    k=None means k = each model's own n, i.e. solved iff any sample is correct (the threshold is
    then irrelevant). Returns counts `solved_a`, `solved_b`, `both`, `only_a`, `only_b`, the
    `jaccard` index both / (a or b) (NaN when neither model solves anything), `k` and `threshold`.
    """
    correct_a, correct_b = torch.as_tensor(correct_a), torch.as_tensor(correct_b)
    if correct_a.ndim != 2 or correct_b.ndim != 2 or correct_a.shape[0] != correct_b.shape[0]:
        raise ValueError(
            f"need (problems, n) bool matrices over the same problems; got shapes "
            f"{tuple(correct_a.shape)} and {tuple(correct_b.shape)}"
        )
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")

    def solved(correct: Tensor) -> Tensor:
        if k is None:
            return correct.any(1)
        return pass_at_k_per_problem(correct.sum(1), correct.shape[1], k) >= threshold

    sa, sb = solved(correct_a), solved(correct_b)
    both, union = int((sa & sb).sum()), int((sa | sb).sum())
    return {
        "k": k,
        "threshold": threshold,
        "solved_a": int(sa.sum()),
        "solved_b": int(sb.sum()),
        "both": both,
        "only_a": int((sa & ~sb).sum()),
        "only_b": int((sb & ~sa).sum()),
        "jaccard": both / union if union else math.nan,
    }


def crossover_k(
    curve_a: Mapping[int | str, float], curve_b: Mapping[int | str, float]
) -> int | None:
    """Smallest k at which curve b catches up with curve a after being strictly below it.

    Typical use: a = the RL model (ahead at small k), b = the base model; the result is where the
    base overtakes (or ties) the RL model. Only ks present in both curves are compared, in
    increasing order. Keys may be ints or strings (as read back from JSON). Returns None when b is
    never below a (no crossover: b leads from the start) or never catches up.
    """
    a = {int(k): float(v) for k, v in curve_a.items()}
    b = {int(k): float(v) for k, v in curve_b.items()}
    below = False
    for k in sorted(a.keys() & b.keys()):
        if b[k] < a[k]:
            below = True
        elif below:
            return k
    return None


# --- per-sample training signals (GRPO and the learned-edit trainer) -----------------------------
def pass_at_k_advantages(
    rewards: Float[Tensor, " rows"] | Bool[Tensor, " rows"], group_size: int, k: int, std_normalize: bool = False,
    eps: float = 1e-6,
) -> Float[Tensor, " rows"]:
    """The analytical pass@k advantage of arXiv:2508.10751 per sample (module docstring).

    rewards: 0/1 (or bool) correctness per row, rows in prompt-major groups of `group_size`.
    std_normalize: divide by the group's sigma + `eps` (by 1 where that is 0: sigma = 0 with eps =
    0, the learned-edit trainer's form). Groups whose samples are all correct or all wrong get 0.
    Returns rewards' dtype when it is floating, else float32, on rewards' device.
    """
    if not 1 <= k <= group_size:
        raise ValueError(f"pass_k={k} must be in 1..group_size={group_size}; lower --pass-k")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    n = group_size
    comb = lambda a, b: math.comb(a, b) if 0 <= b <= a else 0  # noqa: E731  exact, 0 when a < b
    pos, neg = [], []  # per number of wrong samples w = 0..n
    for w in range(n + 1):
        r = 1.0 - comb(w, k) / comb(n, k)
        s = math.sqrt(max(r * (1 - r), 0.0))
        scale = (s + eps) if std_normalize and s + eps > 0 else 1.0
        all_alike = w in (0, n)
        pos.append(0.0 if all_alike else (1.0 - r) / scale)
        neg.append(0.0 if all_alike else (1.0 - r - comb(w - 1, k - 1) / comb(n - 1, k - 1)) / scale)
    g = rewards.reshape(-1, n)  # (prompts, n)
    correct = g > 0.5
    wrong = n - correct.sum(1, keepdim=True)  # (prompts, 1)
    table = torch.tensor([pos, neg], dtype=torch.float64, device=rewards.device)  # (2, n + 1)
    adv = torch.where(correct, table[0][wrong], table[1][wrong])  # (prompts, n)
    dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    return adv.reshape(-1).to(dtype)


def distinct_solution_shares(keys: Sequence[Hashable | None], group_size: int) -> Float[Tensor, " rows"]:
    """Each sample's Shapley share of its group's distinct correct solutions (float32): 1 / c for a
    correct sample (key not None) whose key appears c times in its group, 0 if incorrect. Rows are
    prompt-major groups of `group_size`; a group's shares sum to its number of distinct solutions."""
    if group_size < 1 or len(keys) % group_size:
        raise ValueError(f"{len(keys)} samples do not split into groups of group_size={group_size}; "
                         "pass every sample of every prompt, prompt-major")
    out = []
    for i in range(0, len(keys), group_size):
        grp = keys[i:i + group_size]
        counts = Counter(k for k in grp if k is not None)
        out += [0.0 if k is None else 1.0 / counts[k] for k in grp]
    return torch.tensor(out, dtype=torch.float32)

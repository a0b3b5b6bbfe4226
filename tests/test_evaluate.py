"""probe.metrics.evaluate on hand-built Branches, a toy sum task and an in-memory WordLevel tokenizer.

The toy task: the prompt is a target t ("7"); a valid completion is "a + b" with single digits
a + b = t. Operands commute, so "3 + 4" and "4 + 3" are one solution. The first operand is a real
choice (planning); "+" and the second operand are forced (execution).
"""

from __future__ import annotations

import json

import pytest
import torch

from probe.metrics.evaluate import (
    PAD_ROLE,
    ROLE_CODE,
    Scored,
    diversity_metrics,
    evaluate,
    plot_pass_at_k,
    score_branches,
)
from probe.sampling.sampler import Branches, SamplerConfig
from probe.stats import bootstrap_ci
from probe.tasks.protocol import Task

VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "+": 3, **{str(d): 4 + d for d in range(10)}}


class SumTask:
    """Toy task implementing `probe.tasks.protocol.Task`; `enumerable=False` makes n_solutions unknown."""

    def __init__(self, enumerable: bool = True):
        self.enumerable = enumerable

    def _operands(self, completion: str) -> tuple[int, int] | None:
        parts = completion.split()
        if len(parts) != 3 or parts[1] != "+" or not (parts[0].isdigit() and parts[2].isdigit()):
            return None
        return int(parts[0]), int(parts[2])

    def verify(self, prompt: str, completion: str) -> bool:
        ops = self._operands(completion)
        return ops is not None and sum(ops) == int(prompt)

    def canonical(self, prompt: str, completion: str):
        return (
            tuple(sorted(self._operands(completion))) if self.verify(prompt, completion) else None
        )

    def n_solutions(self, prompt: str) -> int | None:
        t = int(prompt)
        return (
            len({tuple(sorted((a, t - a))) for a in range(10) if 0 <= t - a <= 9})
            if self.enumerable
            else None
        )

    def token_roles(self, tokens):
        return ["planning"] + ["execution"] * (len(tokens) - 1) if tokens else []


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


PROMPTS = ["7", "1", "9"]  # 4, 1 and 5 distinct solutions
ROWS = [  # n = 4 samples per prompt, prompt-major; width 4 = max_new_tokens
    "3 + 4 <eos>", "4 + 3 <eos>", "2 + 5 <eos>", "1 + 1 +",  # 3 correct, 2 distinct
    "0 + 1 <eos>", "1 + 0 <eos>", "2 <eos>", "5 5 5 5",  # 2 correct, 1 distinct
    "1 + 1 <eos>", "9 <eos>", "4 + 4 <eos>", "3 + 3 +",  # 0 correct
]  # fmt: skip
EOS_ENTROPY = 0.4


def planning_entropy(row: int) -> float:
    return 1.0 + 0.1 * row


def hand_branches() -> Branches:
    """Entropy: planning token of row r = 1.0 + 0.1 r, execution token at position j = 0.1 j, eos 0.4."""
    tokens = torch.zeros(12, 4, dtype=torch.long)
    mask = torch.zeros(12, 4, dtype=torch.bool)
    entropy = torch.zeros(12, 4)
    for r, text in enumerate(ROWS):
        for j, word in enumerate(text.split()):
            tokens[r, j], mask[r, j] = VOCAB[word], True
            entropy[r, j] = (
                EOS_ENTROPY if word == "<eos>" else planning_entropy(r) if j == 0 else 0.1 * j
            )
    return Branches(
        prompt_index=torch.arange(3).repeat_interleave(4),
        sample_index=torch.arange(4).repeat(3),
        tokens=tokens,
        mask=mask,
        logprobs=torch.where(mask, -0.5, 0.0),
        entropy=entropy,
        finish_reason=["eos" if "<eos>" in t else "length" for t in ROWS],
        prompt_tokens=[[VOCAB[p]] for p in PROMPTS],
    )


def test_toy_task_implements_the_protocol():
    assert isinstance(SumTask(), Task), "the toy task must satisfy probe.tasks.protocol.Task"


def test_score_branches_strips_eos_and_padding_and_merges_commuted_answers(tokenizer):
    scored = score_branches(hand_branches(), PROMPTS, SumTask(), tokenizer)
    want_text = [t.replace(" <eos>", "") for t in ROWS]
    assert scored.completions == want_text, "the task must see the text without eos or padding"
    assert scored.correct.tolist() == [1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert scored.canonical[0] == scored.canonical[1] == (3, 4), "3 + 4 and 4 + 3 are one solution"
    assert scored.canonical[3] is None and scored.canonical[8] is None, "invalid rows have no key"
    p, e, o = ROLE_CODE["planning"], ROLE_CODE["execution"], ROLE_CODE["other"]
    assert scored.roles[0].tolist() == [p, e, e, o], (
        "eos is 'other', operands after the first forced"
    )
    assert scored.roles[6].tolist() == [p, o, PAD_ROLE, PAD_ROLE], "padding carries no role"
    assert scored.roles[7].tolist() == [p, e, e, e], "a length-finished row has no eos to drop"


def test_diversity_metrics_equals_hand_computed_values(tokenizer):
    branches, task = hand_branches(), SumTask()
    scored = score_branches(branches, PROMPTS, task, tokenizer)
    m = diversity_metrics(branches, scored, PROMPTS, task, n_boot=200, seed=11, temperature=0.7)
    assert set(m) == {
        "pass_at_1", "pass_at_1_ci", "pass_at_k", "pass_at_k_ci", "distinct_correct_mean",
        "distinct_correct_mean_ci", "distinct_correct_n_problems", "distinct_correct_subset",
        "distinct_correct_all_mean", "planning_entropy_mean", "execution_entropy_mean", "fork_entropy_mean",
        "fraction_finished_eos", "truncated_share", "eos_by_budget", "n_problems", "n_samples", "temperature", "seed",
    }, "metrics.json keys are shared across models; pass_at_64 only exists when n >= 64"  # fmt: skip
    # pass@k per problem with c = 3, 2, 0 of n = 4: k=1: 3/4, 1/2, 0; k=2: 1, 1 - 1/6, 0; k=4: 1, 1, 0
    assert m["pass_at_1"] == pytest.approx(5 / 12)
    assert m["pass_at_k"] == pytest.approx({"1": 5 / 12, "2": 11 / 18, "4": 2 / 3}), (
        "ks 1, 2, 4(=n)"
    )
    want_ci = bootstrap_ci(torch.tensor([0.75, 0.5, 0.0]), n_boot=200, seed=11)
    assert m["pass_at_1_ci"] == pytest.approx(list(want_ci)), "the CI resamples problems, seeded"
    assert m["pass_at_k_ci"]["1"] == m["pass_at_1_ci"] and set(m["pass_at_k_ci"]) == {"1", "2", "4"}
    # distinct: problems "7" (2 distinct) and "9" (0); "1" has a single solution and is left out
    assert (m["distinct_correct_mean"], m["distinct_correct_n_problems"]) == (1.0, 2)
    assert m["distinct_correct_subset"] == "n_solutions>=3"
    lo, hi = m["distinct_correct_mean_ci"]
    assert 0 <= lo <= 1.0 <= hi <= 2
    # 12 planning tokens 1.0..2.1; 23 execution tokens: 7 rows of (0.1, 0.2), 3 rows of (0.1, 0.2, 0.3)
    assert m["planning_entropy_mean"] == pytest.approx(1.55)
    assert m["execution_entropy_mean"] == pytest.approx(3.9 / 23), "roles misaligned with tokens"
    # 44 real tokens (12 + 23 + 9 eos) -> ceil(8.8) = 9 forks: the planning tokens 1.3 .. 2.1
    assert m["fork_entropy_mean"] == pytest.approx(1.7)
    assert m["fraction_finished_eos"] == 0.75
    assert m["truncated_share"] == 0.25, "rows 3, 7 and 11 never emitted eos within the 4-token budget"
    assert m["eos_by_budget"] == {"4": 0.75}, "one budget below 16: the run's own"
    assert m["distinct_correct_all_mean"] == pytest.approx(1.0), "distinct [2, 1, 0] over all three problems"
    assert (m["n_problems"], m["n_samples"], m["temperature"], m["seed"]) == (3, 4, 0.7, 11)
    json.dumps(m, allow_nan=False)  # metrics.json must be strict JSON
    pp = diversity_metrics(branches, scored, PROMPTS, task, n_boot=200, seed=11, per_problem=True)["per_problem"]
    assert pp == {"n_correct": [3, 2, 0], "distinct_correct": [2, 1, 0], "distinct_eligible": [True, False, True],
                  "distinct_rule": [True, False, True], "solution_counts": [[2, 1], [2], []]}


def test_distinct_correct_averages_over_solved_problems_when_task_cannot_count(tokenizer):
    branches, task = hand_branches(), SumTask(enumerable=False)
    scored = score_branches(branches, PROMPTS, task, tokenizer)
    m = diversity_metrics(branches, scored, PROMPTS, task, n_boot=50, per_problem=True)
    # distinct [2, 1, 0] with n_correct [3, 2, 0]: the unsolved third problem is not averaged
    assert (m["distinct_correct_mean"], m["distinct_correct_n_problems"]) == (1.5, 2)
    assert m["distinct_correct_subset"] == "solved problems (n_solutions unknown)", (
        "the output must record which problems were averaged"
    )
    assert m["per_problem"]["distinct_eligible"] == [True, True, False]
    assert m["per_problem"]["distinct_rule"] == [None, None, None], "no rule: eligibility is decided by who solved it"
    assert m["distinct_correct_all_mean"] == pytest.approx(1.0), "the unsolved problem counts 0 over all problems"


def test_pass_at_64_appears_only_with_64_samples(tokenizer):
    rows = 64
    branches = Branches(
        prompt_index=torch.zeros(rows, dtype=torch.long),
        sample_index=torch.arange(rows),
        tokens=torch.tensor([[VOCAB["3"], 3, VOCAB["4"], 1]] * 2 + [[2, 1, 0, 0]] * 62),
        mask=torch.tensor([[1, 1, 1, 1]] * 2 + [[1, 1, 0, 0]] * 62, dtype=torch.bool),
        logprobs=torch.zeros(rows, 4),
        entropy=torch.ones(rows, 4),
        finish_reason=["eos"] * rows,
        prompt_tokens=[[VOCAB["7"]]],
    )
    scored = score_branches(branches, ["7"], SumTask(), tokenizer)
    m = diversity_metrics(branches, scored, ["7"], SumTask(), n_boot=20)
    assert m["pass_at_1"] == pytest.approx(2 / 64) and m["pass_at_64"] == 1.0
    assert list(m["pass_at_k"]) == ["1", "2", "4", "8", "16", "32", "64"]
    assert m["pass_at_64_ci"] == [1.0, 1.0]


def test_clear_errors_for_empty_mismatched_and_too_large_k(tokenizer):
    branches, task = hand_branches(), SumTask()
    scored = score_branches(branches, PROMPTS, task, tokenizer)
    with pytest.raises(ValueError, match="prompts is empty"):
        score_branches(branches, [], task, tokenizer)
    with pytest.raises(ValueError, match="not a positive multiple of 5 prompts"):
        diversity_metrics(branches, scored, PROMPTS + ["3", "4"], task)
    with pytest.raises(ValueError, match="prompt-major"):
        score_branches(branches, ["7", "1"], task, tokenizer)  # 12 rows read as 6 samples of 2
    with pytest.raises(ValueError, match=r"k=8 > n=4 samples per problem; sample more or lower k"):
        diversity_metrics(branches, scored, PROMPTS, task, ks=[1, 8])

    class BadRoles(SumTask):
        def token_roles(self, tokens):
            return ["planning"]

    with pytest.raises(ValueError, match="token_roles"):
        score_branches(branches, PROMPTS, BadRoles(), tokenizer)

    class NoKey(SumTask):
        def canonical(self, prompt, completion):
            return None

    with pytest.raises(ValueError, match="canonical returned None"):
        score_branches(branches, PROMPTS, NoKey(), tokenizer)


def test_evaluate_passes_cfg_to_sampler_and_metrics(tokenizer, monkeypatch):
    calls = []

    def fake_sample(model, tok, prompts, cfg, intervention=None):
        calls.append((list(prompts), cfg, intervention))
        return hand_branches()

    monkeypatch.setattr("probe.metrics.evaluate.sample_branches", fake_sample)
    cfg = SamplerConfig(n=4, max_new_tokens=4, temperature=0.6, seed=5)
    with pytest.raises(ValueError, match=r"k=8 > n=4 samples per problem; sample more or lower k"):
        evaluate(None, tokenizer, PROMPTS, SumTask(), cfg, ks=[8])
    assert not calls, "a bad k must fail before any sampling time is spent"
    with pytest.raises(ValueError, match="prompts is empty"):
        evaluate(None, tokenizer, [], SumTask(), cfg)
    m, branches, scored = evaluate(None, tokenizer, PROMPTS, SumTask(), cfg, n_boot=20)
    assert calls == [(PROMPTS, cfg, None)] and isinstance(scored, Scored)
    assert (m["temperature"], m["seed"], m["pass_at_1"]) == (0.6, 5, pytest.approx(5 / 12))
    hook = object()
    evaluate(None, tokenizer, PROMPTS, SumTask(), cfg, intervention=hook, n_boot=20)
    assert calls[-1][2] is hook, "a steering intervention must reach the sampler"


def test_evaluate_end_to_end_with_the_real_sampler(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    cfg = SamplerConfig(n=8, max_new_tokens=5, temperature=1.0, seed=3, device="cpu")
    m, branches, scored = evaluate(model, tokenizer, PROMPTS, SumTask(), cfg, n_boot=20)
    assert m["pass_at_1"] == pytest.approx(scored.correct.double().mean().item())
    assert m["fraction_finished_eos"] == branches.finish_reason.count("eos") / 24
    # oracle from the raw tokens: truncated = no eos among a row's real tokens, the whole budget used
    no_eos = [VOCAB["<eos>"] not in branches.tokens[r][branches.mask[r]].tolist() for r in range(24)]
    assert m["truncated_share"] == sum(no_eos) / 24
    assert all(branches.mask[r].all() for r in range(24) if no_eos[r]), "a truncated row ran to max_new_tokens"
    assert 0 < sum(no_eos) < 24, "vacuous: the random model must both finish and run out of tokens here"
    for r in range(24):  # the completion is the text of the real tokens before eos
        ids = branches.tokens[r][branches.mask[r]].tolist()
        ids = ids[:-1] if branches.finish_reason[r] == "eos" else ids
        assert scored.completions[r] == tokenizer.decode(ids, skip_special_tokens=True)
        assert VOCAB["<eos>"] not in ids, "the sampler's eos must end a row, not sit inside one"
    assert ((scored.roles >= 0) == branches.mask).all(), (
        "every real token, and only those, has a role"
    )


def test_plot_pass_at_k_writes_a_png_with_two_curves_and_the_crossover(tmp_path):
    import matplotlib.image

    def metrics(curve):
        return {
            "pass_at_k": {str(k): v for k, v in curve.items()},
            "pass_at_k_ci": {
                str(k): [max(v - 0.05, 0), min(v + 0.05, 1)] for k, v in curve.items()
            },
        }

    rl = metrics({1: 0.5, 2: 0.6, 4: 0.65, 8: 0.7, 16: 0.72})
    base = metrics({1: 0.3, 2: 0.45, 4: 0.6, 8: 0.7, 16: 0.8})
    path = tmp_path / "figs" / "pass_at_k.png"
    fig = plot_pass_at_k({"rl": rl, "base": base}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the file must be a PNG"
    assert [p.name for p in path.parent.iterdir()] == ["pass_at_k.png"], "no temp file left behind"
    ax = fig.axes[0]
    assert ax.get_legend_handles_labels()[1] == ["rl", "base"] and len(ax.collections) == 2
    assert ax.get_xscale() == "log"
    assert any("base overtakes rl" in t.get_text() and "k=8" in t.get_text() for t in ax.texts)
    image = torch.from_numpy(matplotlib.image.imread(path))[..., :3]  # (H, W, rgb) in [0, 1]
    for name, rgb in [("rl", (0.122, 0.467, 0.706)), ("base", (1.0, 0.498, 0.055))]:
        near = (image - torch.tensor(rgb)).abs().amax(-1) < 0.02
        assert near.sum() > 100, f"the {name} curve is not drawn in the PNG"
    with pytest.raises(ValueError, match="no curves"):
        plot_pass_at_k({}, path)

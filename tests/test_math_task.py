"""`--task math:FILE`: answers verified with math-verify, solution paths, token roles, the JSONL file's
errors, the chat template, the context check before sampling; the word-problem generator and its
character-level tokenizer."""

from __future__ import annotations

import json
import random

import pytest
import torch

from probe.tasks import load_task
from probe.tasks.math_file import MathRow, read_jsonl
from probe.tasks.math_task import (
    MathTask,
    _math_verify,
    canonical_key,
    equivalent,
    extract_answer,
    parse_spec,
    roles_by_rule,
    solution_steps,
)
from probe.tasks.wordproblems import WordProblems, paths

# (gold, completion, verdict): every answer form the module docstring promises, and the failures
TABLE = [
    ("17", "3*4=12, then 12+5=17. The answer is \\boxed{17}.", True),
    ("17", "so we get \\boxed{ 17 } apples", True),
    ("17", "The answer is 17 apples.", True),
    ("17", "The final answer is: $17$", True),
    ("17", "We have 12 and 5 more, 17 in all", True),  # last number
    ("17", "\\boxed{18}", False),
    ("17", "The answer is 71.", False),
    ("17", "I do not know.", False),  # no answer at all
    ("17", "", False),
    ("3/4", "The answer is \\boxed{\\frac{3}{4}}", True),
    ("\\frac{3}{4}", "so the answer is 0.75", True),
    ("0.5", "\\boxed{\\dfrac{1}{2}}", True),
    ("2/3", "\\boxed{0.6}", False),
    ("-5", "The temperature falls to \\boxed{-5} degrees", True),
    ("-5", "it is 10-15=-5", True),
    ("-5", "\\boxed{5}", False),
    ("1234", "\\boxed{1,234}", True),
    ("1,234", "The answer is 1234.", True),
    ("1234567", "in total 1,234,567 grains", True),
    ("1234", "\\boxed{1,235}", False),
    (12, "\\boxed{12}", True),  # a numeric answer in the file
]


@pytest.mark.parametrize("gold,completion,ok", TABLE)
def test_verify_against_a_table_of_completions(gold, completion, ok):
    task = MathTask([MathRow("q", str(gold), "0")])
    assert task.verify("q", completion) is ok, (gold, completion, extract_answer(completion))
    key = task.canonical("q", completion)
    assert (key is not None) is ok, "canonical is None exactly for wrong completions"


def test_the_integer_shortcut_gives_math_verifys_verdict():
    pairs = [("17", "17"), ("17", "18"), ("1,234", "1234"), ("-5", "-5"), ("-5", "5"), ("1234567", "1,234,567"),
             ("0", "-0"), ("+3", "3")]
    for gold, ans in pairs:
        assert equivalent(gold, ans) == _math_verify(gold, ans), (gold, ans)


def test_extract_answer_prefers_boxed_then_answer_is_then_last_number():
    assert extract_answer("The answer is 3. Actually \\boxed{4}") == "4"
    assert extract_answer("\\boxed{\\frac{1}{2}} and then 7") == "\\frac{1}{2}"
    assert extract_answer("7 then the answer is 5, not 6") == "5"
    assert extract_answer("first 3, then 4") == "4"
    assert extract_answer("no digits here") is None
    assert extract_answer("unbalanced \\boxed{12") == "12"  # falls back to the last number


def test_canonical_is_the_normalised_step_sequence():
    a = "We get 3*4=12, then 12+5=17. The answer is \\boxed{17}."
    b = "First 4 × 3 = 12 and 5 + 12 = 17, so \\boxed{17}"  # commutative order and spacing do not matter
    c = "We get 12+5=17 ... no: 3*4=12 then 12+5=17: \\boxed{17}"  # another sequence of stated steps
    assert solution_steps(a) == ("3*4=12", "5+12=17"), "operands of + and * sorted by value"
    assert canonical_key(a) == canonical_key(b)
    assert canonical_key(a) != canonical_key(c)
    assert solution_steps("10-3=7, 7-10=-3") == ("10-3=7", "7-10=-3")  # subtraction keeps its order
    assert solution_steps("1,000+2.50=1,002.5") == ("2.5+1000=1002.5",)
    assert canonical_key("It is  Seventeen\n") == ("text", "it is seventeen"), "no steps: normalised text"


def test_token_roles_follow_the_stated_steps_on_char_and_byte_level_tokens():
    text = "We get 3*4=12, so \\boxed{12}"
    roles = roles_by_rule(list(text))
    want = {"3": "planning", "*": "planning", "4": "planning", "=": "execution"}
    got = {text[i]: r for i, r in enumerate(roles) if text[i] in want}
    assert got == want
    assert [r for c, r in zip(text, roles) if c in "12"][:2] == ["execution", "execution"], "the result is execution"
    assert roles[text.index("\\boxed")] == "other" and roles[0] == "other"
    # byte-level tokens (Qwen / Llama-3 style): 'Ġ' is a space; a token with a planning char is planning
    toks = ["We", "Ġget", "Ġ3", "*", "4", "=", "12", ",", "Ġso"]
    assert roles_by_rule(toks) == ["other", "other", "planning", "planning", "planning", "execution", "execution",
                                   "other", "other"]
    assert roles_by_rule(["▁7", "▁+", "▁8", "▁=", "▁15"]) == ["planning"] * 3 + ["execution"] * 2  # SentencePiece


def _write(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def test_jsonl_errors_name_the_line(tmp_path):
    good = json.dumps({"prompt": "1+1?", "answer": "2"})
    with pytest.raises(ValueError, match=r"line 2 has no usable 'answer'"):
        read_jsonl(_write(tmp_path, [good, json.dumps({"prompt": "2+2?"})]))
    with pytest.raises(ValueError, match=r"line 3 has no usable 'prompt'"):
        read_jsonl(_write(tmp_path, [good, "", json.dumps({"answer": "4"})]))
    with pytest.raises(ValueError, match=r"holds no rows \(empty file\)"):
        read_jsonl(_write(tmp_path, []))
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        read_jsonl(_write(tmp_path, [good, "{prompt: 2+2?}"]))
    with pytest.raises(ValueError, match=r"line 1 is a JSON list, not an object"):
        read_jsonl(_write(tmp_path, ["[1, 2]"]))
    with pytest.raises(ValueError, match=r"line 2 repeats the prompt of line 1"):
        read_jsonl(_write(tmp_path, [good, good]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(f"math:{tmp_path / 'nope.jsonl'}")
    rows = read_jsonl(_write(tmp_path, [good, json.dumps({"prompt": "3?", "answer": 3, "id": "x"})]))
    assert rows == [MathRow("1+1?", "2", "0"), MathRow("3?", "3", "x")]


def test_spec_options_and_their_errors(tmp_path):
    assert parse_spec("math:a.jsonl,train=b.jsonl,chat,max_new_tokens=64").__dict__ == {
        "path": "a.jsonl", "train": "b.jsonl", "chat": True, "max_new_tokens": 64}
    for bad in ("math:", "math:a.jsonl,foo", "math:a.jsonl,max_new_tokens=0", "math:a.jsonl,train="):
        with pytest.raises(ValueError, match="math:"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="unknown; allowed"):
        load_task("gsm8k")


def test_training_prompts_come_from_the_train_file_or_the_selection_half(tmp_path):
    held = _write(tmp_path, [json.dumps({"prompt": f"h{i}", "answer": i}) for i in range(6)])
    train = _write(tmp_path, [json.dumps({"prompt": f"t{i}", "answer": i}) for i in range(4)], "t.jsonl")
    alone = load_task(f"math:{held}")
    assert set(alone.train_prompts(0, 9)) == {"h0", "h2", "h4"}, "without train=, never the test half (odd rows)"
    both = load_task(f"math:{held},train={train}")
    stream = both.train_prompts(3, 8)
    assert set(stream) == {f"t{i}" for i in range(4)} and stream[:4] != ["t0", "t1", "t2", "t3"]
    assert both.train_prompts(3, 3, start=5) == stream[5:8], "a stream resumed at `start` continues exactly"
    assert both.verify("t2", "\\boxed{2}") and both.n_solutions("h1") is None
    with pytest.raises(ValueError, match="not in"):
        both.verify("unknown prompt", "1")


def test_check_tokenizer_refuses_text_outside_the_vocabulary_and_wraps_chat_prompts(tmp_path):
    from experiments.training.tokenizer import build_text_tokenizer, build_tokenizer

    held = _write(tmp_path, [json.dumps({"prompt": "Ann has 3 pens.", "answer": 3})])
    with pytest.raises(ValueError, match=r"cannot write row 0 .*outside its vocabulary"):
        load_task(f"math:{held}").check_tokenizer(build_tokenizer())  # the Countdown tokenizer has no letters
    tok = build_text_tokenizer(64)
    task = load_task(f"math:{held}")
    task.check_tokenizer(tok)
    assert task.max_new_tokens == 64 - len("Ann has 3 pens."), "the default budget is capped by the context"
    assert load_task(f"math:{held},max_new_tokens=500").max_new_tokens == 500, "an explicit budget is kept"
    chat = load_task(f"math:{held},chat")
    with pytest.raises(ValueError, match="has none"):
        chat.check_tokenizer(tok)
    with pytest.raises(ValueError, match="call task.check_tokenizer"):
        chat.heldout_prompts()
    tok.chat_template = "{% for m in messages %}U:{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    chat.check_tokenizer(tok)
    assert chat.heldout_prompts() == ["U:Ann has 3 pens.\nA:"]
    assert chat.verify("U:Ann has 3 pens.\nA:", "\\boxed{3}") and chat.verify("Ann has 3 pens.", "3")


def test_a_prompt_plus_budget_beyond_the_context_is_refused_before_sampling(tiny_lm, tiny_tokenizer):
    from probe.models.budget import ContextLengthError, check_context
    from probe.sampling.sampler import SamplerConfig, sample_branches

    model = tiny_lm("qwen2")  # 128 positions
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ContextLengthError, match=r"plus max_new_tokens=200 .* context of 128.*<= 125"):
        sample_branches(model, tiny_tokenizer, ["w3 w4 w5"], SamplerConfig(max_new_tokens=200))
    assert not calls, "nothing may run before the check"
    check_context(model, tiny_tokenizer, ["w3 w4 w5"], 125)  # exactly full: allowed


def test_a_progress_bar_counts_decoding_steps(tiny_lm, tiny_tokenizer, capsys):
    from probe.sampling.sampler import SamplerConfig, sample_branches

    sample_branches(tiny_lm("qwen2"), tiny_tokenizer, ["w3 w4"], SamplerConfig(n=4, max_new_tokens=6, batch_size=2),
                    progress=True)
    assert "sampling" in capsys.readouterr().err


def test_memory_budget_caps_batches_without_changing_samples(tiny_lm, tiny_tokenizer, monkeypatch):
    from probe.models import budget
    from probe.sampling.sampler import SamplerConfig, sample_branches

    model, cfg = tiny_lm("qwen2"), SamplerConfig(n=6, max_new_tokens=8, batch_size=64, seed=3)
    full = sample_branches(model, tiny_tokenizer, ["w3 w4", "w5"], cfg)
    assert budget.sampling_rows(model, 10, budget=10**12) > 64 > budget.sampling_rows(model, 10, budget=10**5)
    monkeypatch.setenv("FORKSIGHT_MEMORY_GB", str(2e5 / 2**30))  # a handful of rows per batch
    small = sample_branches(model, tiny_tokenizer, ["w3 w4", "w5"], cfg)
    assert torch.equal(full.tokens, small.tokens), "rows must not depend on the batch they ran in"


# --- the word-problem generator and its tokenizer -------------------------------------------------
def test_every_enumerated_path_is_a_correct_distinct_solution():
    wp = WordProblems()
    for p in wp.heldout()[:60]:
        table = paths(p.terms)
        assert table, p
        keys = set()
        for key, steps in table.items():
            text = "We get " + ", then ".join(f"{a}{op}{b}={c}" for a, op, b, c in steps) + f". \\boxed{{{p.value}}}"
            assert wp.verify(p.prompt, text) and wp.canonical(p.prompt, text) == ("steps", key)
            assert all(c > 0 for *_, c in steps), "intermediate values stay positive"
            keys.add(key)
        assert len(keys) == len(table)
    rng = random.Random(0)
    for p in wp.heldout()[:60]:
        ans = wp.sample_solution(p, rng)
        assert wp.verify(p.prompt, ans) and wp.canonical(p.prompt, ans)[1] in paths(p.terms)
    assert sum(len(paths(p.terms)) >= 2 for p in wp.heldout()) >= 0.8 * len(wp.heldout()), \
        "most problems must have several orders of computation"


def test_training_stream_never_meets_the_heldout_split_and_resumes_exactly():
    wp = WordProblems()
    held = {p.prompt for p in wp.heldout()}
    train = wp.train_prompts(0, 300)
    assert not held & set(train)
    assert wp.train_prompts(0, 5, start=100) == train[100:105]
    first = [p for _, (_, p, _) in zip(range(20), wp.train_stream(0))]
    assert [p.prompt for p in first] == train[:20]
    assert all(wp.verify(p.prompt, str(p.value)) for p in first), "generated prompts are verifiable"
    pairs = list(zip(range(3), wp.sft_stream(0)))
    assert all(wp.verify(p, a) for _, (p, a) in pairs)


@pytest.mark.slow
def test_text_tokenizer_round_trips_through_autotokenizer_tl_and_nnsight(tmp_path):
    from transformers import AutoTokenizer

    from experiments.training.model import OrganismConfig, build_organism, save_checkpoint
    from experiments.training.tokenizer import build_text_tokenizer
    from probe.models.backends import load_hooked_transformer, load_nnsight

    wp = WordProblems()
    p = wp.heldout()[0]
    text = p.prompt + wp.sample_solution(p, random.Random(0))
    tok = build_text_tokenizer(256)
    ids = tok(text).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text, "one token per character, decoding back to the text"
    model, tok = build_organism(OrganismConfig(depth=1, max_positions=256), tokenizer=tok)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    assert auto(text).input_ids == ids and auto.decode(ids) == text, "AutoTokenizer must not swap the tokenizer"
    tl = load_hooked_transformer(tmp_path / "ckpt", device="cpu")
    assert tl.to_tokens(text, prepend_bos=False)[0].tolist() == ids, "TransformerLens re-tokenizes differently"
    assert load_nnsight(tmp_path / "ckpt", device="cpu").tokenizer(text).input_ids == ids
    wp.check_tokenizer(auto)


@pytest.mark.slow
def test_sft_and_grpo_train_a_word_problem_organism(tmp_path):
    """The trainers take `--task wordproblems`: a text tokenizer with the context asked for, the task's
    own streams, rewards verified by math-verify, per-role entropies in the GRPO log."""
    from experiments.training.grpo import GRPOConfig, train_grpo
    from experiments.training.grpo_loss import LossConfig
    from experiments.training.sft import SFTConfig, train_sft
    from probe.models.checkpoint import load_causal_lm

    train_sft(SFTConfig(out=str(tmp_path / "base"), task="wordproblems", depth=1, max_positions=192, steps=3,
                        batch_size=4, warmup=1, eval_samples=0, device="cpu"))
    model, tok = load_causal_lm(tmp_path / "base")
    assert model.config.max_position_embeddings == 192 and tok.model_max_length == 192
    WordProblems().check_tokenizer(tok)
    train_grpo(GRPOConfig(base=str(tmp_path / "base"), task="wordproblems", out=str(tmp_path / "rl"), steps=1,
                          prompts_per_step=2, group_size=2, mini_batches=1, eval_problems=2, eval_samples=1,
                          final_eval_samples=0, save_every=1, device="cpu"), LossConfig())
    log = [json.loads(x) for x in (tmp_path / "rl" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"reward_mean", "planning_entropy_mean", "execution_entropy_mean"} <= log[0].keys()


@pytest.mark.slow
def test_the_detector_keeps_a_seeded_subsample_when_its_memory_budget_is_small(organism_pair_dirs, tmp_path):
    from experiments.study.probe_stage import ProbeConfig, run_probe

    kw = dict(base=str(organism_pair_dirs / "base"), rl=str(organism_pair_dirs / "rl"), n_problems=4, samples=3,
              device="cpu", n_examples=2, backend="nnsight")
    full = run_probe(ProbeConfig(out=str(tmp_path / "full"), **kw))
    small = run_probe(ProbeConfig(out=str(tmp_path / "small"), detector_memory_gb=2e-5, **kw))  # ~21 KB
    assert full["on_base_samples"] == small["on_base_samples"], "the subsample touches only the detector's data"
    used = lambda m: m["detector"]["n_train"] + m["detector"]["n_test"]  # noqa: E731
    assert used(full) == sum(full[s]["n_answer_tokens"] for s in ("on_base_samples", "on_rl_samples"))
    assert 0 < used(small) < used(full) / 2, "the detector must train on a subsample within the budget"


def test_easy_word_problems_are_one_or_two_steps_and_disjoint_from_their_heldout():
    from probe.tasks.wordproblems import WordProblems, WordProblemsConfig, paths

    task = WordProblems(WordProblemsConfig(easy=True, heldout_size=64))
    held = task.heldout()
    steps = {len(next(iter(paths(p.terms)))) for p in held}
    assert steps <= {1, 2} and 1 in steps and 2 in steps, f"easy problems take one or two steps, got {steps}"
    assert all(p.value > 0 and paths(p.terms) for p in held)
    train = task.train_prompts(seed=1, count=64)
    assert not set(train) & {p.prompt for p in held}, "the training stream never meets the held-out split"
    assert WordProblems().heldout()[0].prompt != held[0].prompt, "the organism's task is unchanged by the option"

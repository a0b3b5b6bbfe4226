"""`forksight run --task math:FILE`: pre-flight errors, portable outputs, and the quick study on the
shipped word-problem organism (every stage, every claim computed)."""

from __future__ import annotations

import json
import re

import pytest

from experiments.cli import main
from experiments.paths import WORDPROBLEMS_DIR
from experiments.run_state import REPO_DIR, portable
from experiments.study.claims import STATUSES

HELDOUT = WORDPROBLEMS_DIR / "heldout.jsonl"


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    """A random depth-1 word-problem organism (64 positions) saved twice: a compatible pair."""
    from experiments.training.model import OrganismConfig, build_organism, save_checkpoint
    from experiments.training.tokenizer import build_text_tokenizer

    root = tmp_path_factory.mktemp("pair")
    for name in ("base", "rl"):
        model, tok = build_organism(OrganismConfig(depth=1, max_positions=128), tokenizer=build_text_tokenizer(128))
        save_checkpoint(model, tok, root / name)
    return root / "base", root / "rl"


def _run(capsys, *args) -> tuple[int, str]:
    rc = main(["run", *map(str, args)])
    return rc, capsys.readouterr().err


def test_run_refuses_a_bad_task_file_or_budget_before_any_work(tmp_path, text_pair, capsys):
    base, rl = text_pair
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Ann has 3 pens.", "answer": 3}) + "\n" + json.dumps({"prompt": "x?"}) + "\n")
    rc, err = _run(capsys, "--task", f"math:{bad}", "--base", base, "--rl", rl, "--out", tmp_path / "a")
    assert rc == 2 and "line 2 has no usable 'answer'" in err
    rc, err = _run(capsys, "--task", f"math:{HELDOUT},max_new_tokens=500", "--base", base, "--rl", rl,
                   "--out", tmp_path / "b")
    assert rc == 2 and "longer than the model's context of 128" in err and "max_new_tokens" in err
    assert not (tmp_path / "b" / "probe").exists(), "nothing may be sampled before the check"
    rc, err = _run(capsys, "--task", f"math:{HELDOUT}", "--out", tmp_path / "c")
    assert rc == 2 and "needs the pair that speaks it" in err


def test_portable_makes_paths_relative_to_the_run_or_the_repository(tmp_path):
    run = tmp_path / "run"
    obj = {"out": str(run), "fig": str(run / "figures" / "a.png"), "base": str(REPO_DIR / "experiments" / "x"),
           "other": "/models/qwen", "task": f"math:{REPO_DIR / 'p.jsonl'},train=/data/t.jsonl,chat",
           "why": f"no --train-log given and {run / 'rl' / 'log.jsonl'} does not exist", "n": [1, "a/b", "k"],
           "url": "https://example.org/a/b"}
    got = portable(obj, run)
    assert got["out"] == "." and got["fig"] == "figures/a.png" and got["base"] == "experiments/x"
    assert got["task"] == "math:p.jsonl,train=" + got["task"].split("train=")[1].split(",")[0] + ",chat"
    assert not got["other"].startswith("/") and got["other"].endswith("models/qwen")
    assert got["why"] == "no --train-log given and rl/log.jsonl does not exist"
    assert got["n"] == [1, "a/b", "k"] and got["url"] == "https://example.org/a/b", "non-paths are left alone"
    assert not re.search(r'"/[^"]', json.dumps(got)), "no absolute path survives"


def test_shipped_study_results_hold_no_absolute_path():
    out = REPO_DIR / "experiments" / "results" / "study"
    for f in (out / "results.json", out / "report.md", *out.rglob("metrics.json")):
        assert str(REPO_DIR) not in f.read_text(), f"{f} names an absolute path"


def test_no_shipped_output_records_a_machine_path():
    """Every shipped result and organism file (text, and the metadata of safetensors files) is free
    of absolute paths, whichever machine produced it (not only this clone's root)."""
    from safetensors import safe_open

    from experiments.run_state import _ABS_IN_TEXT

    checked = 0
    for root in (REPO_DIR / "experiments" / "results", REPO_DIR / "experiments" / "organisms"):
        for f in root.rglob("*"):
            if not f.is_file() or {"state", "checkpoints"} & set(f.relative_to(root).parts):
                continue
            if f.suffix in (".json", ".jsonl", ".md", ".csv"):
                text = f.read_text()
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as h:
                    text = json.dumps(h.metadata() or {})
            else:
                continue
            hit = _ABS_IN_TEXT.search(text)
            assert hit is None, f"{f.relative_to(REPO_DIR)} records the machine path {hit.group(0)!r}"
            checked += 1
    assert checked > 100


def test_shipped_word_problem_files_are_the_generators_split():
    from probe.tasks.math_file import read_jsonl
    from probe.tasks.wordproblems import WordProblems

    wp = WordProblems()
    assert read_jsonl(HELDOUT) == wp.heldout_rows(), "heldout.jsonl must be WordProblems().heldout_rows()"
    train = read_jsonl(WORDPROBLEMS_DIR / "train.jsonl")
    assert not {r.prompt for r in train} & {r.prompt for r in wp.rows}, "training rows never meet the held-out split"
    for name in ("base", "rl-none"):
        m = json.loads((WORDPROBLEMS_DIR / name / "metrics.json").read_text())
        assert str(REPO_DIR) not in json.dumps(m), f"{name}/metrics.json names an absolute path"


@pytest.mark.slow
def test_quick_run_on_the_word_problem_organism_computes_every_claim(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--quick", "--task", f"math:{HELDOUT}", "--base", str(WORDPROBLEMS_DIR / "base"),
               "--rl", str(WORDPROBLEMS_DIR / "rl-none"), "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    res = json.loads((out / "results.json").read_text())
    claims = {c["id"]: c for c in res["claims"]}
    assert {"C1", "C2", "C3", "C4", "C5"} <= set(claims)
    for c in claims.values():
        assert c["status"] in STATUSES and c["reason"], c
    assert claims["C3"]["effect"]["value"] is not None, "the math task's roles make C3 computable"
    assert res["task"].startswith("math:") and not res["task"].startswith("math:/")
    report = (out / "report.md").read_text()
    assert "Task: `math:" in report
    for cid in ("C1", "C2", "C3", "C4", "C5"):
        assert re.search(rf"^\| {cid}: .*\| \*\*(holds|fails|inconclusive)\*\* \|", report, re.M), cid
    for f in (out / "results.json", out / "report.md", *out.rglob("metrics.json")):
        text = f.read_text()
        assert str(tmp_path) not in text and str(REPO_DIR) not in text, f"{f} names an absolute path"
    probe = json.loads((out / "probe" / "metrics.json").read_text())
    assert probe["on_base_samples"]["models"]["base"]["planning_entropy_mean"] is not None

"""The environment record (`probe.environment`): versions from the installed distributions, the git
commit only from a checkout of forksight itself, the record in every safetensors header and in the
report, and `experiments.study.annotate` stamping old files once, marked as after the fact, without
touching their numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import probe.environment as E
from experiments.study.annotate import annotate
from probe.models.checkpoint import save_safetensors_atomic


@pytest.fixture
def fresh(monkeypatch):
    """`environment()` recollected (it is cached per process), restored afterwards."""
    E._collect.cache_clear()
    yield monkeypatch
    E._collect.cache_clear()


def test_versions_come_from_the_installed_distributions():
    env = E.environment()
    assert set(E.PACKAGES) | {"recorded", "python", "git_commit", "git_dirty", "platform", "command"} == set(env)
    assert env["recorded"] == "written" and env["transformers"] == metadata.version("transformers")
    assert env["sae_lens"] == metadata.version("sae-lens") and env["torch"] == torch.__version__
    assert E._version("no-such-distribution-forksight") is None, "a package that is not installed is None"
    env["torch"] = "changed"
    assert E.environment()["torch"] == torch.__version__, "callers get a copy, never the cached record"
    assert json.loads(json.dumps(env)) == env, "the record is JSON as it is"


@pytest.mark.skipif(shutil.which("git") is None or not (E.REPO_DIR / ".git").exists(), reason="needs a git checkout")
def test_the_commit_is_the_checkout_head():
    head = subprocess.run(["git", "-C", str(E.REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    env = E.environment()
    assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)
    assert f"git {head[:12]}" in E.describe(env)


def test_outside_a_checkout_there_is_no_commit(fresh, tmp_path):
    fresh.setattr(E, "REPO_DIR", tmp_path / "site-packages")  # an installed copy: no .git beside the package
    env = E.environment()
    assert env["git_commit"] is None and env["git_dirty"] is None
    assert "no git commit" in E.describe(env)


def test_missing_git_gives_no_commit(fresh, tmp_path):
    (tmp_path / ".git").mkdir()
    fresh.setattr(E, "REPO_DIR", tmp_path)
    fresh.setenv("PATH", str(tmp_path / "empty"))  # `git` cannot be found
    assert E.environment()["git_commit"] is None


def test_every_safetensors_header_records_it_unless_the_caller_brings_one(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3).T}  # a transposed view: written contiguous
    path = save_safetensors_atomic(tmp_path / "a.safetensors", t, {"format": "forksight.x", "meta": "{}"})
    assert E.recorded(path) == E.environment()
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "forksight.x" and torch.equal(f.get_tensor("w"), t["w"])
    own = E.annotated("stamped by a test")
    save_safetensors_atomic(tmp_path / "b.safetensors", t, {"format": "forksight.x", E.KEY: json.dumps(own)})
    assert E.recorded(tmp_path / "b.safetensors") == own, "a header's own record must not be replaced"
    save_file(t | {"w": t["w"].contiguous()}, str(tmp_path / "old.safetensors"), metadata={"format": "pt"})
    assert E.recorded(tmp_path / "old.safetensors") is None
    with pytest.raises(ValueError, match="only .json and .safetensors"):
        E.recorded(tmp_path / "x.csv")


def test_describe_says_what_it_is_and_when_it_was_recorded():
    env = {**E.environment(), "git_commit": "0123456789abcdef", "git_dirty": True, "gguf": None}
    line = E.describe(env)
    assert f"transformers {env['transformers']}" in line and f"sae-lens {env['sae_lens']}" in line
    assert "gguf" not in line, "a package that is not installed is left out"
    assert line.endswith("git 0123456789ab with uncommitted changes")
    late = E.describe({**env, "recorded": "annotated", "note": "stamped in a test"})
    assert late.startswith("annotated after the fact") and late.endswith("stamped in a test")
    assert E.describe(None).startswith("not recorded")
    with pytest.raises(ValueError, match="say when and why"):
        E.annotated(" ")


def test_the_report_prints_the_environment(tmp_path):
    from experiments.study.report import write_report

    env = E.environment()
    results = {"question": "q?", "pair": {"base": "b", "rl": "r", "variants": []}, "claims": [], "headline": {},
               "stages": {}, "environment": env, "sae": {"hook_name": "blocks.0.hook_resid_post", "l0": 1.0,
                                                           "fvu": 0.1, "dead_fraction": 0.0, "ce_loss_increase": 0.0,
                                                           "n_pruned_3x": 0, "top_pruned": []}}
    text = write_report(results, tmp_path / "report.md").read_text()
    assert "## Environment" in text and E.describe(env) in text
    del results["environment"]
    assert "not recorded" in write_report(results, tmp_path / "old.md").read_text()


def test_annotate_stamps_old_results_once_and_leaves_numbers_state_and_hf_weights_alone(tmp_path):
    root = tmp_path / "results"
    (root / "study" / "state").mkdir(parents=True)
    old = {"pass_at_1": 0.1234567891234, "nested": {"b": 1, "a": [1, 2]}}
    for rel in ("study/results.json", "study/metrics.json", "study/state/metrics.json"):
        (root / rel).write_text(json.dumps(old, indent=2) + "\n")
    (root / "study" / "sweep.json").write_text("{}\n")  # not a results file
    w = {"layer0.w": torch.randn(4)}
    save_file(w, str(root / "study" / "det.safetensors"), metadata={"format": "forksight.fork_detector", "meta": "{}"})
    save_file(w, str(root / "study" / "model.safetensors"), metadata={"format": "pt"})
    new = root / "study" / "new.safetensors"
    save_safetensors_atomic(new, w, {"format": "forksight.steering_vector"})
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert annotate([root], dry_run=True)["annotated"] and \
        {p: p.read_bytes() for p in before} == before, "a dry run changes nothing"
    done = annotate([root], note="stamped in a test")
    names = sorted(p.rsplit("/", 1)[-1] for p in done["annotated"])
    assert names == ["det.safetensors", "metrics.json", "results.json"], done
    assert [p.rsplit("/", 1)[-1] for p in done["recorded"]] == ["new.safetensors"]
    got = json.loads((root / "study" / "results.json").read_text())
    assert list(got) == [*old, "environment"] and {k: got[k] for k in old} == old, "numbers and order kept"
    assert got["environment"]["recorded"] == "annotated" and got["environment"]["note"] == "stamped in a test"
    with safe_open(str(root / "study" / "det.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("layer0.w"), w["layer0.w"]) and f.metadata()["format"] == "forksight.fork_detector"
    assert E.recorded(root / "study" / "det.safetensors")["recorded"] == "annotated"
    for untouched in ("study/state/metrics.json", "study/sweep.json", "study/model.safetensors", "study/new.safetensors"):
        assert (root / untouched).read_bytes() == before[root / untouched], f"{untouched} must not be rewritten"
    after = {p: p.read_bytes() for p in before}
    assert annotate([root])["annotated"] == [] and {p: p.read_bytes() for p in before} == after, \
        "a second run changes nothing: a recorded environment is never overwritten"
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        annotate([tmp_path / "missing"])


def test_every_shipped_result_records_its_environment():
    """Written (regenerated) or annotated after the fact, each shipped result says which versions stand
    behind it: a file added without a record fails here."""
    from experiments.paths import EXPERIMENTS_DIR
    from experiments.study.annotate import result_files
    from probe.environment import recorded

    files = [f for root in ("results", "organisms", "real") for f in result_files(EXPERIMENTS_DIR / root)]
    assert len(files) > 30, f"vacuous: only {len(files)} shipped result files found"
    missing = [str(f.relative_to(EXPERIMENTS_DIR)) for f in files if recorded(f) is None]
    assert not missing, f"shipped results without an environment record: {missing[:10]}"


def test_the_record_names_the_command(monkeypatch):
    monkeypatch.setattr(E.sys, "argv", ["/venv/bin/forksight", "eval", "--task", "math:a b.jsonl,chat"])
    assert E.environment()["command"] == "forksight eval --task 'math:a b.jsonl,chat'"
    monkeypatch.setattr(E.sys, "argv", ["/home/me/run.py", "--seed", "3", "--out", str(Path.cwd() / "runs" / "a"),
                                        "/elsewhere/x.json"])
    assert E.environment()["command"] == "run.py --seed 3 --out runs/a x.json", "no machine path in a record"
    assert "command" not in E.annotated("annotated after the fact"), "the annotating process did not write the file"

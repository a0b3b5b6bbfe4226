"""`forksight run`: the end-to-end study, its claims, resumption and pre-flight errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from nbrun import execute_notebook

from experiments.cli import main
from experiments.study import claims as C
from experiments.study import run as R
from experiments.study.report import pooled_references


# --- claims: each rule can come out either way on hand-made data ---------------------------------
def _metrics(n_correct, distinct, n=8, eligible=None):
    k = len(n_correct)
    eligible = [True] * k if eligible is None else eligible
    curve = {str(kk): sum(1.0 - (1.0 if c == 0 else 0.0) for c in n_correct) / k for kk in (1, 2, 4, 8)}
    curve["1"] = sum(n_correct) / (n * k)
    return {"n_samples": n, "pass_at_1": curve["1"], "pass_at_k": curve,
            "distinct_correct_mean": sum(d for d, e in zip(distinct, eligible) if e) / max(1, sum(eligible)),
            "per_problem": {"n_correct": list(n_correct), "distinct_correct": list(distinct), "distinct_eligible": eligible}}


def test_claim_breadth_holds_when_rl_gains_pass1_and_loses_distinct_and_fails_when_reversed():
    base = _metrics([4] * 24, [3] * 24)
    rl = _metrics([7] * 20 + [0] * 4, [1] * 24)
    held = C.claim_breadth(base, rl)
    assert held.status == "holds", held.reason
    assert held.effect["value"] == pytest.approx(-2.0) and held.effect["ci"][1] < 0
    assert held.evidence["pass_at_1"]["gain"] == pytest.approx(rl["pass_at_1"] - base["pass_at_1"])
    reversed_ = C.claim_breadth(rl, base)  # the "RL" model now loses pass@1 and gains breadth
    assert reversed_.status == "fails"


def test_claim_breadth_refuses_models_evaluated_on_different_problems():
    with pytest.raises(ValueError, match="different problems"):
        C.claim_breadth(_metrics([1, 2], [1, 1]), _metrics([1, 2, 3], [1, 1, 1]))


def test_claim_roles_reads_the_log_and_tells_different_from_identical_trajectories(tmp_path):
    log = tmp_path / "log.jsonl"
    steps = range(40)
    log.write_text("\n".join(json.dumps({"step": s, "planning_entropy_mean": 0.3 * 0.97 ** s,
                                         "execution_entropy_mean": 0.01 * 1.01 ** s}) for s in steps))
    diff = C.claim_roles(str(log))
    assert diff.status == "holds" and diff.effect["value"] < 0
    assert diff.evidence["planning"]["log_change"] == pytest.approx(
        torch.tensor([0.3 * 0.97 ** s for s in range(36, 40)]).mean().log().item()
        - torch.tensor([0.3 * 0.97 ** s for s in range(4)]).mean().log().item())
    log.write_text("\n".join(json.dumps({"planning_entropy_mean": 0.3 * 0.97 ** s,
                                         "execution_entropy_mean": 0.01 * 0.97 ** s}) for s in steps))
    same = C.claim_roles(str(log))
    assert same.status == "fails" and abs(same.effect["value"]) < 1e-9
    log.write_text("\n".join(json.dumps({"planning_entropy_mean": 0.3 * 0.97 ** s,  # differ by ~5%: not "different"
                                         "execution_entropy_mean": 0.01 * 0.9685 ** s}) for s in steps))
    assert C.claim_roles(str(log)).status != "holds"
    assert C.claim_roles(None).status == "inconclusive"


def test_claim_law_status_follows_the_sign_of_a_and_r2():
    def law(a_ci, r2, r2_ci):
        return {"available": True, "a": sum(a_ci) / 2, "b": 1.0, "r2": r2, "ceiling": 0.5, "n_steps": 50,
                "bootstrap": {"a": a_ci, "b": [0.9, 1.1], "r2": r2_ci, "ceiling": [0.4, 0.6]}}
    assert C.claim_law(law([0.5, 1.0], 0.8, [0.7, 0.9])).status == "holds"
    assert C.claim_law(law([-1.0, -0.5], 0.8, [0.7, 0.9])).status == "fails"
    assert C.claim_law(law([-0.1, 1.0], 0.3, [0.1, 0.5])).status == "inconclusive"
    assert C.claim_law({"available": False, "reason": "no log"}).status == "inconclusive"


def _steer(best=None, patch=0.0, tol=0.03):
    return {"config": {"tolerance": tol}, "protocol": {"selection_seed": [0], "test_seeds": [1000]}, "best": best,
            "patching_upper_bound": {"restoration_distinct": patch}, "variants": {}, "goals": {}}


def _best(r, r_ci, x, x_ci, change=-0.01):
    return {"family": "learned", "spec": {"method": "m", "coef": 1.0}, "fraction": 1.0, "params": 512,
            "pass_at_1": 0.7, "pass_at_1_change": change, "restoration_distinct": r, "restoration_distinct_ci": r_ci,
            "frontier_restoration": r - x, "frontier_excess": x, "frontier_excess_ci": x_ci}


def test_claim_recovery_separates_elicitation_from_a_mixture():
    base, rl = _metrics([4] * 30, [4, 3] * 15), _metrics([6] * 30, [2, 1] * 15)
    det = {"best_layer": 2, "layers": {"2": {"auroc_test": 0.9}}, "token_baseline": {"auroc_test": 0.7}}
    above = C.claim_recovery(_steer(_best(0.6, [0.5, 0.7], 0.2, [0.1, 0.3])), base, rl, det)
    assert above.status == "holds" and above.effect["value"] == pytest.approx(0.2) and "beyond the mixture" in above.reason
    on = C.claim_recovery(_steer(_best(0.6, [0.5, 0.7], 0.0, [-0.1, 0.1])), base, rl, det)
    assert on.status == "inconclusive" and "on the mixture frontier" in on.reason, "matching a mixture is not elicitation"
    below = C.claim_recovery(_steer(_best(0.3, [0.2, 0.4], -0.3, [-0.4, -0.2])), base, rl, det)
    assert below.status == "fails" and "sampling the base part of the time" in below.reason
    weak = {"best_layer": 2, "layers": {"2": {"auroc_test": 0.6}}, "token_baseline": {"auroc_test": 0.7}}
    assert C.claim_recovery(_steer(_best(0.6, [0.5, 0.7], 0.2, [0.1, 0.3])), base, rl, weak).status == "inconclusive"
    assert C.claim_recovery(_steer(None), base, rl, det).status == "inconclusive"


def test_claim_recovery_without_a_breadth_gap_is_inconclusive():
    base, rl = _metrics([4] * 10, [2] * 10), _metrics([6] * 10, [3] * 10)  # RL is *broader* than the base
    det = {"best_layer": 0, "layers": {"0": {"auroc_test": 0.9}}, "token_baseline": {"auroc_test": 0.5}}
    c5 = C.claim_recovery(_steer(_best(0.6, [0.5, 0.7], 0.2, [0.1, 0.3])), base, rl, det)
    assert c5.status == "inconclusive" and "no breadth gap" in c5.reason


def test_claim_recovery_judges_the_gap_its_restoration_divides_by():
    base, rl = _metrics([4] * 30, [4, 3] * 15), _metrics([6] * 30, [2, 1] * 15)  # pooled rows: base broader
    det = {"best_layer": 2, "layers": {"2": {"auroc_test": 0.9}}, "token_baseline": {"auroc_test": 0.7}}
    neg = {**_best(0.6, [0.5, 0.7], 0.2, [0.1, 0.3]), "distinct_measure": "matched", "distinct_gap": -0.4,
           "distinct_gap_ci": [-0.6, -0.2]}  # per seed and matched, RL is broader: restoration points the other way
    c5 = C.claim_recovery(_steer(neg), base, rl, det)
    assert c5.status == "inconclusive" and "no breadth gap" in c5.reason and "matched" in c5.reason
    assert c5.evidence["distinct_gap_base_minus_rl"] == -0.4 and c5.evidence["distinct_gap_pooled"]["gap"] > 0
    pos = {**neg, "distinct_gap": 0.4, "distinct_gap_ci": [0.2, 0.6]}
    assert C.claim_recovery(_steer(pos), base, rl, det).status == "holds"
    old = C.claim_recovery(_steer(_best(0.6, [0.5, 0.7], 0.2, [0.1, 0.3])), base, rl, det)
    assert old.evidence["distinct_gap_source"] == "the pooled test-half base and RL rows" and not old.flags
    math = {k: {**m, "per_problem": {**m["per_problem"], "distinct_rule": [None] * 30,  # a math file, counts recorded
                                     "solution_counts": [[2, 1, 1]] * 30 if k == "base" else [[5, 1]] * 30}}
            for k, m in (("base", base), ("rl", rl))}
    stale = C.claim_recovery(_steer(_best(0.6, [0.5, 0.7], 0.2, [0.1, 0.3])), math["base"], math["rl"], det)
    assert stale.evidence["distinct_measure"] == "matched" and any("re-run the sweep" in f for f in stale.flags), \
        "a sweep written before matched counts restores a paired gap: flagged, not silently mixed"


# --- pre-flight ----------------------------------------------------------------------------------
def _tiny_other_model(path: Path) -> Path:
    """A tiny random Qwen2 with another width, saved with the organism's tokenizer (same vocab)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from experiments.paths import ORGANISMS_DIR

    tok = AutoTokenizer.from_pretrained(ORGANISMS_DIR / "base")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_incompatible_pair_is_a_clear_error_before_any_work(tmp_path, capsys):
    from experiments.paths import ORGANISMS_DIR

    other = _tiny_other_model(tmp_path / "other")
    out = tmp_path / "run"
    rc = main(["run", "--base", str(ORGANISMS_DIR / "base"), "--rl", str(other), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "d_model" in err and "n_layers" in err, err
    assert not out.exists(), "nothing may be written before the pair is known to be compatible"


def test_unwritable_out_and_half_a_pair_are_clear_errors(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["run", "--quick", "--out", str(blocker / "run")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["run", "--quick", "--base", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "both --base and --rl" in capsys.readouterr().err


def test_a_run_interrupted_in_its_first_stage_still_guards_its_configuration(tmp_path):
    out = tmp_path / "run"
    R.Run(R.RunConfig(out=str(out), quick=True, from_scratch=True))  # state is written before the first stage
    with pytest.raises(ValueError, match="another configuration.*quick"):
        R.preflight(R.RunConfig(out=str(out) + "/", from_scratch=True))
    R.preflight(R.RunConfig(out=str(out) + "/", quick=True, from_scratch=True))  # same run, trailing slash


def test_run_state_holds_portable_paths_and_a_moved_run_directory_still_resumes(tmp_path):
    import shutil
    from dataclasses import dataclass

    @dataclass
    class Stage:
        out: str
        base: str

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    run = R.Run(R.RunConfig(out=str(a), quick=True, from_scratch=True))
    run.mark("probe", 1.0, Stage(out=str(a / "probe"), base=str(R.ORGANISMS_DIR / "base")))
    text = (a / "run_state.json").read_text()
    assert str(tmp_path) not in text and str(R.ORGANISMS_DIR) not in text, text
    assert json.loads(text)["stages"]["probe"]["config"] == {"out": "probe", "base": "experiments/organisms/countdown/base"}
    shutil.copytree(a, b)  # the same run, found at another path (a clone elsewhere)
    moved = R.Run(R.RunConfig(out=str(b), quick=True, from_scratch=True))
    assert moved.done("probe", Stage(out=str(b / "probe"), base=str(R.ORGANISMS_DIR / "base")))
    assert not moved.done("probe", Stage(out=str(b / "other"), base=str(R.ORGANISMS_DIR / "base")))
    R.preflight(R.RunConfig(out=str(b), quick=True, from_scratch=True))  # its configuration still matches


def test_another_configuration_in_an_existing_out_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_state.json").write_text(json.dumps({"config": {**json.loads(json.dumps(vars(R.RunConfig(out=str(out))))),
                                                              "quick": False}, "stages": {}}))
    with pytest.raises(ValueError, match="another configuration.*quick"):
        R.preflight(R.RunConfig(out=str(out), quick=True))


def test_adding_a_variant_to_a_started_run_is_allowed_and_reruns_only_the_steer_stage(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Stage:
        out: str

    out = tmp_path / "run"
    run = R.Run(R.RunConfig(out=str(out), quick=True, from_scratch=True))
    for name in ("probe", "sae", "learn", "steer"):
        run.mark(name, 1.0, Stage(out=str(out / name)))
    later = R.RunConfig(out=str(out), quick=True, from_scratch=True, variants=("runs/rl-clip-cov",))
    R.preflight(later)  # a variant trained after the study started: allowed
    with pytest.raises(ValueError, match="another configuration.*seed.*only --variants may change"):
        R.preflight(R.RunConfig(out=str(out), quick=True, from_scratch=True, variants=("runs/rl-clip-cov",), seed=1))
    resumed = R.Run(later)
    assert all(resumed.done(n, Stage(out=str(out / n))) for n in ("probe", "sae", "learn")), \
        "stages that never read the variants are reused"
    assert "variants" in json.loads((out / "run_state.json").read_text())["config"], "the new variants are recorded"


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_run_writes_report_claims_and_figures_and_resumes_after_interruption(tmp_path, monkeypatch, capsys):
    import experiments.study.sweep as sweep_mod

    out = tmp_path / "study"
    real_sweep = sweep_mod.run_sweep

    def interrupted(cfg):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the steering stage

    monkeypatch.setattr(sweep_mod, "run_sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["run", "--quick", "--out", str(out)])
    state = json.loads((out / "run_state.json").read_text())
    assert set(state["stages"]) == {"probe", "sae", "learn"}, "finished stages are recorded, the interrupted one is not"
    assert not (out / "results.json").exists()
    probe_bytes = (out / "probe" / "metrics.json").read_bytes()
    sae_bytes = (out / "sae" / "diff" / "metrics.json").read_bytes()

    monkeypatch.setattr(sweep_mod, "run_sweep", real_sweep)
    import experiments.study.probe_stage as probe_mod

    monkeypatch.setattr(probe_mod, "run_probe", lambda cfg: pytest.fail("a finished stage must not run again"))
    capsys.readouterr()
    assert main(["run", "--quick", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["reused_stages"] == ["probe", "sae", "learn"] and set(line["claims"]) == {"C1", "C2", "C3", "C3b", "C4", "C5", "C6"}
    assert (out / "probe" / "metrics.json").read_bytes() == probe_bytes
    assert (out / "sae" / "diff" / "metrics.json").read_bytes() == sae_bytes

    res = json.loads((out / "results.json").read_text())
    assert res["schema_version"] == 2 and [c["id"] for c in res["claims"]] == ["C1", "C2", "C3", "C3b", "C4", "C5", "C6"]
    for c in res["claims"]:
        assert c["status"] in C.STATUSES and c["rule"] and c["reason"]
        assert set(c["effect"]) >= {"name", "value", "ci", "units"}
    by_id = {c["id"]: c for c in res["claims"]}
    # C4's numbers are the test half's base and RL rows, recomputed: the pass@1 gain equals RL minus base
    base, rl = pooled_references(out / "steer" / "sweep.json")
    gain = by_id["C4"]["evidence"]["pass_at_1"]["gain"]
    assert gain == pytest.approx(rl["pass_at_1"] - base["pass_at_1"])
    assert by_id["C5"]["evidence"]["protocol"].startswith("chosen on the selection half")
    assert by_id["C2"]["effect"]["ci"][0] <= by_id["C2"]["effect"]["value"] <= by_id["C2"]["effect"]["ci"][1]

    report = (out / "report.md").read_text()
    from probe.environment import describe, environment

    assert res["environment"] == environment() and describe(res["environment"]) in report, \
        "results.json records the versions that made it and the report prints them"
    assert json.loads((out / "steer" / "metrics.json").read_text())["environment"] == environment()
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"figures/pass_at_k.png", "probe/law_fit.png", "steer/patching_curve.png"} <= set(figs)
    assert all((out / f).is_file() and (out / f).stat().st_size > 0 for f in figs)
    for c in res["claims"]:  # the summary table row of each claim carries its computed status
        row = next(line for line in report.splitlines() if line.startswith(f"| {c['id']}:"))
        assert f"| **{c['status']}** |" in row


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    text = execute_notebook("quickstart.ipynb", tmp_path)
    assert all(f"C{i}" in text for i in range(1, 6))
    assert ("rl + best" in text) == (tmp_path / "study" / "steer" / "best.safetensors").is_file(), \
        "the notebook applies the selected intervention whenever the sweep saved one"
    assert "hooks left on the model: 0" in text
    assert (tmp_path / "study" / "results.json").is_file()


@pytest.mark.slow
def test_quick_from_scratch_trains_the_organisms_and_studies_them(tmp_path):
    out = tmp_path / "scratch"
    res = R.run_study(R.RunConfig(out=str(out), quick=True, from_scratch=True))
    org = out / "organisms"
    assert res["pair"] == {"base": str(org / "base"), "rl": str(org / "rl-none"), "variants": [str(org / "rl-clip-cov")]}
    for name in ("base", "rl-none", "rl-clip-cov"):
        assert (org / name / "model.safetensors").is_file()
    logs = [json.loads(x) for x in (org / "rl-none" / "train_log.jsonl").read_text().splitlines()]
    assert len(logs) == R.stage_configs(R.RunConfig(quick=True))["grpo"]["steps"]
    assert res["run"]["stages"]["organisms"]["done"] and [c["status"] in C.STATUSES for c in res["claims"]] == [True] * 7


def test_shipped_study_claims_follow_from_its_stage_outputs():
    """experiments/results/study (`forksight run` on the shipped pair): its claims recompute from its own files."""
    out = Path(__file__).resolve().parents[1] / "experiments" / "results" / "study"
    res = json.loads((out / "results.json").read_text())
    by_id = {c["id"]: c for c in res["claims"]}
    probe = json.loads((out / "probe" / "metrics.json").read_text())
    steer = json.loads((out / "steer" / "metrics.json").read_text())
    base, rl = pooled_references(out / "steer" / "sweep.json")
    from experiments.paths import ORGANISMS_DIR
    from experiments.study.claims_training import claim_phases, claim_regime

    cells = json.loads((out / "steer" / "sweep.json").read_text())["cells"]
    recomputed = [C.claim_law(probe["law"]), C.claim_forks(probe["on_base_samples"], probe["rho"]),
                  C.claim_breadth(base, rl), C.claim_recovery(steer, base, rl, probe["detector"]),
                  claim_phases(str(ORGANISMS_DIR / Path(res["pair"]["rl"]).name / "train_log.jsonl")),
                  claim_regime(cells, res["pair"]["variants"])[0]]
    for c in recomputed:
        assert c.status == by_id[c.id]["status"] and c.effect["value"] == pytest.approx(by_id[c.id]["effect"]["value"])
        assert c.effect["ci"] == pytest.approx(by_id[c.id]["effect"]["ci"])
    assert all((out / f).is_file() for f in res["figures"])


def test_the_report_writes_nested_evidence_readably(tmp_path):
    """Nested evidence (a cell's spec, lists of cells, pass@k curves over every k) reads as text, not Python reprs."""
    from experiments.paths import RESULTS_DIR
    from experiments.study.report import SERIES_SHOWN, _evidence_lines, write_report

    series = [0.5 + i / 100 for i in range(SERIES_SHOWN + 1)]
    lines = _evidence_lines({"goal": {
        "cell": {"family": "learned", "spec": {"method": "mode8", "layers": [10, 19]}, "fraction": 0.25},
        "curve": series, "gappy": [None, *series], "met": [True] * (SERIES_SHOWN + 1), "ci": [0.1, None],
        "picks": [{"a": 1}, {"a": 2}], "short": [1, 2]}})
    assert lines[1] == "  - cell: family learned, spec method=mode8 layers=10+19, fraction 0.250"
    assert lines[2] == f"  - curve: ({SERIES_SHOWN + 1} values: 0.500 ... {series[-1]:.3f})", "a long series: length and ends"
    assert lines[3].startswith(f"  - gappy: ({SERIES_SHOWN + 2} values: n/a ..."), "a gap does not stop the summary"
    assert "False" not in lines[4] and lines[4].count("True") == SERIES_SHOWN + 1, "booleans are not a numeric series"
    assert lines[5:] == ["  - ci: [0.100, n/a]", "  - picks: a 1; a 2", "  - short: [1, 2]"]

    results = json.loads((RESULTS_DIR / "study" / "results.json").read_text())
    text = write_report(results, tmp_path / "report.md").read_text()
    assert not re.search(r"[{\[]'|: \{", text), "no dict repr in the shipped study's report"
    dom = next(c for c in results["claims"] if c["id"] == "C5")["evidence"]["goal"]["pass_at_k_dominance"]
    assert f"worst_k {dom['worst_k']}" in text, "the numbers a reader needs stay in full"

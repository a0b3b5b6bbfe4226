"""docs/real-pair.md's numbers are the shipped measurements: the token-budget table is
experiments/results/real-budget/metrics.json, the training tables are the runs' train_log.jsonl."""

from __future__ import annotations

import pytest

from probe.metrics.breadth import TRUNCATION_LIMIT


def test_the_real_pairs_budget_table_is_the_shipped_measurement():
    import json

    from experiments.paths import RESULTS_DIR

    metrics = json.loads((RESULTS_DIR / "real-budget" / "metrics.json").read_text())["metrics"]
    names = {"SmolLM2-135M-Instruct.Q4_1.gguf": "base", "rl-none": "RL (rl-none)"}
    doc = (RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text()
    for key, name in names.items():
        by = metrics[key]["eos_by_budget"]
        row = f"| {name} finished at eos | " + " | ".join(f"{100 * by[b]:.1f}%" for b in ("64", "128", "256", "512", "1024"))
        assert row + " |" in doc, f"docs/real-pair.md's budget table differs from real-budget/metrics.json: {row}"
    base = metrics["SmolLM2-135M-Instruct.Q4_1.gguf"]["eos_by_budget"]
    assert base["1024"] < 1 - TRUNCATION_LIMIT, "the doc says no budget brings the base to 90%"
    assert base["1024"] - base["512"] < base["512"] - base["256"], "... and that each doubling buys less"


def test_the_real_runs_tables_are_their_shipped_logs():
    from experiments.paths import REAL_DIR, RESULTS_DIR
    from experiments.training.log_table import log_table, read_log

    doc = (RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text()
    for run in ("rl-none", "rl-clip-cov"):
        table = "\n".join(log_table(read_log(REAL_DIR / run / "train_log.jsonl")))
        assert table in doc, f"docs/real-pair.md's table of {run} differs from its train_log.jsonl; paste log_table again"
    with pytest.raises(ValueError, match="window"):
        log_table([], window=10)


def test_the_real_probe_section_is_the_shipped_probe():
    import json

    from experiments.paths import RESULTS_DIR
    from experiments.study.probe_table import role_table

    metrics = json.loads((RESULTS_DIR / "real" / "probe" / "metrics.json").read_text())
    doc = (RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text()
    assert "\n".join(role_table(metrics)) in doc, "docs/real-pair.md's probe table differs; paste role_table again"
    det = metrics["detector"]
    best = det["layers"][str(det["best_layer"])]["auroc_test"]
    assert f"AUROC {best:.3f} (layer {det['best_layer']}" in doc and f"{det['token_baseline']['auroc_test']:.3f}" in doc
    assert f"R^2 {metrics['law']['r2']:.2f}" in doc
    base = metrics["on_base_samples"]
    assert abs(base["entropy_change"]["share_on_base_forks"] - base["entropy_change"]["fork_token_fraction"]) < 0.05, \
        "the doc says the base's forks carry about their share of the drop on the base's samples"
    rl = metrics["on_rl_samples"]["entropy_change"]
    assert rl["share_on_base_forks_ci"][0] > rl["fork_token_fraction"], "... and more than that on RL's samples"
    for rec in (metrics["on_base_samples"], metrics["on_rl_samples"]):
        b, r = rec["models"]["base"], rec["models"]["rl"]
        assert all(r[k] < b[k] for k in ("entropy_mean", "planning_entropy_mean", "execution_entropy_mean",
                                         "fork_entropy_mean")), "RL's entropy falls on every role"
        assert b["planning_entropy_mean"] - r["planning_entropy_mean"] > b["execution_entropy_mean"] - r["execution_entropy_mean"]


def test_the_real_sae_section_is_the_shipped_sae():
    import json

    from experiments.paths import RESULTS_DIR

    sae = json.loads((RESULTS_DIR / "real" / "sae" / "metrics.json").read_text())
    diff = json.loads((RESULTS_DIR / "real" / "sae" / "diff" / "metrics.json").read_text())
    doc = " ".join((RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text().split())  # lines rewrapped
    q, train, cfg = sae["quality"], sae["train"], sae["config"]
    assert f"`{sae['hook_name']}`" in doc and f"k = {sae['k']}" in doc and f"{sae['d_sae']:,} features" in doc
    assert f"{sae['d_sae'] // sae['d_in']}x the width" in doc
    assert f"{train['n_activations']:,} activations of {train['n_trajectories']:,} base samples" in doc
    per = train["n_trajectories"] // train["n_problems"]
    assert (f"({train['n_problems']} training problems x {per}) for {cfg['train_samples']:,} samples "
            f"({train['seconds'] / 60:.0f} min here)") in doc
    sinks = train["sinks_left_out"]
    assert f"{sinks['max_to_median_norm']:.0f}x the median" in doc and f"{100 * sinks['sink_variance_share']:.0f}%" in doc
    assert f"({sinks['n_sinks']:,} in the {train['n_trajectories']:,} training trajectories)" in doc
    assert f"({cfg['n_eval_problems']} x {cfg['eval_samples']} samples of each model" in doc
    assert f"FVU {q['base']['fvu']:.3f} / {q['rl']['fvu']:.3f} at L0 {q['base']['l0']:.0f}" in doc
    prompt = {m: 100 * (1 - q[m]["n_answer_tokens"] / q[m]["n_tokens"]) for m in ("base", "rl")}
    assert f"they are {prompt['base']:.0f}% of the base's scored tokens and {prompt['rl']:.0f}% of RL's" in doc
    assert f"+{q['base']['ce_loss_increase']:.2f} / +{q['rl']['ce_loss_increase']:.2f} nats" in doc
    assert f"({q['base']['ce_loss_recovered']:.3f} / {q['rl']['ce_loss_recovered']:.3f} of the loss" in doc
    assert sae["target"]["met"], "the doc reports an SAE within the FVU / L0 targets"
    s, forks = diff["summary"], diff["reconstruction"]["base"]["forks"]
    assert diff["sample_from"] == "base", "the doc says the diff reads the base's samples"
    assert f"({diff['n_forks']:,} of {diff['n_answer_tokens']:,} answer tokens; the base's FVU there {forks['fvu']:.3f}" in doc
    assert forks["fvu"] > sae["target"]["fvu_max"], "... above the 0.2 target"
    assert (f"Of the {s['n_features_active_at_base_forks']} features active at {100 * s['min_freq']:.0f}% of those "
            f"forks in the base, {s['n_lower_in_rl']} are weaker in RL; {s['n_higher_in_rl']} features active at") in doc
    assert s["n_pruned_3x"] == 0 and s["n_amplified_3x"] == 0, "... none moves by 3x"
    top = diff["pruned"][0]
    assert (f"the largest drop (feature {top['feature']}) is {top['mean_base'] / top['mean_rl']:.1f}x" in doc
            and f"(score {top['score']:.2f} at forks, {top['score_non_fork']:.2f} elsewhere)" in doc)
    assert f"(mean |score| {s['mean_abs_score_forks']:.3f} at forks, {s['mean_abs_score_non_forks']:.3f} at" in doc
    assert s["mean_abs_score_forks"] <= s["mean_abs_score_non_forks"], "... no larger at forks than elsewhere"


def test_the_real_learn_section_is_the_shipped_edits():
    from experiments.paths import RESULTS_DIR
    from experiments.study.learn_stage import learn_table
    from steering.learned import LearnedEdit

    names = ("lowrank-distill", "position-distill", "sae-distill", "mode8-breadth")
    paths = {n: RESULTS_DIR / "real" / "learn" / f"{n}.safetensors" for n in names}
    doc = (RESULTS_DIR.parents[1] / "docs" / "real-pair.md").read_text()
    assert "\n".join(learn_table(paths)) in doc, "docs/real-pair.md's learn table differs; paste learn_table again"
    logs = {n: LearnedEdit.load(p).meta["provenance"]["log"] for n, p in paths.items()}

    def window(n: str, k: str, last: bool) -> float:
        rows = logs[n][-5:] if last else logs[n][:5]
        return sum(r[k] for r in rows) / len(rows)
    for n in ("lowrank-distill", "position-distill"):  # "most of the way to the base's ... costs accuracy"
        assert window(n, "kl_base_steered", True) < 0.5 * window(n, "kl_base_steered", False)
        assert window(n, "pass_rate", True) < 0.5 * min(window(m, "pass_rate", True) for m in ("sae-distill", "mode8-breadth"))
    assert window("sae-distill", "kl_base_steered", True) > 0.8 * window("sae-distill", "kl_base_steered", False)
    last = {n: window(n, "pass_rate", True) for n in names}
    assert abs(last["mode8-breadth"] - last["sae-distill"]) < 0.05, "mode8-breadth keeps sae-distill's pass rate"
    doc1 = " ".join(doc.split())
    assert (f"solve {last['lowrank-distill']:.3f} and {last['position-distill']:.3f} of them, sae-distill's and "
            f"mode8-breadth's {last['sae-distill']:.3f} and {last['mode8-breadth']:.3f}") in doc1
    d = {n: window(n, "distinct_per_group", True) for n in ("mode8-breadth", "sae-distill")}
    assert f"{d['mode8-breadth']:.3f} distinct correct answers per group against {d['sae-distill']:.3f}" in doc1
    spread = [r["distinct_per_group"] for r in logs["mode8-breadth"][-5:]]
    assert max(spread) - min(spread) > d["mode8-breadth"] - d["sae-distill"], "... within the step-to-step spread"
    assert all(len(log) == 30 for log in logs.values()), "each edit trained 30 steps"

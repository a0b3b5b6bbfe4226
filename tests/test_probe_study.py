"""`forksight probe` end to end on two tiny random organisms: every number and file is written."""

import json
import math

import pytest

from experiments.cli import build_parser
from experiments.run_state import portable
from experiments.study.probe_stage import ProbeConfig, headline, run_probe
from probe.detector import ForkDetector


@pytest.fixture(scope="module")
def organism_pair(organism_pair_dirs, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("pair_with_log")  # a copy: the shared pair stays read-only
    for name in ("base", "rl"):
        shutil.copytree(organism_pair_dirs / name, root / name)
    with open(root / "rl" / "train_log.jsonl", "w") as f:
        for step in range(30):
            h = 1.2 * math.exp(-step / 10)
            r = -0.2 * math.exp(h) + 0.9
            f.write(json.dumps({"step": step, "entropy_mean": h, "reward_mean": r, "pass_at_1": r}) + "\n")
    return root


def _numbers(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_run_probe_writes_metrics_plots_and_a_loadable_detector(organism_pair, tmp_path):
    out = tmp_path / "probe"
    cfg = ProbeConfig(base=str(organism_pair / "base"), rl=str(organism_pair / "rl"), out=str(out),
                      n_problems=6, samples=3, backend="nnsight", device="cpu", n_examples=3)
    metrics = run_probe(cfg)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(portable(metrics, out))), \
        "the file is the returned record with portable paths"
    assert str(tmp_path) not in (out / "metrics.json").read_text(), "no absolute path in metrics.json"
    from probe.environment import environment, recorded

    assert metrics["environment"] == environment() == recorded(out / "fork_detector.safetensors"), \
        "metrics.json and the detector's header record the versions that made them"
    for f in ("entropy_hist.png", "entropy_heatmap.png", "law_fit.png", "fork_detector.safetensors"):
        assert (out / f).stat().st_size > 0, f"{f} missing"
    for src in ("on_base_samples", "on_rl_samples"):
        rec = metrics[src]
        assert rec["sampler_entropy_max_abs_diff"] < 1e-4, "teacher forcing must reproduce the sampler"
        worst = rec["sampler_entropy_max_abs_diff"]
        assert 0 <= rec["sampler_entropy_mean_abs_diff"] <= worst and 0 <= rec["sampler_entropy_p99_abs_diff"] <= worst
        for name in ("base", "rl"):
            m = rec["models"][name]
            for k in ("entropy_mean", "planning_entropy_mean", "execution_entropy_mean", "fork_entropy_mean"):
                assert m[k] is not None and m[k] > 0, f"{src}.{name}.{k}"
        assert rec["fork_overlap"]["jaccard"] is not None
        assert 0 <= rec["entropy_change"]["share_on_base_forks"] <= 1
        assert rec["kl"]["base_rl_mean"] > 0
        assert rec["truncated_share"] + rec["fraction_finished_eos"] == pytest.approx(1.0)
        assert list(rec["eos_by_budget"].values())[-1] == pytest.approx(rec["fraction_finished_eos"])
    det = metrics["detector"]
    assert set(det["layers"]) == {"0", "1"} and all(
        v["auroc_test"] is not None and v["auroc_control"] is not None for v in det["layers"].values()
    ), "every layer needs a held-out AUROC and its control"
    assert det["token_baseline"]["auroc_test"] is not None, "the token-identity floor must be reported"
    law = metrics["law"]
    assert law["available"] and law["a"] == pytest.approx(0.2) and law["b"] == pytest.approx(0.9)
    assert law["ceiling"] == pytest.approx(0.7) and law["extrapolation"]["mae"] < 1e-9
    bad = [k for k, v in _numbers(metrics) if isinstance(v, float) and not math.isfinite(v)]
    assert not bad, f"non-finite numbers in metrics.json: {bad}"
    loaded = ForkDetector.load(out / "fork_detector.safetensors")
    assert loaded.meta["hook_site"] == "blocks.{L}.hook_resid_post" and loaded.layers == [0, 1]
    line = headline(metrics)
    assert line["detector_auroc"] == det["layers"][str(det["best_layer"])]["auroc_test"]
    assert line["law_ceiling"] == pytest.approx(0.7)


def test_probe_cli_flags_and_a_missing_log(organism_pair, tmp_path):
    parser = build_parser()
    args = parser.parse_args(["probe", "--base", str(organism_pair / "base"), "--rl", str(organism_pair / "base"),
                              "--out", str(tmp_path / "o"), "--n-problems", "3", "--samples", "2",
                              "--layers", "1", "--backend", "nnsight", "--device", "cpu", "--n-examples", "2"])
    line = args.func(args)
    assert line["law_ceiling"] is None, "without a training log the law is skipped, not invented"
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["law"]["available"] is False and "train_log.jsonl" in metrics["law"]["reason"]
    assert list(metrics["detector"]["layers"]) == ["1"], "--layers selects the detector layers"
    assert metrics["on_base_samples"]["fork_overlap"]["jaccard"] == 1.0, "a model paired with itself"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run_probe(ProbeConfig(base=str(organism_pair / "base"), rl=str(organism_pair / "rl"),
                              train_log=str(tmp_path / "nope.jsonl"), out=str(tmp_path / "p"), n_problems=2,
                              samples=1, backend="nnsight", device="cpu"))
    with pytest.raises(ValueError, match="layers \\[5\\] are out of range"):
        run_probe(ProbeConfig(base=str(organism_pair / "base"), rl=str(organism_pair / "rl"), layers=(5,),
                              out=str(tmp_path / "q"), n_problems=2, samples=1, backend="nnsight", device="cpu"))
    with pytest.raises(ValueError, match="n_problems=1"):
        ProbeConfig(n_problems=1)

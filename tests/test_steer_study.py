"""`forksight steer derive | apply | sweep` on tiny random organisms, resume, and restoration arithmetic."""

import csv
import dataclasses
import json

import pytest

from experiments.cli import build_parser
from experiments.study import sweep as steer_sweep
from experiments.study.selection import restoration, select_best, with_restoration
from experiments.study.steer_stage import (
    ApplyConfig,
    DeriveConfig,
    countdown_role,
    run_apply,
    run_derive,
)
from experiments.study.sweep import SweepConfig, run_sweep
from steering import SteeringVector


def test_restoration_is_the_fraction_of_the_gap_closed():
    assert restoration(3.0, 2.0, 4.0) == pytest.approx(0.5), "halfway from RL to base is 0.5"
    assert restoration(2.0, 2.0, 4.0) == 0.0 and restoration(4.0, 2.0, 4.0) == 1.0
    assert restoration(1.0, 2.0, 4.0) == pytest.approx(-0.5), "worse than RL is negative, not clipped"
    assert restoration(3.0, 2.0, 2.0) is None, "base == RL leaves restoration undefined, never a division by 0"
    assert restoration(None, 2.0, 4.0) is None
    row = with_restoration({"pass_at_64": 0.9, "distinct_correct_mean": 2.5},
                           {"pass_at_64": 1.0, "distinct_correct_mean": 4.0}, {"pass_at_64": 0.8, "distinct_correct_mean": 2.0})
    assert row["restoration_pass_at_64"] == pytest.approx(0.5) and row["restoration_distinct"] == pytest.approx(0.25)


def test_best_is_the_most_restoring_rl_alone_cell_within_the_pass_at_1_tolerance():
    rl = {"pass_at_1": 0.70}
    cells = [{"kind": "steer", "rl_alone": True, "pass_at_1": 0.69, "restoration_distinct": 0.2, "id": "ok"},
             {"kind": "steer", "rl_alone": True, "pass_at_1": 0.60, "restoration_distinct": 0.9, "id": "too costly"},
             {"kind": "patch", "rl_alone": False, "pass_at_1": 0.70, "restoration_distinct": 0.8, "id": "needs base"},
             {"kind": "steer", "rl_alone": True, "pass_at_1": 0.681, "restoration_distinct": 0.3, "id": "edge"}]
    assert select_best(cells, rl, 0.02)["id"] == "edge", "pass@1 0.681 >= 0.70 - 0.02 counts; 0.60 and patching do not"
    assert select_best(cells[1:3], rl, 0.02) is None


def test_countdown_role_condition_says_execution_after_equals_until_semicolon():
    class Tok:
        def convert_tokens_to_ids(self, t):
            return {"=": 5, ";": 6}[t]

    import torch
    cond = countdown_role(Tok())
    toks = torch.tensor([[3, 4, 3], [3, 5, 3], [5, 3, 6], [5, 6, 5]])
    assert cond(toks).tolist() == [0, 1, 0, 1]
    assert cond(torch.zeros(2, 0, dtype=torch.long)).tolist() == [0, 0], "the first decision is a planning choice"


@pytest.fixture(scope="module")
def organism_pair(organism_pair_dirs):
    return organism_pair_dirs


def _cfg(pair, out):
    return SweepConfig(base=str(pair / "base"), rl=str(pair / "rl"), entropy_rl=str(pair / "none"), out=str(out),
                       methods=("dom-global", "dom-position"), layers=(1,), coefs=(1.0,), gates=("always", "planning"),
                       temperatures=(1.5,), patch_layers=(0, 1), alphas=(1.0,), screen_problems=3, problems=4, n=8,
                       confirm=2, derive_problems=4)


@pytest.mark.slow
def test_sweep_end_to_end_and_resume_reuses_finished_cells(organism_pair, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    m = run_sweep(_cfg(organism_pair, out))
    for f in ("metrics.json", "sweep.csv", "sweep.json", "pareto.png", "pass_at_k.png", "patching_curve.png",
              "vectors/dom-global.safetensors"):
        assert (out / f).is_file(), f"the sweep must ship {f}"
    for k in ("best_unconstrained", "base", "rl", "temperature_baseline", "patching_upper_bound", "selection_rule"):
        assert m[k] is not None, f"metrics.json needs {k!r}"
    assert [(p["layer"], p["coef"]) for p in m["patching_curve"]] == [(0, 1.0), (1, 1.0)], "one curve point per (L, alpha)"
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    # screen: base, rl, T=1.5, 2 methods x 2 gates, 2 patches; full: base, rl, 2 steer, patch, temperature at 2 seeds
    assert len(rows) == m["n_cells"] == 5 + 4 + 6 * 2 and m["n_cells_reused"] == 0
    # confirmed metrics are the mean over the two seeds' full-split cells, which differ (other sampling noise)
    top = m["confirmed"][0]
    assert len(top["per_seed"]) == 2 and top["per_seed"][0]["id"].startswith("full|")
    assert top["pass_at_1"] == pytest.approx(sum(s["pass_at_1"] for s in top["per_seed"]) / 2)
    by_id = {r["id"]: r for r in rows}
    assert all(float(by_id[s["id"]]["pass_at_1"]) == pytest.approx(s["pass_at_1"]) for s in top["per_seed"])
    assert json.loads((out / "metrics.json").read_text())["n_cells"] == m["n_cells"]

    cells = json.loads((out / "sweep.json").read_text())
    dropped = [c["id"] for c in cells["cells"] if c["kind"] == "steer" and c["stage"] == "screen"][:2]
    cells["cells"] = [c for c in cells["cells"] if c["id"] not in dropped]
    (out / "sweep.json").write_text(json.dumps(cells))
    calls = []
    real = steer_sweep.evaluate_cell
    monkeypatch.setattr(steer_sweep, "evaluate_cell", lambda *a, **k: calls.append(1) or real(*a, **k))
    m2 = run_sweep(_cfg(organism_pair, out))
    assert len(calls) == len(dropped), "a restart must evaluate only the cells missing from the partial table"
    assert m2["n_cells_reused"] == m["n_cells"] - len(dropped) and m2["n_cells"] == m["n_cells"]


@pytest.mark.slow
def test_derive_and_apply_through_the_cli(organism_pair, tmp_path):
    parser = build_parser()
    vec = tmp_path / "v.safetensors"
    args = parser.parse_args(["steer", "derive", "--base", str(organism_pair / "base"), "--rl", str(organism_pair / "rl"),
                              "--out", str(vec), "--method", "dom-role", "--layers", "1", "--n-problems", "3",
                              "--samples", "2"])
    assert args.func(args)["layers"] == [1]
    v = SteeringVector.load(vec)
    assert v.conditioning == "role" and "fork_threshold_rl" in v.config
    m = run_apply(ApplyConfig(vector=str(vec), rl=str(organism_pair / "rl"), coef=0.0, gate="always", problems=2, n=4))
    from experiments.study.steer_stage import evaluate_cell
    from experiments.tasks.countdown import Countdown
    from probe.checkpoint import load_causal_lm

    rl, tok = load_causal_lm(organism_pair / "rl", device="cpu")
    plain = evaluate_cell(rl, tok, Countdown().heldout_prompts(2), 4, 1.0, 0, 1024)
    assert m["pass_at_k"] == plain["pass_at_k"] and m["fork_entropy_mean"] == pytest.approx(plain["fork_entropy_mean"]), \
        "coefficient 0 must sample exactly what the unsteered RL model samples"
    with pytest.raises(ValueError, match="method"):
        DeriveConfig(method="mean")
    assert run_derive  # the CLI path above ran it


def test_layer_sets_parse_and_reject_bad_specs():
    from experiments.study.selection import parse_layers

    assert parse_layers("0+1+2+3") == [0, 1, 2, 3] and parse_layers(2) == [2]
    for bad in ("1,2", "1+1", "-1"):
        with pytest.raises(ValueError, match="layer set"):
            parse_layers(bad)


def test_pool_averages_seeds_and_per_problem_arrays():
    from experiments.study.selection import pool

    rows = [{"id": f"full{s}|x", "pass_at_1": p, "pass_at_64": 0.9, "distinct_correct_mean": d, "fork_entropy_mean": 0.1,
             "planning_entropy_mean": 0.2, "pass_at_k": {"1": p}, "per_problem": {
                 "n_correct": [c, 0], "distinct_correct": [d, 1], "distinct_eligible": [True, False]}}
            for s, p, d, c in ((0, 0.5, 2.0, 4), (1, 0.7, 3.0, 6))]
    out = pool(rows)
    assert out["pass_at_1"] == pytest.approx(0.6) and out["distinct_correct_mean"] == pytest.approx(2.5)
    assert out["pass_at_k"]["1"] == pytest.approx(0.6) and out["seeds"] == 2 and out["id"] == "full0|x"
    assert out["per_problem"]["n_correct"] == [5.0, 0.0] and out["per_problem"]["distinct_correct"] == [2.5, 1.0]
    assert [s["pass_at_1"] for s in out["per_seed"]] == [0.5, 0.7]


def test_shipped_sweep_best_is_recomputable_from_its_raw_cells_and_its_vector_fits_the_rl_model():
    """experiments/results/steer-sweep: `best` must follow from the per-seed cells in sweep.json."""
    from experiments.paths import ORGANISMS_DIR
    from experiments.study.selection import parse_layers
    from probe.checkpoint import load_causal_lm

    out = steer_sweep.RESULTS_DIR / "steer-sweep"
    m = json.loads((out / "metrics.json").read_text())
    cells = {c["id"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    for k in ("best", "base", "rl", "temperature_baseline", "patching_upper_bound", "patching_curve"):
        assert m[k], f"metrics.json needs {k!r}"

    def pooled(row):  # the mean over the confirm seeds, from the raw per-seed cells
        seeds = [cells[s["id"]] for s in row["per_seed"]]
        return {k: sum(c[k] for c in seeds) / len(seeds) for k in ("pass_at_1", "pass_at_64", "distinct_correct_mean")}

    base, rl = pooled(m["base"]), pooled(m["rl"])
    rows = [with_restoration({**r, **pooled(r), "kind": "steer", "rl_alone": True}, base, rl) for r in m["confirmed"]]
    best = select_best(rows, rl, m["config"]["pass_at_1_tolerance"])
    assert best["id"] == m["best"]["id"]
    assert best["restoration_distinct"] == pytest.approx(m["best"]["restoration_distinct"])
    assert m["best"]["pass_at_1"] >= rl["pass_at_1"] - m["config"]["pass_at_1_tolerance"]
    assert m["goal"]["met"] == (m["best"]["restoration_distinct"] >= 0.3)
    vec = SteeringVector.load(out / m["best"]["vector"]).at_layers(parse_layers(m["best"]["layer"]))
    vec.check_model(load_causal_lm(ORGANISMS_DIR / "rl-none", device="cpu")[0])


def test_a_sweep_directory_refuses_cells_made_with_other_shared_settings(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    cfg = SweepConfig(out=str(out))
    (out / "sweep.json").write_text(json.dumps({"config": {**dataclasses.asdict(cfg), "n": 16}, "cells": []}))
    with pytest.raises(ValueError, match=r"other \['n'\].*n=16"):
        steer_sweep.Sweep(cfg)

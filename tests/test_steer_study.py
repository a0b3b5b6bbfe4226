"""`forksight steer derive | apply | sweep` on tiny random organisms, resume, and restoration arithmetic."""

import csv
import dataclasses
import json

import pytest

from experiments.cli import build_parser
from experiments.study import sweep as steer_sweep
from experiments.study.selection import choose, choose_goal, matched_temperature, spliced
from experiments.study.steer_stage import (
    ApplyConfig,
    DeriveConfig,
    countdown_role,
    run_apply,
    run_derive,
)
from experiments.study.sweep import SweepConfig, run_sweep
from steering import SteeringVector


def _judged(i, change, rest, excess):
    return {"id": i, "pass_at_1_change": change, "restoration_distinct": rest, "frontier_excess": excess}


def test_choice_rules_respect_the_pass_at_1_tolerance():
    rows = [_judged("ok", -0.01, 0.2, 0.05), _judged("too costly", -0.10, 0.9, 0.3),
            _judged("edge", -0.03, 0.3, -0.2), _judged("undefined", 0.0, None, None)]
    assert choose(rows, 0.03)["id"] == "edge", "pass@1 RL - 0.03 counts; -0.10 does not; None never wins"
    assert choose_goal(rows, 0.03)["id"] == "ok", "the goal rule ranks by frontier excess, not restoration"
    assert choose_goal(rows, 0.005) is None and choose([rows[1]], 0.03) is None
    temps = [{"id": "t1", "fork_entropy_mean": 0.5}, {"id": "t2", "fork_entropy_mean": 0.9}]
    assert matched_temperature(temps, {"fork_entropy_mean": 0.8})["id"] == "t2"
    assert matched_temperature(temps, {"fork_entropy_mean": None}) is None


def test_row_level_cell_is_the_splice_of_the_steered_cell_and_rl():
    from probe.metrics.outcomes import Outcomes

    steered = Outcomes([["a", "b", None, "c"], [None, "x", "y", "y"]], [True, True])
    rl = Outcomes([["a", "a", "a", None], ["x", "x", None, "x"]], [True, True])
    row = spliced({"outcomes": steered.to_json(), "half": "test", "seed": 1000, "params": 512}, {"outcomes": rl.to_json()},
                  0.5)
    back = Outcomes.from_json(row["outcomes"])
    assert back.keys == [["a", "b", "a", None], [None, "x", None, "x"]], "samples 0..1 steered, 2..3 from RL"
    assert row["distinct_correct_mean"] == pytest.approx((2 + 1) / 2) and row["seed"] == 1000
    assert row["params"] == 512, "a row-level cell keeps its intervention's parameter count"
    shares = {"truncated_share": 0.5}, {"truncated_share": 0.1}
    cut = spliced({"outcomes": steered.to_json(), **shares[0]}, {"outcomes": rl.to_json(), **shares[1]}, 0.25)
    assert cut["truncated_share"] == pytest.approx((1 * 0.5 + 3 * 0.1) / 4), "m = 1 of 4 samples from the cell"
    assert row["truncated_share"] is None, "unknown when a cell does not record it"


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


def _cfg(pair, out, **kw):
    return SweepConfig(**{**dict(base=str(pair / "base"), rl=str(pair / "rl"), variants=(str(pair / "none"),),
                                 out=str(out), methods=("dom-global", "dom-position"), layers=("1",), coefs=(1.0,),
                                 gates=("always", "planning"), fractions=(0.5,), temperatures=(1.5,), patch_layers=(0, 1),
                                 alphas=(1.0,), restore_layers=(1,), problems=3, n=8, test_seeds=2, derive_problems=4),
                          **kw})


@pytest.mark.slow
def test_sweep_end_to_end_and_resume_reuses_finished_cells(organism_pair, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    m = run_sweep(_cfg(organism_pair, out))
    for f in ("metrics.json", "sweep.csv", "sweep.json", "pareto.png", "pareto_selection.png", "pass_at_k.png",
              "patching_curve.png", "vectors/dom-global.safetensors"):
        assert (out / f).is_file(), f"the sweep must ship {f}"
    for k in ("frontier", "base", "rl", "picks", "goals", "protocol", "patching_curve", "layer_restore_curve"):
        assert m[k] is not None, f"metrics.json needs {k!r}"
    assert m["protocol"]["test_seeds"] == [1000, 1001] and m["protocol"]["selection_seed"] == [0]
    assert [p["spec"]["layer"] for p in m["patching_curve"]] == [0, 1], "one curve point per patched layer"
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    sel = {c["spec"].get("model") for c in cells if c["half"] == "selection" and c["family"] == "reference"}
    assert sel == {"base", "rl"}
    assert all(c["seed"] == 0 for c in cells if c["half"] == "selection"), "selection uses the selection seed only"
    assert all(c["seed"] in (1000, 1001) for c in cells if c["half"] == "test"), "test cells use unseen seeds only"
    # selection: base, rl, T=1.5, 2 methods x 2 gates, 2 patches, 1 restore; row-level cells are splices (no sampling)
    assert sum(c["half"] == "selection" for c in cells) == 2 + 1 + 4 + 2 + 1
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert any(r["fraction"] == "0.5" for r in rows), "row-level cells are judged on the selection half"
    for fam in m["picks"].values():
        for pick in fam.values():
            if pick["test"]:
                t = pick["test"]
                assert t["seeds"] == [1000, 1001] and len(t["frontier_excess_ci"]) == 2
                assert t["frontier_excess"] == pytest.approx(t["restoration_distinct"] - t["frontier_restoration"])
                assert t["truncated_share"] is not None, "every test measurement says how much the budget cut"
    goal, goal_pick = m["goals"]["goal"], m["best_goal"] or {}
    assert (goal["cell"] or {}).get("id") == (m["selection"]["best_goal"] or {}).get("id"), \
        "the goal is judged on the selection half's goal pick alone"
    assert not goal_pick or goal["pass_at_k_dominance"]["ks"] == list(range(1, 9)), "pass@k at every k = 1..n"

    dropped = [c["id"] for c in cells if c["family"] == "vector" and c["half"] == "selection"][:2]
    data = json.loads((out / "sweep.json").read_text())
    data["cells"] = [c for c in data["cells"] if c["id"] not in dropped]
    (out / "sweep.json").write_text(json.dumps(data))
    calls = []
    real = steer_sweep.evaluate_cell
    monkeypatch.setattr(steer_sweep, "evaluate_cell", lambda *a, **k: calls.append(k["parts_dir"]) or real(*a, **k))
    m2 = run_sweep(_cfg(organism_pair, out))
    assert len(calls) == len(dropped), "a restart must evaluate only the cells missing from the partial table"
    assert all(p is not None and p.parent == out / "parts" for p in calls), "a cell samples in resumable parts"
    assert not any((out / "parts").iterdir()), "a cell's parts are removed once the cell is cached"
    assert m2["n_cells"] == m["n_cells"] and m2["goals"] == m["goals"], "a resumed sweep gives the same result"

    calls.clear()  # curves on the selection half: read from its cells, nothing sampled again
    m3 = run_sweep(_cfg(organism_pair, out, curves_half="selection"))
    assert not calls and m3["curves_half"] == "selection" and m["curves_half"] == "test"
    sel = {c["id"]: c for c in cells if c["half"] == "selection"}
    for point in m3["patching_curve"] + m3["layer_restore_curve"]:
        cell = sel[f"selection|s0|{point['id']}"]
        assert point["half"] == "selection" and point["seeds"] == [0]
        assert point["pass_at_1"] == pytest.approx(cell["pass_at_1"]), "the selection cell's own numbers"
    assert [p["spec"]["layer"] for p in m3["patching_curve"]] == [0, 1]
    with pytest.raises(ValueError, match="curves_half"):
        _cfg(organism_pair, out, curves_half="both")


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
    from steering.selected import save_selected

    with pytest.raises(ValueError, match="role-conditioned"):
        save_selected(v, tmp_path / "sel.safetensors")
    save_selected(SteeringVector({1: v.rows(1)[0]}), tmp_path / "sel.safetensors", coef=0.0, fraction=0.5)
    m = run_apply(ApplyConfig(intervention=str(tmp_path / "sel.safetensors"), rl=str(organism_pair / "rl"),
                              problems=2, n=4))
    assert m["recommended"]["coef"] == 0.0 and m["recommended"]["fraction"] == 0.5
    from experiments.study.protocol import Half, evaluate_cell
    from probe.models.checkpoint import load_causal_lm
    from probe.tasks.countdown import Countdown

    rl, tok = load_causal_lm(organism_pair / "rl", device="cpu")
    plain = evaluate_cell(rl, tok, Countdown(), Half.of(Countdown(), "test", 2), n=4, seed=1000)
    # row-level steering prefills steered and unsteered samples separately: same tokens, entropies equal to float
    # rounding (fork_entropy_mean is not compared: its top-20% threshold breaks exact ties between samples)
    assert m["per_problem"] == plain["per_problem"] and m["pass_at_k"] == plain["pass_at_k"], \
        "coefficient 0 must sample exactly what the unsteered RL model samples"
    assert m["planning_entropy_mean"] == pytest.approx(plain["planning_entropy_mean"], rel=1e-5)
    with pytest.raises(ValueError, match="method"):
        DeriveConfig(method="mean")
    assert run_derive  # the CLI path above ran it


def test_layer_sets_parse_and_reject_bad_specs():
    from experiments.study.selection import parse_layers

    assert parse_layers("0+1+2+3") == [0, 1, 2, 3] and parse_layers(2) == [2]
    for bad in ("1,2", "1+1", "-1"):
        with pytest.raises(ValueError, match="layer set"):
            parse_layers(bad)


def test_a_sweep_directory_refuses_cells_made_with_other_shared_settings(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    cfg = SweepConfig(out=str(out))
    (out / "sweep.json").write_text(json.dumps({"config": {**dataclasses.asdict(cfg), "n": 16}, "cells": []}))
    with pytest.raises(ValueError, match=r"other \['n'\].*n=16"):
        steer_sweep.Sweep(cfg)
    with pytest.raises(ValueError, match="outside"):
        SweepConfig(fractions=(1.5,))


def test_shipped_sweep_picks_follow_from_its_cells_and_its_best_file_applies():
    """experiments/results/steer-sweep: `best` is the selection-half rule applied to the cells in sweep.json, its
    test numbers recompute from the test cells, and best.safetensors applies to the RL model in one call."""
    from experiments.paths import ORGANISMS_DIR, RESULTS_DIR
    from experiments.study.selection import judge
    from probe.models.checkpoint import load_causal_lm
    from steering import load_intervention

    out = RESULTS_DIR / "steer-sweep"
    m = json.loads((out / "metrics.json").read_text())
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    tol, fractions = m["config"]["tolerance"], m["config"]["fractions"]

    def ref(half, model, seed):
        return next(c for c in cells if c["half"] == half and c["family"] == "reference"
                    and c["spec"] == {"model": model} and c["seed"] == seed)

    s0 = m["protocol"]["selection_seed"][0]
    base, rl = ref("selection", "base", s0), ref("selection", "rl", s0)
    rows = []
    for c in cells:
        if c["half"] != "selection" or not c["rl_alone"] or c["family"] in ("temperature", "reference"):
            continue
        rows.append({**c, **judge([c], [base], [rl], n_boot=200)})
        rows += [{**sp, "id": f"{c['id']}|f{f}", **judge([sp], [base], [rl], n_boot=200)}
                 for f in fractions for sp in [spliced(c, rl, f)]]
    best = choose_goal(rows, tol)
    assert best["id"] == m["selection"]["best"]["id"], "best must be the goal rule applied to the selection cells"
    seeds = m["protocol"]["test_seeds"]
    cell_id = best["id"].split("|f")[0].replace("selection|s0|", "")
    tests = [next(c for c in cells if c["id"] == f"test|s{s}|{cell_id}") for s in seeds]
    t_base, t_rl = [ref("test", "base", s) for s in seeds], [ref("test", "rl", s) for s in seeds]
    if "|f" in best["id"]:
        tests = [spliced(t, q, float(best["id"].split("|f")[1])) for t, q in zip(tests, t_rl)]
    again = judge(tests, t_base, t_rl)
    for k in ("restoration_distinct", "pass_at_1_change", "frontier_excess"):
        assert again[k] == pytest.approx(m["best"][k]), f"{k} of best must recompute from the test cells"
    assert again["distinct_correct_subset"] == "n_solutions>=3", "Countdown's rule: the paired subset is the same"
    from experiments.study.selection import outcomes_of
    from probe.metrics.frontier import mixture_curve

    (b, clusters), (r, _) = outcomes_of(t_base), outcomes_of(t_rl)
    curve = [{k: c[k] for k in m["frontier"][0]} for c in mixture_curve(b, r, clusters=clusters)]
    assert curve == m["frontier"], "the shipped frontier must recompute exactly (paired subsets change no Countdown number)"
    if m["best_file"]:
        rl_model, _ = load_causal_lm(ORGANISMS_DIR / "rl-none", device="cpu")
        with load_intervention(out / m["best_file"]).apply(rl_model) as steer:
            assert steer is not None
        assert not any(x._forward_hooks for x in rl_model.modules())


def test_cell_cache_stores_portable_paths_and_reuses_cells_after_a_move(tmp_path):
    import hashlib
    import shutil
    from dataclasses import dataclass

    from experiments.study.cells import CellCache

    @dataclass
    class Cfg:
        out: str
        base: str
        rl: str
        task: str = "countdown"
        n: int = 4

    def cfg(root):
        return Cfg(out=str(root), base=str(tmp_path / "m" / "base"), rl=str(tmp_path / "m" / "rl-none"))

    a, b = tmp_path / "a" / "sweep", tmp_path / "b" / "sweep"
    cache = CellCache(a, cfg(a))
    parts = cache.parts_dir("c1")
    assert parts.parent == a / "parts" and parts != cache.parts_dir("c2"), "one parts directory per cell"
    assert parts.name == hashlib.sha256(b"c1").hexdigest()[:16], "a running study's saved parts keep their directory"
    parts.mkdir(parents=True)
    cache.get("c1", lambda: {"pass_at_1": 0.5})
    assert not parts.exists(), "a cell's parts are removed once it is stored"
    parts.mkdir(parents=True)  # a stop between storing the cell and removing its parts
    cache.get("c1", lambda: pytest.fail("a cached cell must not be evaluated again"))
    assert not parts.exists(), "parts left by a stop are removed when the stored cell is read"
    assert str(tmp_path) not in (a / "sweep.json").read_text(), "no absolute path in sweep.json"
    shutil.copytree(a, b)
    moved = CellCache(b, cfg(b))
    assert moved.get("c1", lambda: pytest.fail("a cached cell must not be evaluated again"))["pass_at_1"] == 0.5
    assert len(moved.invocations) == 1, "the same configuration, found at another path, is one invocation"
    with pytest.raises(ValueError, match="other \\['n'\\]"):
        CellCache(b, Cfg(out=str(b), base=str(tmp_path / "m" / "base"), rl=str(tmp_path / "m" / "rl-none"), n=8))

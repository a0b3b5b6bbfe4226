"""`--engine hf|vllm`: validation, the clear error without vllm, the settings reaching every stage config
and vLLM's engine arguments, and what a study records about which engine sampled (a fake vLLM engine
here: it samples on the HF engine and reports NaN entropy, as `probe.sampling.vllm_engine.VLLMEngine`
does; the real engine's parity tests are tests/test_vllm_engine.py and tests/test_vllm_study.py)."""

from __future__ import annotations

import json

import pytest
import torch

import experiments.cli as cli
import experiments.study.engines as engines
from experiments.paths import ORGANISMS_DIR, RESULTS_DIR
from experiments.study.eval_stage import EvalConfig
from experiments.study.run import RunConfig, stage_configs
from experiments.study.steer_stage import ApplyConfig, run_apply
from experiments.study.sweep import SweepConfig, run_sweep
from probe.sampling.vllm_config import engine_kwargs
from probe.sampling.vllm_engine import VLLMUnavailableError
from probe.sampling.vllm_hooks import VLLMInterventionError

BASE, RL = str(ORGANISMS_DIR / "base"), str(ORGANISMS_DIR / "rl-none")


@pytest.fixture
def no_vllm(monkeypatch):
    """This Python as one without vllm (whether or not it is installed here)."""
    real = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm 'installed' and `VLLMEngine` replaced by `FakeEngine`; returns the log of starts, calls, closes."""
    log: dict[str, list] = {"starts": [], "calls": [], "closed": []}

    class FakeEngine:
        name = "vllm"

        def __init__(self, spec, cfg):
            from probe.models.checkpoint import load_causal_lm

            self.spec, self.cfg = str(spec), cfg
            self.model, self.tokenizer = load_causal_lm(spec, device="cpu")
            log["starts"].append(self.spec)

        def sample(self, prompts, cfg, intervention=None):
            from probe.sampling.sampler import sample_branches
            from probe.sampling.vllm_engine import as_stream_edit

            edit = as_stream_edit(intervention)  # refuses what the real engine refuses
            log["calls"].append((self.spec, cfg.seed, edit is not None))
            b = sample_branches(self.model, self.tokenizer, prompts, cfg)  # (unsteered: bookkeeping only)
            b.entropy = torch.where(b.mask, float("nan"), 0.0)
            return b

        def close(self):
            log["closed"].append(self.spec)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(engines, "require_vllm", lambda: None)
    monkeypatch.setattr("probe.sampling.vllm_engine.VLLMEngine", FakeEngine)
    return log


def test_vllm_without_vllm_is_a_clear_error_naming_the_venv(no_vllm, tmp_path, capsys):
    for make in (lambda: EvalConfig(engine="vllm"), lambda: SweepConfig(engine="vllm"),
                 lambda: RunConfig(engine="vllm"), lambda: ApplyConfig(engine="vllm")):
        with pytest.raises(VLLMUnavailableError, match=r"make vllm.*\.venv-vllm.*--engine hf"):
            make()
    assert cli.main(["eval", "--engine", "vllm", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "make vllm" in err and ".venv-vllm" in err and not (tmp_path / "e").exists(), \
        "the CLI must refuse before any work, saying how to get vLLM"
    assert EvalConfig().engine == "hf", "the HF engine stays the default"


def test_bad_engine_settings_name_the_flag():
    with pytest.raises(ValueError, match=r"--engine 'tgi' is invalid.*'hf' or 'vllm'"):
        SweepConfig(engine="tgi")
    with pytest.raises(ValueError, match="--vllm-in-process.*--no-vllm-in-process"):
        EvalConfig(vllm_data_parallel_size=2)
    with pytest.raises(ValueError, match="--vllm-executor 'slurm'"):
        EvalConfig(vllm_executor="slurm")
    with pytest.raises(ValueError, match="--vllm-tensor-parallel-size 0"):
        RunConfig(vllm_tensor_parallel_size=0)


def test_cli_scale_out_flags_reach_vllms_engine_arguments(fake_vllm):
    """--vllm-* flags -> the study config -> VLLMConfig -> the keyword arguments of vllm.LLM (the
    engine's own test builds vLLM's EngineArgs from the same dict)."""
    args = cli.build_parser().parse_args(
        ["steer", "sweep", "--engine", "vllm", "--vllm-tensor-parallel-size", "2", "--vllm-data-parallel-size", "4",
         "--no-vllm-in-process", "--vllm-executor", "ray", "--vllm-kv-cache-gib", "8", "--vllm-max-model-len", "4096",
         "--dtype", "bfloat16", "--seed", "3"])
    cfg = cli.config_from_args(SweepConfig, args)
    kw = engine_kwargs(engines.vllm_config(cfg, cfg.dtype, cfg.seed), RL, on_cpu=False)
    assert (kw["tensor_parallel_size"], kw["data_parallel_size"], kw["distributed_executor_backend"]) == (2, 4, "ray")
    assert (kw["kv_cache_memory_bytes"], kw["max_model_len"], kw["dtype"], kw["seed"]) == (8 * 2**30, 4096, "bfloat16", 3)
    plain = engine_kwargs(engines.vllm_config(SweepConfig()), RL, on_cpu=False)
    assert plain["distributed_executor_backend"] is None and plain["max_model_len"] is None and \
        "kv_cache_memory_bytes" not in plain, "unset flags leave vLLM's own defaults"
    for cmd in (["run"], ["eval", "--out", "x"], ["steer", "apply"], ["steer", "sweep"]):
        ns = cli.build_parser().parse_args([*cmd, "--engine", "vllm", "--vllm-executor", "mp"])
        assert (ns.engine, ns.vllm_executor) == ("vllm", "mp"), f"forksight {' '.join(cmd)} must take the engine flags"


def test_run_hands_the_engine_to_the_sweep_only_and_old_runs_still_resume(fake_vllm, tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"), quick=True, engine="vllm", vllm_tensor_parallel_size=2)
    sc = stage_configs(cfg)
    assert (sc["sweep"].engine, sc["sweep"].vllm_tensor_parallel_size) == ("vllm", 2)
    for stage in (sc["probe"], sc["sae"], sc["sae_diff"], *(s for s, _ in sc["learn"].values())):
        assert not hasattr(stage, "engine"), f"{type(stage).__name__} samples on the HF engine (entropy, gradients)"
    from experiments.study.run import stored_config

    assert "engine" not in stored_config(RunConfig(out=str(tmp_path / "r")), tmp_path), \
        "the default engine is left out of stored configurations, so runs made before it existed resume"
    assert stored_config(cfg, tmp_path)["engine"] == "vllm"


def test_replicate_hands_the_engine_to_every_pairs_sweep(fake_vllm, tmp_path):
    from experiments.study.replicate import PairSpec, ReplicateConfig, pair_stage_configs

    cfg = ReplicateConfig(out=str(tmp_path / "rep"), quick=True, engine="vllm", vllm_data_parallel_size=2,
                          vllm_in_process=False)
    pair = PairSpec.parse(f"p=experiments/organisms/countdown/base,{RL}")
    rc, sc = pair_stage_configs(pair, cfg)
    assert (rc.engine, sc["sweep"].engine, sc["sweep"].vllm_data_parallel_size) == ("vllm", "vllm", 2)
    assert pair_stage_configs(pair, ReplicateConfig(out=str(tmp_path / "r2"), quick=True))[1]["sweep"].engine == "hf"


def test_eval_with_vllm_records_the_engine_and_no_entropy(fake_vllm, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--engine", "vllm", "--model", RL, "--n", "4", "--problems", "4", "--out", str(out)]) == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["engine"] == "vllm" and fake_vllm["starts"] == [RL] and fake_vllm["closed"] == [RL]
    assert rec["planning_entropy_mean"] is None and rec["fork_entropy_mean"] is None, \
        "no per-token entropy on vLLM: None, never NaN or a number"
    assert 0 <= rec["pass_at_1"] <= 1


def test_steer_apply_on_vllm_refuses_what_vllm_cannot_apply(fake_vllm):
    """The shipped best is a rank-4 learned edit: vLLM has no form for it, so `steer apply --engine vllm`
    refuses before starting an engine, naming the HF fix (the sweep would fall back instead)."""
    with pytest.raises(VLLMInterventionError, match="kind 'lowrank'.*--engine hf"):
        run_apply(ApplyConfig(engine="vllm", intervention=str(RESULTS_DIR / "steer-sweep" / "best.safetensors")))
    assert fake_vllm["starts"] == [], "a refused intervention must not start an engine"


def test_sweep_on_vllm_samples_each_cell_where_it_can_and_records_it(fake_vllm, organism_pair_dirs, tmp_path):
    pair = organism_pair_dirs
    variant = tmp_path / "variant"
    variant.symlink_to(pair / "rl", target_is_directory=True)
    cfg = SweepConfig(base=str(pair / "base"), rl=str(pair / "rl"), variants=(str(variant),), out=str(tmp_path / "sw"),
                      methods=("dom-global",), layers=("1",), coefs=(1.0,), gates=("always", "planning"),
                      fractions=(0.5,), temperatures=(1.5,), patch_layers=(1,), alphas=(1.0,), restore_layers=(),
                      problems=2, n=4, test_seeds=1, derive_problems=4, engine="vllm")
    m = run_sweep(cfg)
    cells = json.loads((tmp_path / "sw" / "sweep.json").read_text())["cells"]
    on = {(c["family"], json.dumps(c["spec"], sort_keys=True)): c["engine"] for c in cells}
    for (fam, spec), eng in on.items():
        want = "hf" if fam == "patching" or '"planning"' in spec else "vllm"
        assert eng == want, f"{fam} {spec} sampled on {eng}, expected {want}"
    planning = next(c for c in cells if '"planning"' in json.dumps(c["spec"]))
    assert "gate='planning'" in planning["engine_note"] and "HF engine" in planning["engine_note"]
    assert all(c["fork_entropy_mean"] is None for c in cells if c["engine"] == "vllm")
    assert m["engines"]["engine"] == "vllm" and set(m["engines"]["on_hf_instead"]) == {"vector", "patching"}
    assert sum(m["engines"]["cells"].values()) == len(cells)
    assert fake_vllm["starts"] == [cfg.base, str(variant), cfg.rl], \
        "each checkpoint's engine starts once: the base's and the variant's cells first, then the RL model's"
    assert fake_vllm["closed"] == fake_vllm["starts"], "every engine is shut down, the last one at the end"
    assert {seed for _, seed, _ in fake_vllm["calls"]} == {0, 1000}, "each cell's own seed reaches the engine"
    assert any(steered for *_, steered in fake_vllm["calls"]), "the always-gated vector cell runs on vLLM"
    assert m["temperature_baseline"] is None, "no fork entropy on vLLM, so no matched temperature"

"""`forksight run --quick` on the shipped real pair: SmolLM2-135M-Instruct from its GGUF (bfloat16) as the
base, its GRPO LoRA adapter (`experiments/real/smollm2/rl-none`) as `BASE+ADAPTER` and the Clip-Cov run
(`rl-clip-cov`) as the entropy-preserving variant, also `BASE+ADAPTER`: every stage runs
on a 30-layer BPE model and all seven claims are computed (the quick sizes make the numbers noise; the
plumbing on a real model is what is tested)."""

from __future__ import annotations

import json

import pytest

from experiments.cli import main
from experiments.paths import REAL_DIR


@pytest.mark.slow
def test_quick_study_on_the_real_pair_computes_every_claim(tmp_path, real_base):
    adapter = REAL_DIR / "rl-none"
    assert (adapter / "adapter_model.safetensors").is_file(), "the real pair's RL adapter ships in the repository"
    out = tmp_path / "run"
    task = f"math:{REAL_DIR}/heldout.jsonl,train={REAL_DIR}/train.jsonl,chat,max_new_tokens=32"
    variant = REAL_DIR / "rl-clip-cov"
    assert (variant / "adapter_model.safetensors").is_file(), "the Clip-Cov run ships as the pair's variant"
    assert main(["run", "--quick", "--task", task, "--base", str(real_base), "--rl", f"{real_base}+{adapter}",
                 "--variants", f"{real_base}+{variant}", "--dtype", "bfloat16", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["id"] for c in results["claims"]] == ["C1", "C2", "C3", "C3b", "C4", "C5", "C6"]
    assert all(c["status"] in ("holds", "fails", "inconclusive") for c in results["claims"])
    assert results["checkpoints"]["rl"]["form"] == "adapter" and results["checkpoints"]["base"]["form"] == "gguf"
    assert results["config"]["sae"]["layer"] == 15, "the SAE sits at the middle of the 30 layers"
    assert results["config"]["run"]["dtype"] == "bfloat16" and results["environment"]["peft"]
    shares = results["truncation"]["truncated_share"]
    assert {"base", "rl", "rl-clip-cov"} <= set(shares) and all(0 <= shares[m] <= 1 for m in ("base", "rl", "rl-clip-cov")), \
        "truncation is reported per model, the variant (BASE+ADAPTER) included"
    assert all(v is None or 0 <= v <= 1 for v in shares.values()), "and for each steered cell C5 reads that exists"
    assert [v["form"] for v in results["checkpoints"]["variants"]] == ["adapter"]
    sweep = json.loads((out / "steer" / "metrics.json").read_text())
    assert set(sweep["variants"]) == {"rl-clip-cov"} and sweep["variants"]["rl-clip-cov"], \
        "the adapter-form variant is sampled on the test half (C5, C6)"

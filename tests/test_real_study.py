"""`forksight run --quick` on the real base (SmolLM2-135M-Instruct from its GGUF, bfloat16) against an
RL side given as BASE+ADAPTER: every stage runs on a 30-layer BPE model and all seven claims are
computed. Until the real pair's GRPO adapter is shipped, the RL side is a stand-in: a seeded random
LoRA adapter (the numbers mean nothing; the plumbing is what is tested)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.cli import main
from experiments.paths import REAL_DIR


@pytest.mark.slow
def test_quick_study_on_the_real_base_computes_every_claim(tmp_path, real_base):
    from peft import LoraConfig, get_peft_model

    from probe.adapters import write_adapter_provenance
    from probe.checkpoint import load_causal_lm

    base, _ = load_causal_lm(real_base, device="cpu")
    torch.manual_seed(0)
    stand_in = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in stand_in.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    adapter = tmp_path / "rl"
    stand_in.save_pretrained(str(adapter))
    write_adapter_provenance(adapter, str(real_base), stand_in.get_base_model())
    del base, stand_in

    out = tmp_path / "run"
    task = f"math:{REAL_DIR}/heldout.jsonl,train={REAL_DIR}/train.jsonl,chat,max_new_tokens=48"
    assert main(["run", "--quick", "--task", task, "--base", str(real_base), "--rl", f"{real_base}+{adapter}",
                 "--dtype", "bfloat16", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["id"] for c in results["claims"]] == ["C1", "C2", "C3", "C3b", "C4", "C5", "C6"]
    assert all(c["status"] in ("holds", "fails", "inconclusive") for c in results["claims"])
    assert results["checkpoints"]["rl"]["form"] == "adapter" and results["checkpoints"]["base"]["form"] == "gguf"
    assert results["config"]["sae"]["layer"] == 15, "the SAE sits at the middle of the 30 layers"
    assert results["config"]["run"]["dtype"] == "bfloat16" and results["environment"]["peft"]
    shares = results["truncation"]["truncated_share"]
    assert set(shares) == {"base", "rl"} and all(0 <= v <= 1 for v in shares.values()), "truncation is reported per model"

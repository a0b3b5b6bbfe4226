"""probe.sampling.parts: sampling in saved parts equals one call, resumes from saved parts, refuses foreign ones."""

from __future__ import annotations

import pytest
import torch

from probe.sampling import parts as P
from probe.sampling.sampler import SamplerConfig, sample_branches

PROMPTS = ["w3 w4 w5", "w9", "w10 w11 w12 w13 w14 w15", "w20 w21", "w7 w8 w30 w31"]
CFG = SamplerConfig(n=3, max_new_tokens=8, temperature=1.0, seed=5)


def same(a, b) -> None:
    for k in ("prompt_index", "sample_index", "tokens", "mask"):
        assert torch.equal(getattr(a, k).cpu(), getattr(b, k).cpu()), k
    for k in ("logprobs", "entropy"):
        torch.testing.assert_close(getattr(a, k).cpu(), getattr(b, k).cpu(), rtol=1e-4, atol=1e-5)
    assert a.finish_reason == b.finish_reason and a.prompt_tokens == b.prompt_tokens


def test_parts_equal_one_call_and_resume_without_sampling(eos_lm, tiny_tokenizer, tmp_path, monkeypatch):
    model = eos_lm()
    whole = sample_branches(model, tiny_tokenizer, PROMPTS, CFG)
    assert "length" in whole.finish_reason and "eos" in whole.finish_reason  # rows end at different steps
    got = P.sample_in_parts(model, tiny_tokenizer, PROMPTS, CFG, tmp_path / "p", identity="m", problems_per_part=2)
    same(got, whole)
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == [f"part-{i:04d}.safetensors" for i in range(3)]

    # a stop after two parts: the third is sampled, the first two are read back, not sampled again
    (tmp_path / "p" / "part-0002.safetensors").unlink()
    calls = []
    real = P.sample_branches
    monkeypatch.setattr(P, "sample_branches", lambda *a, **k: calls.append(k["prompt_keys"]) or real(*a, **k))
    again = P.sample_in_parts(model, tiny_tokenizer, PROMPTS, CFG, tmp_path / "p", identity="m", problems_per_part=2)
    same(again, whole)
    assert [list(k) for k in calls] == [[4]]  # only the missing part, keyed by its prompt's index in the list


@pytest.mark.parametrize("change", ["identity", "seed", "prompts"])
def test_a_part_from_other_settings_is_refused(eos_lm, tiny_tokenizer, tmp_path, change):
    model = eos_lm()
    P.sample_in_parts(model, tiny_tokenizer, PROMPTS, CFG, tmp_path, identity="m", problems_per_part=5)
    kw = {"identity": "m", "cfg": CFG, "prompts": PROMPTS}
    kw |= {"identity": {"identity": "other"}, "seed": {"cfg": SamplerConfig(n=3, max_new_tokens=8, seed=6)},
           "prompts": {"prompts": PROMPTS[::-1]}}[change]
    with pytest.raises(ValueError, match="Fix: delete"):
        P.sample_in_parts(model, tiny_tokenizer, kw["prompts"], kw["cfg"], tmp_path, identity=kw["identity"],
                          problems_per_part=5)


def test_bad_part_size(eos_lm, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="problems_per_part"):
        P.sample_in_parts(eos_lm(), tiny_tokenizer, PROMPTS, CFG, tmp_path, problems_per_part=0)


def test_an_unreadable_part_is_sampled_again(eos_lm, tiny_tokenizer, tmp_path):
    model = eos_lm()
    whole = P.sample_in_parts(model, tiny_tokenizer, PROMPTS, CFG, tmp_path, identity="m", problems_per_part=2)
    (tmp_path / "part-0001.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # cut off mid-write
    with pytest.warns(UserWarning, match="part-0001.safetensors cannot be read"):
        again = P.sample_in_parts(model, tiny_tokenizer, PROMPTS, CFG, tmp_path, identity="m", problems_per_part=2)
    same(again, whole)

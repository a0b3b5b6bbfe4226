"""The organism: tokenizer round-trips, safe checkpoint loading, backends agree on the shipped base."""


import pytest
import torch

from experiments.paths import ORGANISMS_DIR
from experiments.training.model import OrganismConfig, build_organism, save_checkpoint
from experiments.training.tokenizer import build_tokenizer, load_tokenizer
from probe.models.checkpoint import CheckpointError, load_causal_lm, validate_checkpoint
from probe.tasks.countdown import Countdown

BASE = ORGANISMS_DIR / "base"
TEXT = "3,5,12|24:5-3=2;12*2=24"


@pytest.fixture(scope="module")
def saved_organism(tmp_path_factory):
    path = tmp_path_factory.mktemp("organism") / "ckpt"
    model, tok = build_organism(OrganismConfig(depth=2), seed=0)
    save_checkpoint(model, tok, path)
    return path, model, tok


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tok = build_tokenizer()
    ids = tok(TEXT).input_ids
    assert tok.convert_ids_to_tokens(ids) == list(TEXT), "every character must be its own token"
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == TEXT
    for p in Countdown().heldout()[:50]:
        assert tok.decode(tok(p.prompt).input_ids) == p.prompt


def test_tokenizer_loads_back_identically_through_autotokenizer_tl_and_nnsight(saved_organism):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from probe.models.backends import load_hooked_transformer, load_nnsight

    path, _, tok = saved_organism
    want = tok(TEXT).input_ids
    auto = AutoTokenizer.from_pretrained(str(path))
    assert isinstance(auto, PreTrainedTokenizerFast)
    assert auto(TEXT).input_ids == want, "AutoTokenizer swapped the tokenizer (the Qwen2 trap)"
    assert load_tokenizer(path)(TEXT).input_ids == want
    tl = load_hooked_transformer(path, device="cpu")
    assert tl.to_tokens(TEXT, prepend_bos=False)[0].tolist() == want, "TransformerLens re-tokenizes differently"
    nn = load_nnsight(path, device="cpu")
    assert nn.tokenizer(TEXT).input_ids == want, "nnsight re-tokenizes differently"
    Countdown().check_tokenizer(auto)


def test_check_tokenizer_rejects_a_tokenizer_without_task_tokens(tiny_tokenizer):
    with pytest.raises(ValueError, match="lacks Countdown token"):
        Countdown().check_tokenizer(tiny_tokenizer)


def test_checkpoint_errors_name_the_problem(tmp_path, saved_organism):
    path, model, _ = saved_organism
    with pytest.raises(CheckpointError, match="does not exist"):
        validate_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        validate_checkpoint(empty)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        validate_checkpoint(pickled)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), corrupt / "model.safetensors")  # a pickle under the wrong name
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        validate_checkpoint(corrupt)
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        validate_checkpoint(corrupt)


def _assert_backends_agree(path):
    from probe.models.backends import load_hooked_transformer, load_nnsight

    hf, tok = load_causal_lm(path, device="cpu")
    ids = torch.tensor([tok(p.prompt + "5-3=2;12*2=24").input_ids for p in Countdown().heldout()[:4]
                        if len(p.prompt) == 10][:2] or [tok(TEXT).input_ids])
    with torch.no_grad():
        ref = hf(ids).logits
        tl = load_hooked_transformer(path, device="cpu")(ids)
        nn = load_nnsight(path, device="cpu")
        with nn.trace(ids):
            out = nn.output.save()
    assert torch.allclose(tl, ref, atol=1e-4), f"TransformerLens logits differ by {(tl - ref).abs().max():.2e}"
    assert torch.allclose(out.logits, ref, atol=1e-5), "nnsight logits differ from transformers"


def test_backends_agree_on_a_fresh_organism(saved_organism):
    _assert_backends_agree(saved_organism[0])


def test_shipped_base_gives_the_same_logits_through_every_backend():
    _assert_backends_agree(BASE)




def test_config_flags_convert_tuple_elements_to_their_type():
    import argparse
    from dataclasses import dataclass

    from experiments.cli_args import add_config_args, config_from_args

    @dataclass
    class Cfg:
        coefs: tuple[float, ...] = (1.0,)
        """Coefficients."""
        layers: tuple[int, ...] = (2,)
        """Layers."""

    parser = argparse.ArgumentParser()
    add_config_args(parser, Cfg)
    cfg = config_from_args(Cfg, parser.parse_args(["--coefs", "2", "3.5", "--layers", "1", "3"]))
    assert cfg.coefs == (2.0, 3.5) and cfg.layers == (1, 3), "list flags must arrive typed, not as strings"

"""SFT of the base organism: loss goes down, interrupted + resumed == uninterrupted."""

import pytest
import torch
from safetensors.torch import load_file

from experiments.training.sft import SFTConfig, encode_batch, train_sft
from experiments.training.tokenizer import build_tokenizer


def _cfg(out, **kw):
    base = dict(out=str(out), depth=1, steps=8, batch_size=16, lr=3e-3, warmup=2, save_every=3,
                eval_samples=0, device="cpu")
    return SFTConfig(**{**base, **kw})


def test_labels_cover_answer_and_eos_only():
    tok = build_tokenizer()
    ids, mask, labels = encode_batch(tok, ["3,5,12|24:", "1,2,3|6:"], ["5-3=2;12*2=24", "1+2=3;3+3=6"])
    assert ids.shape == labels.shape == mask.shape
    row = labels[0][labels[0] != -100].tolist()
    assert tok.decode(row) == "5-3=2;12*2=24<eos>", "loss must cover exactly the answer and <eos>"
    assert (labels[1][mask[1] == 0] == -100).all(), "padding must carry no loss"


@pytest.mark.slow
def test_few_steps_lower_the_loss(tmp_path):
    s = train_sft(_cfg(tmp_path / "run", steps=30, save_every=100))
    assert s["loss_last"] < s["loss_first"] - 0.3, s


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        train_sft(_cfg(tmp_path / "full"))
        stopped = train_sft(_cfg(tmp_path / "resumed"), stop_after=5)  # killed at 5: last save at 3
        assert stopped["stopped_early"]
        train_sft(_cfg(tmp_path / "resumed"))
    finally:
        torch.use_deterministic_algorithms(False)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume: resumption is not exact"


def test_bad_sft_config_is_rejected_before_work():
    with pytest.raises(ValueError, match="steps"):
        SFTConfig(steps=0)

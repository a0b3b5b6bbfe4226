"""Every forward pass over all positions is batched within the memory budget (probe.models.budget),
and the batching changes no number: the SAE's answer NLL, activation collection, the steering
vectors' residuals."""

from __future__ import annotations

import pytest
import torch

from probe.models import budget
from probe.models.pair import wrap
from probe.sae.dictionary import collect_activations
from probe.sae.quality import answer_nll


def test_logit_and_activation_passes_stay_within_the_budget(tiny_lm, tiny_tokenizer, monkeypatch):
    hf = tiny_lm("qwen2")
    model = wrap(hf, tiny_tokenizer, backend="nnsight", device="cpu")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 60, (12, 10), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    answer = torch.zeros_like(mask)
    answer[:, 5:] = True
    site = "blocks.0.hook_resid_post"
    full_nll = answer_nll(model, tokens, mask, answer, batch_size=64)
    full_act = collect_activations(model, tokens, mask, mask, site, batch_size=64)

    rows: list[int] = []
    hf.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    per_row = budget.forward_rows(hf, 10, budget=10**12)
    gb = 2.5 * 10**12 / per_row / 2**30  # room for two rows of every position's logits
    monkeypatch.setenv("FORKSIGHT_MEMORY_GB", str(gb))
    assert budget.forward_rows(hf, 10) == 2
    assert answer_nll(model, tokens, mask, answer, batch_size=64) == pytest.approx(full_nll, rel=1e-5)
    assert max(rows) == 2, f"answer_nll ran {max(rows)} rows at once within a budget for 2"
    rows.clear()
    cap = budget.activation_rows(hf, 10)
    got = collect_activations(model, tokens, mask, mask, site, batch_size=64)
    assert torch.allclose(got, full_act, atol=1e-6) and max(rows) <= cap


def test_a_forward_stopped_at_a_block_fits_many_more_rows_on_a_large_vocabulary():
    from types import SimpleNamespace

    from transformers import LlamaConfig

    smol = SimpleNamespace(config=LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                              num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152),
                           parameters=lambda: iter([]))
    gb5 = 5 * 2**30
    assert budget.activation_rows(smol, 612, gb5) >= 10 * budget.forward_rows(smol, 612, gb5), \
        "SmolLM2-135M at 612 positions: logits of every position dominate a teacher-forced batch"


def test_length_chunks_order_rows_by_length_and_cut_the_padding():
    """Teacher-forced chunks hold rows of similar length, each cut to its longest row: short answers
    beside one that ran to the budget pay for the padding only in that row's chunk."""
    lengths = torch.tensor([3, 9, 2, 9, 5, 1])
    attn = (torch.arange(10)[None] < lengths[:, None]).long()
    chunks = budget.length_chunks(attn, lambda n: 2)
    assert [sorted(r.tolist()) for r, _ in chunks] == [[1, 3], [0, 4], [2, 5]]
    assert [n for _, n in chunks] == [9, 5, 2], "each chunk is cut to its longest row"
    assert [len(r) for r, _ in budget.length_chunks(attn, lambda n: 20 // n)] == [2, 4], \
        "the rows per chunk are budgeted at the chunk's own length (20 // 9, then 20 // 5 for the rest)"
    left = torch.ones(3, 10, dtype=torch.long)
    left[0, :4] = 0  # left padding: a row that ends at the last position is never cut
    assert budget.length_chunks(left, lambda n: 3)[0][1] == 10


def test_answer_nll_of_ragged_rows_equals_each_row_alone(tiny_lm, tiny_tokenizer):
    """Right-padded rows of different lengths: chunking them by length and cutting the padding gives
    the NLL each row has on its own."""
    model = wrap(tiny_lm("qwen2"), tiny_tokenizer, backend="nnsight", device="cpu")
    g = torch.Generator().manual_seed(1)
    lengths = [10, 4, 7, 2, 9, 6]
    tokens = torch.randint(3, 60, (len(lengths), 10), generator=g)
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    tokens[~mask] = 0
    answer = mask & (torch.arange(10)[None] >= 1)
    got = answer_nll(model, tokens, mask, answer, batch_size=2)
    per_row = [answer_nll(model, tokens[i:i + 1, :n], mask[i:i + 1, :n], answer[i:i + 1, :n]) * (n - 1)
               for i, n in enumerate(lengths)]
    assert got == pytest.approx(sum(per_row) / int(answer.sum()), rel=1e-5)

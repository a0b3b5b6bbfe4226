"""The organism's tokenizer: one token per character, digits split as Qwen2.5 splits them.

Trap guarded against (docs/architecture.md, "Library traps"): for a directory whose `config.json` says
`qwen2`, transformers 5 `AutoTokenizer` always builds a `Qwen2Tokenizer` (qwen2 is in its
`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` list), which rebuilds the pipeline from the vocabulary
and merges with Qwen's own pre-tokenizer (a regex that isolates every digit, then byte-level).
A word-level tokenizer saved beside a Qwen2 model therefore loads back as a *different* tokenizer.

So the organism's tokenizer *is* a `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`): a BPE with no
merges over a vocabulary of single characters. Countdown text has no spaces (`3,5,12|24:` then
`5-3=2;12*2=24`), so under Qwen's pre-tokenizer every character is its own token, exactly as the
saved tokenizer does, and every loader (`AutoTokenizer`, TransformerLens, nnsight) agrees. This is
also how real Qwen2.5 checkpoints tokenize numbers: one digit per token.
There is no BOS token (Qwen2 uses none); `<eos>` ends an answer and `<pad>` pads.

Text with spaces (the word-problem organism, `build_text_tokenizer`) keeps the same construction:
Qwen's pre-tokenizer ends in a byte-level step that writes a space as 'Ġ' and a newline as 'Ċ'
(GPT-2's byte alphabet), so a vocabulary of the byte-level images of printable ASCII plus newline,
with no merges, is still one token per character under every loader, and decodes back to the text
(round trip through AutoTokenizer, TransformerLens and nnsight tested). Characters outside it are
dropped by the tokenizer, so the text task checks that its prompts round-trip
(`MathTask.check_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from probe.tasks.countdown import ANSWER_MARK, END_TOKEN, EQ, LIST_SEP, OPS, SEP, TARGET_MARK
from probe.tasks.math_task import byte_alphabet

PAD, EOS = "<pad>", END_TOKEN
SPECIALS = (PAD, EOS)
CHARS = ("0123456789", *OPS, EQ, SEP, LIST_SEP, TARGET_MARK, ANSWER_MARK)


def vocabulary() -> list[str]:
    """Specials, then digits, then symbols. Stable order = stable ids."""
    return [*SPECIALS, *"0123456789", *OPS, EQ, SEP, LIST_SEP, TARGET_MARK, ANSWER_MARK]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh organism tokenizer (a `Qwen2Tokenizer`, i.e. a `PreTrainedTokenizerFast`)."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )
    tok.padding_side = "left"
    return tok


def text_vocabulary() -> list[str]:
    """Specials, then printable ASCII (space to '~') and newline, as byte-level token strings."""
    image = {b: c for c, b in byte_alphabet().items()}  # byte -> its byte-level character
    return [*SPECIALS, *(image[b] for b in (*range(32, 127), 10))]


def build_text_tokenizer(max_length: int = 256) -> PreTrainedTokenizerFast:
    """A character-level tokenizer for natural-language text (printable ASCII and newline), built like
    `build_tokenizer` (a `Qwen2Tokenizer` with no merges), so it survives `AutoTokenizer`."""
    vocab = {tok: i for i, tok in enumerate(text_vocabulary())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=EOS, pad_token=PAD,
                         clean_up_tokenization_spaces=False, model_max_length=max_length)
    tok.padding_side = "left"
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved beside a checkpoint (through `AutoTokenizer`, as any user would)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json: not an organism checkpoint directory "
            "(expected config.json, model.safetensors and tokenizer files saved by forksight)"
        )
    return AutoTokenizer.from_pretrained(str(path))

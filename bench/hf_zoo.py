"""The tiny-model zoo: every type in transformers' causal-LM mapping, classified and built tiny.

What it is: the list `bench/coverage.py` and `tests/test_hf_coverage.py` sweep. `classify(model_type)`
decides, by the documented rules below, whether a type is a decoder-only text model; `tiny_config`
builds its config from the config class's own defaults with small sizes set generically by
attribute name (plus `PER_TYPE` where a type needs more); `build(model_type)` returns a random
model on the CPU. Nothing is downloaded: configs and weights are made here.

Rules, applied in order to `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (the first that matches excludes):
1. `encoder-decoder`: the config's default `is_encoder_decoder` is True (its causal-LM class is
   the decoder half of a seq2seq model: BART, Marian, Whisper, ...).
2. `encoder family`: the type also has a masked-LM head (`MODEL_FOR_MASKED_LM_MAPPING_NAMES`):
   a bidirectional encoder run with a causal mask (BERT, RoBERTa, ...).
3. `multimodal`: the config has a vision, audio, image-quantiser or speech sub-config, pixel
   inputs (`num_channels` / `image_size`), or the mapped class is a `*ForConditionalGeneration`
   (Gemma 3, Llama 4, Moshi, Fuyu, ...).
4. `config not buildable from its defaults`: the config class refuses its own defaults.
Everything else is a decoder-only text type and is attempted; a type whose tiny model cannot be
built or run (e.g. it needs a GPU kernel) is "not built", with the error.

What it is not: a test (the checks live in `bench/coverage.py`) or a model registry for users.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

VOCAB, PAD, BOS, EOS = 128, 0, 1, 2

SIZES: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
    "max_position_embeddings": 256,
    # mixture of experts
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "dense_intermediate_size": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "first_k_dense_replace": 1,
    "num_dense_layers": 1, "decoder_sparse_step": 1,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # windows: smaller than the sweep's sequences, so the sliding caches really slide
    "sliding_window": 8, "attention_chunk_size": 8, "sliding_window_size": 8,
    "attention_window_size": 8, "local_attention_window_len": 8,
    # state-space / linear attention
    "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_n_heads": 4, "mamba_d_head": 32,
    "mamba_n_groups": 1, "mamba_chunk_size": 16, "mamba_num_heads": 4, "mamba_head_dim": 32,
    "mamba_headdim": 32, "mamba_ngroups": 1, "state_size": 8, "ssm_state_size": 8, "n_mamba_heads": 2,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_heads": 4, "linear_head_dim": 16, "linear_conv_kernel_dim": 4,
    "chunk_size": 16, "time_step_rank": 8, "lru_width": 64, "mamba_dt_rank": 8, "n_groups": 1,
    # other names for the same sizes
    "rotary_dim": 8, "dim_head": 16, "dim_ff": 128, "dff": 128, "o_lora_rank": 16,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "laurel_rank": 8,
    "unpadded_vocab_size": VOCAB, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
    "swa_head_dim": 16, "hidden_size_global": 64, "encoder_hash_byte_group_vocab": 64,
    "backbone_hidden_size": 64, "num_centroids": 16, "centroid_intermediate_top_k": 4,
    "first_dense_intermediate_size": 128,
    "index_num_heads": 2,  # at most the query heads per key head (4 / 2); validators reject more
}
"""Small sizes, set on every config that has the attribute (directly or through attribute_map)."""

PER_LAYER_INDEX_LISTS = ("mlp_only_layers", "full_attn_idxs", "moe_layers", "hybrid_layer_ids")
"""Attributes that list layer indices (remapped when layers are picked), not one value per layer."""

PER_TYPE: dict[str, dict[str, Any]] = {
    # hybrids whose default tiny pattern has no attention layer (HF's own forward then fails)
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # default None: the model cannot be built
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2,  # weight ties
              "attention_hidden_size": 128, "attention_head_dim": 32},                      # need 2 hybrids
    # sizes under other names, or that must agree with each other
    "dbrx": {"d_model": 64,  # the modelling code reads rope_theta and clip_qkv from attn_config
             "attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
             "ffn_config": {"hidden_size": 64, "ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "dots3_note_text": {"num_key_value_heads": 4, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4,
                        "swa_q_lora_rank": 32, "swa_kv_lora_rank": 16, "swa_head_dim": 16,
                        "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 16},
    "falcon_h1": {"mamba_d_ssm": 128, "mamba_d_head": 32},
    "mamba2": {"num_heads": 4, "head_dim": 32},
    "xlnet": {"d_head": 16},
    "zamba2": {"n_mamba_heads": 4, "attention_head_dim": 32, "kv_channels": 32, "num_query_groups": 4,
               "adapter_rank": 8},
    # defaults the config class's own validation or modelling code rejects
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "gemma3n_text": {"num_kv_shared_layers": 0},  # KV sharing needs more layers than a tiny model has
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 8, "indexer_compress_ratio": 2},  # indexed layers need an indexer
    "xlstm": {"num_heads": 4, "qk_dim_factor": 1.0},  # 0.5 trips a shape check in its native kernel
    "zaya": {"num_experts_per_tok": 1},  # "ZAYA currently supports num_experts_per_tok=1 only"
}
"""Extra config overrides for the few types the generic sizes do not fit (model_type -> kwargs)."""


@dataclass
class ZooEntry:
    """One causal-LM type and what the rules say about it."""

    model_type: str
    class_name: str
    excluded: str | None
    """None for a decoder-only text type; else the rule that excludes it and why."""


def classify(model_type: str) -> ZooEntry:
    """Apply the module docstring's rules to one type of the causal-LM mapping."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = AutoConfig.for_model(model_type)
    except Exception as e:  # noqa: BLE001 - the reason is the message
        return ZooEntry(model_type, cls, f"config not buildable from its defaults: {type(e).__name__}: "
                                         f"{_first_line(e)}")
    if getattr(cfg, "is_encoder_decoder", False):
        return ZooEntry(model_type, cls, "encoder-decoder: the causal-LM class is the decoder of a seq2seq model")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return ZooEntry(model_type, cls, "encoder family: also has a masked-LM head (bidirectional encoder)")
    subs = [k for k in (getattr(cfg, "sub_configs", None) or {})
            if any(w in k for w in ("vision", "audio", "vq", "image", "speech"))]
    pixels = [k for k in ("num_channels", "image_size") if hasattr(cfg, k)]
    if subs or pixels or cls.endswith("ForConditionalGeneration"):
        why = (f"sub-configs {subs}" if subs else f"pixel inputs ({', '.join(pixels)})" if pixels
               else f"{cls} is a conditional-generation model")
        return ZooEntry(model_type, cls, f"multimodal: {why}")
    return ZooEntry(model_type, cls, None)


def zoo() -> list[ZooEntry]:
    """Every type of the installed transformers' causal-LM mapping, classified, sorted by name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [classify(t) for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return (lines[0] if lines else "")[:200]


def _layer_picks(per_layer: dict[str, list], n_default: int) -> list[int]:
    """Indices of the default model's layers to keep: the first layer of every distinct kind
    (kinds from the per-layer lists), at least two."""
    picks, seen = [], set()
    for i in range(n_default):
        sig = tuple(repr(v[i]) for v in per_layer.values())
        if sig not in seen:
            seen.add(sig)
            picks.append(i)
    for i in range(n_default):
        if len(picks) >= 2:
            break
        if i not in picks:
            picks.append(i)
    return sorted(picks)[:4]


def tiny_config(model_type: str):
    """The config class's defaults with `SIZES` applied by attribute name (in sub-configs too),
    per-layer lists (`layer_types`, ...) cut to the first layer of each distinct kind (so a hybrid
    keeps one layer of each), and `PER_TYPE[model_type]` on top."""
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = AutoConfig.for_model(model_type)
    d = default.to_dict()
    names = set(d) | set(getattr(default, "attribute_map", {}) or {})
    kw = {k: v for k, v in SIZES.items() if k in names}
    if "kv_lora_rank" in names:  # latent attention: head_dim is the rotary part; no kv grouping
        kw.update(head_dim=SIZES["qk_rope_head_dim"], num_key_value_heads=SIZES["num_attention_heads"])
    n_default = getattr(default, "num_hidden_layers", None)
    if isinstance(n_default, int) and n_default > 0:
        per_layer = {k: v for k, v in d.items()
                     if isinstance(v, list) and len(v) == n_default and k not in PER_LAYER_INDEX_LISTS}
        picks = _layer_picks(per_layer, n_default) if per_layer else list(range(2))
        kw["num_hidden_layers"] = len(picks)
        for k, v in per_layer.items():
            kw[k] = [v[i] for i in picks]
            if k == "intermediate_size":
                kw[k] = [SIZES["intermediate_size"]] * len(picks)
        for k in PER_LAYER_INDEX_LISTS:
            if isinstance(d.get(k), list):
                kw[k] = [picks.index(i) for i in d[k] if i in picks]
    for k in getattr(default, "sub_configs", None) or {}:  # text / encoder / ... sub-configs
        sub = getattr(default, k, None)
        if sub is not None and hasattr(sub, "to_dict"):
            sub_names = set(sub.to_dict()) | set(getattr(sub, "attribute_map", {}) or {})
            kw[k] = {n: v for n, v in SIZES.items() if n in sub_names}
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if k in names:
            kw[k] = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}[k]
    kw.update(PER_TYPE.get(model_type, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(model_type, **kw)


MAX_PARAMS = 2_000_000
"""A tiny model larger than this is refused before its weights exist (sizes SIZES does not reach)."""


class NotTinyError(RuntimeError):
    """The tiny config still describes a large model (an attribute the generic sizes miss)."""


def build(model_type: str, seed: int = 0):
    """A random tiny model of `model_type` in eval mode (float32, CPU). The model is first made on
    the meta device to count its parameters: more than `MAX_PARAMS` raises `NotTinyError`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in shell.parameters())
        if n > MAX_PARAMS:
            raise NotTinyError(f"the tiny config of {model_type!r} still has {n:,} parameters "
                               f"(> {MAX_PARAMS:,}): a size attribute SIZES does not reach. Fix: add it to "
                               "bench.hf_zoo.PER_TYPE.")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()

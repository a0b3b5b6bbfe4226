"""Branch sampler: n samples per prompt from any Hugging Face causal LM, batched and KV-cached.

What it is: the toolkit's measuring instrument and the RL trainer's rollout source. Rows are
(prompt i, sample j), prompt-major (row = i * n + j). Each batch of rows prefills every unique
prompt once (left-padded, `position_ids = cumsum(mask) - 1`), expands its KV cache to the
rows, then decodes one token per step until every row has emitted eos or `max_new_tokens`. Rows
that finished are dropped from the forward batch once a quarter of it has finished.

Exactness: the randomness of row (i, j) at step t is one uniform from `probe.sampling.rng`, a pure
function of (seed, prompt key, j, t), turned into a token by inverse-CDF sampling (float64 CDF).
So a prompt sampled alone with `prompt_keys=[5]` equals row block 5 of a batched run, and the same
config gives the same samples bit for bit. (Float matmuls may differ in the last bit between batch
shapes; a token flips only if a uniform lands within ~1e-7 of a CDF boundary.)

Distributions: logits (float32) / temperature -> top-k -> top-p -> log_softmax. `logprobs` and
`entropy` are of that filtered distribution, the one actually sampled from. Temperature 0 is
greedy (argmax); `logprobs` and `entropy` are then those of the temperature-1 distribution (with
top-k / top-p as configured), since the point mass actually used has entropy 0. Top-k keeps ties
with the k-th logit; top-p keeps the smallest prefix (by descending prob) whose mass reaches p.

Interventions, one entry point: `intervention(state)` is called once per `sample_branches` call
with a mutable `SamplingState` and returns a context manager, which is entered once, before the
first forward pass, and exited after the last one (in `finally`, also when sampling raises). In
between, the sampler updates `state` in place before every forward pass of every batch (prompt
and each generated token): hooks registered on entry read it to act per step and per row. During
the prompt phase the forward batch has one item per prefill (by default one per unique prompt,
shared by its n samples): `state.row_ids` is -1 there and `state.sample_index` holds a
representative sample. An intervention that must treat a prompt's samples differently from the
first token on (e.g. steer only some of them) defines `prefill_groups(n) -> [n] group ids`:
samples in different groups get separate prefills, so each group's prompt activations can differ.
One that runs other models in step with the sampled one (a shadow model with its own KV cache)
lists them as `kv_models`, so the memory budget counts their caches too.

    @contextmanager
    def steer(state, v=torch.randn(64), layer=1):          # add v to layer 1's output,
        def hook(mod, args, out):                          # only while generating
            return out + v if state.phase == "generate" else out
        handle = model.model.layers[layer].register_forward_hook(hook)
        try: yield
        finally: handle.remove()
    branches = sample_branches(model, tok, prompts, SamplerConfig(n=8), intervention=steer)

Caches: each family's own (`probe.models.kv_cache`): the prefill starts from the cache `generate` would
make (`DynamicCache(config=...)`, with sliding-window, chunked, indexed, linear-attention and
hybrid layers as the config's layer types say), or lets the model make its own (MiniMax, RWKV,
xLSTM) and reads it back; expanding a prompt's prefill to its n rows and dropping finished rows
select batch rows of every state the cache holds (`probe.models.kv_cache.select_rows`), and a cache that
cannot be reordered, or a forward that takes no cache, raises `probe.models.kv_cache.CacheError`.
`position_ids` are passed only to forwards that take them (recurrent and ALiBi models derive
positions themselves); where left padding is not safe (`probe.models.kv_cache.padding_unsafe`: no
`attention_mask`, or a family whose HF code lets padding change real tokens' outputs), prompts of
unequal length in one batch raise `PaddingError`; a family whose batched rows are not independent
(`probe.models.kv_cache.batch_unsafe`) runs only with `batch_size=1`.

Long generations: a prompt plus `max_new_tokens` longer than the model's context raises
`probe.models.budget.ContextLengthError` before anything is sampled; the rows of one forward batch are at
most `cfg.batch_size` and at most what fits the memory budget (`probe.models.budget.sampling_rows`: KV
cache of prompt + completion), so thousands of new tokens on a large model shrink the batch
instead of exhausting the device (rows are independent of their batch, so results do not change).
`progress=True` (or None: automatic, for jobs of more than ~1M row-steps on a terminal) shows a
progress bar over decoding steps.

What it is not: beam search, speculative decoding, stop strings, repetition penalties, or a
continuous-batching server. One eos id (the tokenizer's); padding uses `pad_token_id` (else eos).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from probe.models.budget import check_context, sampling_rows
from probe.models.kv_cache import (
    CacheError,
    batch_unsafe,
    cache_arg,
    new_cache,
    padding_unsafe,
    position_ids,
    returned_cache,
    select_rows,
    takes_logits_to_keep,
)
from probe.sampling.rng import counter_uniforms
from probe.sampling.types import Branches, SamplerConfig, SamplingState


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or inf logits: never sampled, always raised."""


class PaddingError(ValueError):
    """Prompts of unequal length in one batch of a model for which left padding is not safe
    (`probe.models.kv_cache.padding_unsafe`)."""


def filtered_logprobs(
    logits: Float[Tensor, "batch vocab"], temperature: float, top_k: int, top_p: float
) -> Float[Tensor, "batch vocab"]:
    """Log-probs (float32) of the sampling distribution: / temperature (0 -> 1), top-k, top-p;
    removed tokens get -inf."""
    x = logits.float()
    if temperature not in (0, 1):
        x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # [batch, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        p = sorted_x.softmax(-1)
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # mass strictly before the token already >= p
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return x.log_softmax(-1)


def _pad_left(prompts: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    """[p, L] ids and attention mask, left-padded to the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def as_token_lists(tokenizer, prompts, vocab: int) -> list[list[int]]:
    """Prompts (strings, tokenized with `tokenizer(...)`, or token-id lists) as validated id lists."""
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError(f"prompts={prompts!r} is invalid: allowed a non-empty list of strings or of "
                         "token-id lists. Fix: wrap a single prompt in a list: [prompt].")
    if all(isinstance(p, str) for p in prompts):
        out = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    elif all(not isinstance(p, str) for p in prompts):
        out = [[int(t) for t in p] for p in prompts]
    else:
        raise ValueError("prompts mixes strings and token-id lists. Fix: pass one kind only.")
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) has no tokens: allowed at least one "
                             "token. Fix: drop it or add text (e.g. a BOS token).")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}) (min {min(p)}, "
                             f"max {max(p)}). Fix: tokenize it with this model's tokenizer.")
    return out


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos id, pad id) of `tokenizer`; pad falls back to eos."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(f"tokenizer.eos_token_id={eos!r}: the sampler needs one int eos id to know "
                         "when a row ends. Fix: set tokenizer.eos_token = '<your eos token>'.")
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos, (pad if isinstance(pad, int) else eos)


def _resolve_device(model, cfg: SamplerConfig) -> torch.device:
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    want, have = torch.device(want), next(model.parameters()).device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ValueError(f"SamplerConfig.device={cfg.device!r} resolves to {want} but the model is on "
                         f"{have}. Fix: model.to('{want}') or SamplerConfig(device='{have}').")
    return have


def sample_branches(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    cfg: SamplerConfig,
    intervention: Callable[[SamplingState], AbstractContextManager] | None = None,
    prompt_keys: Sequence[int] | None = None,
    progress: bool | None = None,
) -> Branches:
    """Sample `cfg.n` continuations of each prompt; returns `Branches` with `len(prompts) * n` rows.

    `prompts`: strings (tokenized with `tokenizer(...)`, its special tokens included) or token-id
    lists. `prompt_keys`: the RNG key of each prompt (default: its index), so that a prompt sampled
    alone with its key reproduces its rows of a larger run. Raises `NonFiniteLogitsError` naming
    prompt index(es) and step when any active row's logits contain NaN or inf.
    """
    ids = as_token_lists(tokenizer, prompts, model.get_input_embeddings().num_embeddings)
    keys = list(range(len(ids))) if prompt_keys is None else [int(k) for k in prompt_keys]
    if len(keys) != len(ids):
        raise ValueError(f"prompt_keys has {len(keys)} keys for {len(ids)} prompts. Fix: one key per "
                         "prompt, or prompt_keys=None.")
    eos, pad = special_ids(tokenizer)
    dev = _resolve_device(model, cfg)
    check_context(model, tokenizer, ids, cfg.max_new_tokens)
    params = inspect.signature(type(model).forward).parameters
    fwd = (cache_arg(model),  # "cache" in transformers 5.x; some families name it otherwise
           {"use_cache": True, **({"logits_to_keep": 1} if takes_logits_to_keep(model) else {})},
           {k for k in ("position_ids", "attention_mask") if k in params}, padding_unsafe(model), batch_unsafe(model))
    rows, n, steps = len(ids) * cfg.n, cfg.n, cfg.max_new_tokens
    out_tok = torch.full((rows, steps), pad, dtype=torch.long, device=dev)
    out_mask = torch.zeros((rows, steps), dtype=torch.bool, device=dev)
    out_lp = torch.zeros((rows, steps), dtype=torch.float32, device=dev)
    out_ent = torch.zeros((rows, steps), dtype=torch.float32, device=dev)
    key_t = torch.tensor(keys, dtype=torch.long, device=dev)
    state = SamplingState()
    groups = prefill_groups(intervention, cfg.n, dev)
    was_training = model.training
    extra = tuple(getattr(intervention, "kv_models", ()) or ())  # models run in step (a shadow's KV cache)
    bs = min(cfg.batch_size, sampling_rows(model, max(map(len, ids)) + steps, extra_models=extra))
    n_batches = -(-rows // bs)
    show = progress if progress is not None else (rows * steps >= 2**20 and sys.stderr.isatty())
    bar = tqdm(total=n_batches * steps, desc="sampling", unit="step", leave=False, disable=not show)
    model.eval()
    try:
        with torch.inference_mode(), (intervention(state) if intervention else nullcontext()):
            for b, r0 in enumerate(range(0, rows, bs)):
                row_ids = torch.arange(r0, min(r0 + bs, rows), device=dev)
                _run_batch(model, fwd, ids, key_t, row_ids, cfg, eos, pad, state, intervention is not None,
                           groups, (out_tok, out_mask, out_lp, out_ent), bar)
                bar.update((b + 1) * steps - bar.n)  # a batch that finished early skips its remaining steps
    finally:
        bar.close()
        model.train(was_training)
    eos_hit = ((out_tok == eos) & out_mask).any(-1).tolist()
    all_rows = torch.arange(rows, device=dev)
    return Branches(all_rows // n, all_rows % n, out_tok, out_mask, out_lp, out_ent,
                    ["eos" if e else "length" for e in eos_hit], ids)


def prefill_groups(intervention: Any, n: int, device) -> Int[Tensor, " n"]:
    """Prefill group of each sample index 0..n-1: `intervention.prefill_groups(n)` if it defines
    one (samples of a prompt in different groups get separate prefills), else all 0."""
    fn = getattr(intervention, "prefill_groups", None)
    if fn is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    g = torch.as_tensor(fn(n), dtype=torch.long, device=device)
    if g.shape != (n,):
        raise ValueError(f"intervention.prefill_groups({n}) returned shape {tuple(g.shape)}; expected ({n},): "
                         "one group id per sample index")
    return g


def _run_batch(model, fwd, ids, key_t, row_ids, cfg, eos, pad, state, track, groups, outs, bar=None) -> None:
    """Prefill the unique (prompt, prefill group) items of `row_ids`, expand to rows, decode;
    write into `outs`."""
    out_tok, out_mask, out_lp, out_ent = outs
    n, steps, dev = cfg.n, cfg.max_new_tokens, row_ids.device
    p_row = row_ids // n  # [B] prompt index per row
    item_key = p_row * n + groups[row_ids % n]  # [B] (prompt, group), prompt-major like the rows
    keys, sel = torch.unique(item_key, return_inverse=True)  # sorted: prompt-major; sel: [B] item of each row
    first = torch.zeros(len(keys), dtype=torch.long, device=dev).scatter_reduce(
        0, sel, row_ids, reduce="amin", include_self=False)  # [P] a representative row of each item
    item_prompt = (first // n).tolist()
    inp, attn = _pad_left([ids[i] for i in item_prompt], pad, dev)  # [P, L]
    pos = position_ids(attn)  # [P, L]
    name, extra, takes, unsafe, unbatched = fwd
    if unbatched and len(row_ids) > 1:
        raise CacheError(f"rows of one forward batch are not independent in {type(model).__name__}: {unbatched}. "
                         "Fix: SamplerConfig(batch_size=1) (one row per forward, each prefilled alone).")
    if unsafe and not bool(attn.all()):
        raise PaddingError(f"prompts {sorted(set(item_prompt))} of one batch differ in length, and left padding is not "
                           f"safe for {type(model).__name__}: {unsafe}. Fix: SamplerConfig(batch_size={cfg.n}) "
                           "(one prompt per forward), or prompts of equal length.")
    cache = new_cache(model)  # None: the model makes its own in the prefill

    def forward(input_ids, mask, positions):
        kw = {**extra, **({name: cache} if cache is not None else {})}
        kw |= {"attention_mask": mask} if "attention_mask" in takes else {}
        kw |= {"position_ids": positions} if "position_ids" in takes else {}
        return model(input_ids=input_ids, **kw)
    if track:
        state.step, state.phase, state.position_ids = -1, "prompt", pos
        state.row_ids = torch.full((len(keys),), -1, dtype=torch.long, device=dev)
        state.prompt_index = first // n
        state.sample_index = first % n  # a representative: every sample of the item shares its group
        state.active = torch.ones(len(keys), dtype=torch.bool, device=dev)
        state.tokens = torch.empty(len(keys), 0, dtype=torch.long, device=dev)
    out = forward(inp, attn, pos)
    logits = out.logits[:, -1]
    cache = cache if cache is not None else returned_cache(out, name)
    if len(keys) != len(row_ids):
        cache = select_rows(cache, sel)
        logits = logits[sel]
    width = attn.shape[1]
    attn = torch.cat([attn[sel], attn.new_ones(len(row_ids), steps)], dim=1)  # [B, L + steps]
    next_pos = pos[sel, -1:] + 1  # [B, 1]
    uniforms = None
    if cfg.temperature > 0:
        uniforms = counter_uniforms(cfg.seed, key_t[p_row], row_ids % n, steps)  # [B, steps]
    loc = row_ids  # global rows of the current forward batch (shrinks when rows are dropped)
    active = torch.ones(len(row_ids), dtype=torch.bool, device=dev)
    for t in range(steps):
        logp = filtered_logprobs(logits, cfg.temperature, cfg.top_k, cfg.top_p)  # [b, V]
        prob = logp.exp()  # [b, V]
        if uniforms is None:
            tok = logits.argmax(-1)
        else:  # inverse CDF: first token whose cumulative mass exceeds u * total (< total)
            cdf = prob.double().cumsum(-1)  # [b, V]
            total = cdf[:, -1:]
            u = torch.minimum(uniforms[:, t, None] * total, torch.nextafter(total, total.new_zeros(())))
            tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # [b]
        bad = ~torch.isfinite(logits).all(-1) & active  # [b]
        lp = logp.gather(-1, tok[:, None].clamp_max(logp.shape[-1] - 1)).squeeze(-1)
        ent = -torch.where(prob > 0, prob * logp, 0.0).sum(-1)
        out_tok[loc, t] = torch.where(active, tok, pad)
        out_mask[loc, t] = active
        out_lp[loc, t] = torch.where(active, lp, 0.0)
        out_ent[loc, t] = torch.where(active, ent, 0.0)
        active = active & (tok != eos)
        any_bad, n_active = torch.stack([bad.any().long(), active.sum()]).tolist()
        if bar is not None:
            bar.update(1)
        if any_bad:
            prompts = sorted(set((loc[bad] // n).tolist()))
            raise NonFiniteLogitsError(
                f"non-finite logits (NaN or inf) for prompt index(es) {prompts} at step {t} "
                f"(generated token {t}; rows {loc[bad].tolist()[:8]}). Nothing was sampled from "
                "them. Fix: check the "
                "model dtype (fp16 overflow), the weights, and any intervention hook.")
        if n_active == 0 or t == steps - 1:
            break
        if 4 * n_active <= 3 * len(loc):  # drop finished rows from the forward batch
            keep = active.nonzero().squeeze(-1)
            cache = select_rows(cache, keep)
            loc, active, tok, attn, next_pos = loc[keep], active[keep], tok[keep], attn[keep], next_pos[keep]
            if uniforms is not None:
                uniforms = uniforms[keep]
        if track:
            state.step, state.phase, state.position_ids = t, "generate", next_pos + t
            state.row_ids, state.prompt_index, state.sample_index, state.active = loc, loc // n, loc % n, active
            state.tokens = out_tok[loc, : t + 1]
        out = forward(tok[:, None], attn[:, : width + t + 1], next_pos + t)
        logits = out.logits[:, -1]
        cache = cache if getattr(out, name, None) is None else getattr(out, name)  # RWKV returns new states

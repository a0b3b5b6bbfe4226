"""How good an SAE is: reconstruction statistics and the next-token loss with it spliced in.

What it is:
- `replace_activation` / `splice`: a context manager that replaces the activation at a hook site
  with `fn(activation)` (e.g. the SAE reconstruction) through a torch hook on the Hugging Face
  module (`probe.models.hooks` resolves the site), removed in `finally`. It acts on `HookedModel.hf`, the
  model `hf_logits` and every loss here run, whichever backend the `HookedModel` uses.
- `reconstruction_stats`: L0, fraction of variance unexplained (FVU), dead fraction.
- `sae_quality`: both, on the real tokens of given trajectories but attention sinks
  (`probe.sae.sinks.sink_mask`), plus the answer-token loss clean, with the SAE spliced in, and
  mean-ablated (both leaving the sinks' own activation in place).

What it is not: training or loading SAEs (`probe.sae.dictionary`), feature analysis (`probe.sae.features`).
Choices where the literature varies:
- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all (non-sink) tokens pooled (one mean vector), the
  sae-lens / Gao et al. 2024 definition; L0 = mean number of features > 0 per token.
- Dead = never active on the evaluation tokens (not sae-lens's "not fired in the last N steps").
- The loss is the mean next-token NLL over answer tokens; "recovered" is
  (L_ablated - L_sae) / (L_ablated - L_clean) with mean ablation (the activation replaced by its
  mean over the evaluation's non-sink tokens), not zero ablation, which wrecks a residual stream.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from probe.entropy import entropy_and_logprob
from probe.models.budget import forward_rows, length_chunks
from probe.models.hooks import HookSiteError, hook_module, resolve_hook
from probe.models.kv_cache import position_ids
from probe.models.pair import HookedModel
from probe.sae.dictionary import check_sae, collect_activations
from probe.sae.sinks import find_sinks, sink_mask


@contextmanager
def replace_activation(model: HookedModel, hook_name: str, fn: Callable[[Tensor], Tensor]):
    """Within the block, the activation `hook_name` of `model.hf` is replaced by `fn(activation)`."""
    hook = resolve_hook(hook_name, model)
    if hook.post is not None:
        raise HookSiteError(f"cannot splice at {hook_name!r}: its value is post-processed ({hook.post}) from "
                            "the HF module. Fix: use a blocks.{L}.hook_* site.")
    handle = hook_module(model.hf, hook, lambda x: fn(x).to(x.dtype))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def splice(model: HookedModel, sae: SAE, hook_name: str | None = None, sink_threshold: float | None = None):
    """Within the block, `model.hf` runs with the SAE reconstruction in place of its activation;
    positions whose activation norm exceeds `sink_threshold` (attention sinks, which the SAE is
    not trained on: `probe.sae.sinks.sink_mask`) keep their own. With the default None every
    position is replaced, sinks included: on a pretrained model pass the threshold `sae_quality`
    reports, or the splice measures the sink's reconstruction."""
    name = check_sae(sae, model, hook_name).name

    def recon(x: Tensor) -> Tensor:
        out = sae(x.to(sae.dtype)).to(x.dtype)
        if sink_threshold is None:
            return out
        return torch.where(sink_mask(x, sink_threshold)[0][..., None], x, out)

    with replace_activation(model, name, recon):
        yield


def hf_logits(model: HookedModel, tokens: Int[Tensor, "rows pos"],
              attention_mask: Bool[Tensor, "rows pos"]) -> Float[Tensor, "rows pos vocab"]:
    """Logits of `model.hf` (where `replace_activation` hooks act), padding-safe position ids."""
    model.check_context(tokens.shape[1])
    attn = attention_mask.long().to(model.device)
    out = model.hf(input_ids=tokens.to(model.device), attention_mask=attn, position_ids=position_ids(attn))
    return out.logits.float()


def answer_nll(model: HookedModel, tokens: Int[Tensor, "rows pos"], attention_mask: Bool[Tensor, "rows pos"],
               answer_mask: Bool[Tensor, "rows pos"], batch_size: int = 64) -> float:
    """Mean next-token NLL (nats) of `model.hf` over the answer tokens (hooks in place apply); rows in
    chunks of similar length (`probe.models.budget.length_chunks`), so short rows skip the padding."""
    total, count = 0.0, int(answer_mask.sum())
    hf = getattr(model, "hf", None)
    with torch.inference_mode():  # rows by length, each chunk cut to its longest row; every position's logits: budgeted
        for rows, n in length_chunks(attention_mask, lambda n: min(batch_size, forward_rows(hf, n))):
            t = tokens[rows, :n]
            _, lp = entropy_and_logprob(hf_logits(model, t, attention_mask[rows, :n]), t.to(model.device))
            total -= lp[answer_mask[rows, :n].to(lp.device)].double().sum().item()
    return total / max(count, 1)


def reconstruction_stats(sae: SAE, x: Float[Tensor, "n d_in"], batch_size: int = 4096) -> tuple[dict, Tensor]:
    """({l0, fvu, dead_fraction, n_dead, n_tokens}, per-feature firing frequency [d_sae]) on `x`."""
    if x.shape[0] < 2:
        raise ValueError(f"{x.shape[0]} activation(s): FVU needs at least 2")
    fires, sq_err, l0 = torch.zeros(sae.cfg.d_sae), 0.0, 0.0
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(sae.device, sae.dtype)
            f = sae.encode(xb)
            sq_err += ((xb - sae.decode(f)) ** 2).sum().double().item()
            active = (f > 0).float()
            fires += active.sum(0).cpu()
            l0 += active.sum().item()
    chunks = range(0, x.shape[0], batch_size)  # float64 a chunk at a time: no full-size copies of x
    mean = sum(x[i : i + batch_size].double().sum(0) for i in chunks) / x.shape[0]
    var = sum(((x[i : i + batch_size].double() - mean) ** 2).sum().item() for i in chunks)
    freq = fires / x.shape[0]
    n_dead = int((fires == 0).sum())
    return {"l0": l0 / x.shape[0], "fvu": sq_err / var, "dead_fraction": n_dead / sae.cfg.d_sae,
            "n_dead": n_dead, "n_tokens": int(x.shape[0])}, freq


def sae_quality(
    sae: SAE,
    model: HookedModel,
    tokens: Int[Tensor, "rows pos"],
    attention_mask: Bool[Tensor, "rows pos"],
    answer_mask: Bool[Tensor, "rows pos"],
    hook_name: str | None = None,
    batch_size: int = 64,
) -> tuple[dict, Tensor]:
    """L0 / FVU / dead fraction on every real token but the attention sinks (`sink_mask`), and the
    answer-token loss clean, with the SAE spliced in, and mean-ablated (both at those same tokens:
    the sinks keep their own activation); returns (metrics, per-feature firing frequency)."""
    name = check_sae(sae, model, hook_name).name
    attn = attention_mask.bool()
    x = collect_activations(model, tokens, attn, attn, name, batch_size)
    sink, sinks = find_sinks(x)
    thr = sinks["sink_threshold"]
    x = x[~sink]
    rec, freq = reconstruction_stats(sae, x)
    args = (model, tokens, attn, answer_mask.bool(), batch_size)
    clean = answer_nll(*args)
    with splice(model, sae, name, sink_threshold=thr):
        spliced = answer_nll(*args)
    mean = x.mean(0).to(model.device)
    with replace_activation(model, name, lambda a: torch.where(sink_mask(a, thr)[0][..., None], a,
                                                               mean.to(a.dtype).expand_as(a))):
        ablated = answer_nll(*args)
    gap = ablated - clean
    return {"hook_name": name, **rec, "n_sink_tokens": sinks["n_sinks"], "sink_threshold": thr,
            "sink_variance_share": sinks["sink_variance_share"], "max_to_median_norm": sinks["max_to_median_norm"],
            "ce_loss_clean": clean, "ce_loss_spliced": spliced,
            "ce_loss_increase": spliced - clean, "ce_loss_mean_ablated": ablated,
            "ce_loss_recovered": (ablated - spliced) / gap if gap > 0 else None,
            "n_answer_tokens": int(answer_mask.sum())}, freq

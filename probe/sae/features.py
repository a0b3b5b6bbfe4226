"""SAE features at forks: which ones RL pruned or amplified, where they fire, what they promote.

What it is: pure functions over feature activations that were computed elsewhere
(`probe.sae.dictionary.encode` of both models' residuals on the *same* trajectories):
- `feature_diff`: per feature, activation frequency and mean activation over a token set (the fork
  tokens) under base vs RL, and a bounded change score.
- `rank_features`: the *pruned* features (active at base forks, suppressed in RL) or *amplified* ones.
- `top_contexts`: the highest-activating positions of a feature, rendered as text with the token
  they predict and whether that token is a fork; `trajectory_html` highlights forks for notebooks.
- `decoder_logit_effects` / `top_tokens`: which next tokens a feature's decoder direction promotes.

- `fork_feature_diff` runs the whole diff on given trajectories (teacher-forced stats, base forks,
  both models' residuals encoded) and `feature_records` turns its top features into JSON records.

What it is not: SAE training (`probe.sae.dictionary`), fork selection (`probe.forks`), or sampling (the
trajectories come in; `probe.sae.diff.sae_fork_diff` samples them from given prompts, and `forksight sae diff`
calls it on held-out problems).

Definitions and where they depart from the literature:
- "At a fork token t" means the residual at position t - 1, the one that *predicts* t (as
  `probe.entropy` aligns stats). Active = activation > 0. Mean activation includes the zeros.
- Change score r = (mean_rl - mean_base) / (mean_rl + mean_base), in [-1, 1] (0 where both are 0):
  scale-free across features, -1 = never fires in RL, r = -0.5 <=> mean dropped 3x. Pruned features
  are ranked by r ascending among those active at >= `min_freq` of base forks (ties: the more
  frequent in base first); amplified likewise with r descending and RL frequency. This is a plain
  effect size on paired tokens, with no significance test.
- Logit effect: the *direct* path only, as in logit-lens readings of SAE features (e.g. Bricken et
  al. 2023): the unit decoder direction d (rows of W_dec normalised, which also absorbs TopK's
  `rescale_acts_by_decoder_norm`) times the unembedding. With `through_final_norm` the final norm's
  elementwise weight is applied (and d centred first for LayerNorm), but its 1/rms(x) factor is
  dropped: a positive per-position scale that changes no token ranking. Effects are centred over
  the vocabulary (softmax ignores a shift). For layers below the last, blocks after the SAE's site
  are skipped, so this is an approximation there.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.entropy import PairStats, Trajectories, pair_stats
from probe.forks import fork_mask
from probe.models.hooks import resolve_hook
from probe.models.norms import NORM_CONVENTIONS, norm_gain
from probe.models.pair import Pair
from probe.sae.dictionary import check_sae, collect_activations, encode, predicting_positions

DIRECTIONS = ("pruned", "amplified")


@dataclass
class FeatureDiff:
    """Per-feature statistics of base vs RL over one token set (e.g. base forks)."""

    freq_base: Float[Tensor, " d_sae"]
    """Fraction of the tokens where the feature is active (> 0) in the base model."""
    freq_rl: Float[Tensor, " d_sae"]
    mean_base: Float[Tensor, " d_sae"]
    """Mean activation over the tokens, zeros included."""
    mean_rl: Float[Tensor, " d_sae"]
    score: Float[Tensor, " d_sae"]
    """(mean_rl - mean_base) / (mean_rl + mean_base) in [-1, 1]; 0 where both means are 0."""
    n_tokens: int

    def row(self, feature: int) -> dict[str, float]:
        return {k: getattr(self, k)[feature].item() for k in ("freq_base", "freq_rl", "mean_base", "mean_rl", "score")}


def feature_diff(
    acts_base: Float[Tensor, "n d_sae"], acts_rl: Float[Tensor, "n d_sae"], where: Bool[Tensor, " n"],
    chunk: int = 8192,
) -> FeatureDiff:
    """Frequency, mean activation and change score of every feature over the `where` tokens
    (accumulated `chunk` tokens at a time, in float64)."""
    if acts_base.shape != acts_rl.shape or acts_base.shape[0] != where.shape[0]:
        raise ValueError(f"acts_base {tuple(acts_base.shape)}, acts_rl {tuple(acts_rl.shape)} and where "
                         f"{tuple(where.shape)} must cover the same n tokens (acts of both models on one set)")
    n = int(where.sum())
    if n == 0:
        raise ValueError("no tokens selected (where is all False); a diff needs at least one fork token")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 (tokens per accumulation step)")
    idx = where.nonzero().squeeze(1).to(acts_base.device)
    d, dev = acts_base.shape[1], acts_base.device
    sums = {k: torch.zeros(d, dtype=torch.float64, device=dev) for k in ("b", "r")}
    fires = {k: torch.zeros(d, dtype=torch.int64, device=dev) for k in ("b", "r")}
    for i in range(0, n, chunk):  # sums and counts in chunks: no dense float64 copy of every token
        rows = idx[i : i + chunk]
        for k, a in (("b", acts_base), ("r", acts_rl)):
            x = a[rows]
            sums[k] += x.double().sum(0)
            fires[k] += (x > 0).sum(0)
    mb, mr = sums["b"] / n, sums["r"] / n
    total = mb + mr
    score = torch.where(total > 0, (mr - mb) / total.clamp_min(1e-30), torch.zeros_like(total))
    return FeatureDiff((fires["b"].double() / n).float().cpu(), (fires["r"].double() / n).float().cpu(),
                       mb.float().cpu(), mr.float().cpu(), score.float().cpu(), n)


def rank_features(diff: FeatureDiff, direction: str = "pruned", min_freq: float = 0.02,
                  top: int | None = None) -> list[int]:
    """Features ranked as pruned (r < 0, active at >= min_freq of the tokens in base) or amplified
    (r > 0, active at >= min_freq in RL); see the module docstring for the order."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; allowed {DIRECTIONS}")
    if not 0 <= min_freq <= 1:
        raise ValueError(f"min_freq={min_freq} must be in [0, 1] (a fraction of the tokens)")
    sign, freq = (1.0, diff.freq_base) if direction == "pruned" else (-1.0, diff.freq_rl)
    ok = ((sign * diff.score) < 0) & (freq >= min_freq) & (freq > 0)
    idx = ok.nonzero().squeeze(1)
    order = torch.sort(-freq[idx], stable=True).indices  # secondary key: frequency, descending
    idx = idx[order]
    idx = idx[torch.sort(sign * diff.score[idx], stable=True).indices]  # primary: r (signed)
    return idx.tolist()[: top if top is not None else None]


def top_contexts(
    acts: Float[Tensor, " n"],
    positions: Int[Tensor, "n 2"],
    tokens: Int[Tensor, "rows pos"],
    tokenizer: Any,
    k: int = 5,
    window: int = 24,
    extra: dict[str, Tensor] | None = None,
) -> list[dict]:
    """The k highest-activating distinct prefixes of one feature, each as a text record.

    acts: the feature's activation at n predicting positions; positions: their (row, pos) in
    `tokens` (row-major `nonzero()` of the predicting mask); extra: other per-position values to
    attach, from the first occurrence (e.g. {"activation_rl": ..., "next_is_fork": ...}).
    `context` is up to `window` tokens ending at the predicting position. Samples of one prompt
    share prefixes (hence activations), so records are distinct prefixes and `next_tokens` counts
    the tokens that followed that prefix (the branches taken there) among `n_occurrences`.
    """
    if acts.shape[0] != positions.shape[0]:
        raise ValueError(f"{acts.shape[0]} activations but {positions.shape[0]} positions")
    order = torch.argsort(acts.float(), descending=True, stable=True)
    records: dict[tuple, dict] = {}
    for i in order.tolist():
        v = acts[i].item()
        if v <= 0 or (len(records) >= k and v < min(r["activation"] for r in records.values()) - 1e-3):
            break
        row, pos = positions[i].tolist()
        key = tuple(tokens[row, : pos + 1].tolist())
        nxt = tokenizer.convert_ids_to_tokens(int(tokens[row, pos + 1]))
        if key in records:
            rec = records[key]
            rec["n_occurrences"] += 1
            rec["next_tokens"][nxt] = rec["next_tokens"].get(nxt, 0) + 1
            continue
        if len(records) >= k:
            continue
        ctx = tokenizer.convert_ids_to_tokens(list(key[max(0, len(key) - window) :]))
        rec = {"row": row, "position": pos, "activation": v, "context": "".join(ctx), "next_token": nxt,
               "next_tokens": {nxt: 1}, "n_occurrences": 1}
        for name, t in (extra or {}).items():
            rec[name] = t[i].item()
        records[key] = rec
    return list(records.values())


def decoder_logit_effects(
    sae: Any, hf_model: Any, features: Sequence[int] | None = None, through_final_norm: bool = True
) -> Float[Tensor, "features vocab"]:
    """Centred direct logit effect of each feature's unit decoder direction (module docstring)."""
    w_dec = sae.W_dec.detach().float().cpu()  # [d_sae, d_in]
    if features is not None:
        w_dec = w_dec[list(features)]
    d = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w_u = hf_model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    if d.shape[1] != w_u.shape[1]:
        raise ValueError(f"SAE d_in={d.shape[1]} != the model's unembedding width {w_u.shape[1]}; the logit "
                         "effect needs an SAE on this model's residual stream")
    if through_final_norm:
        hook = resolve_hook("ln_final.hook_normalized", hf_model)
        convention = hook.post.split(":", 1)[1]
        norm = hf_model.get_submodule(hook.module_path)
        if NORM_CONVENTIONS[convention][0] == "layer":
            d = d - d.mean(-1, keepdim=True)
        gain = norm_gain(norm, convention)
        if gain is not None:
            d = d * gain.detach().float().cpu()
    eff = d @ w_u.T  # [features, vocab]
    return eff - eff.mean(-1, keepdim=True)


def top_tokens(effect: Float[Tensor, " vocab"], tokenizer: Any, k: int = 5,
               exclude: Sequence[int] = ()) -> dict[str, list]:
    """{"promotes": [[token, effect], ...], "suppresses": [...]}: the k largest and smallest,
    skipping the token ids in `exclude` (e.g. a padding token the model never emits)."""
    keep = torch.ones_like(effect, dtype=torch.bool)
    keep[list(exclude)] = False
    k = min(k, int(keep.sum()))
    inf = torch.tensor(float("inf"))
    hi, lo = torch.topk(torch.where(keep, effect, -inf), k), torch.topk(torch.where(keep, -effect, -inf), k)
    name = lambda i: tokenizer.convert_ids_to_tokens(int(i))  # noqa: E731
    return {"promotes": [[name(i), v] for v, i in zip(hi.values.tolist(), hi.indices.tolist())],
            "suppresses": [[name(i), -v] for v, i in zip(lo.values.tolist(), lo.indices.tolist())]}


def trajectory_html(token_strs: Sequence[str], activation: Sequence[float], is_fork: Sequence[bool],
                    scale: float | None = None) -> str:
    """One trajectory as HTML: background = `activation[t]` (pass the activation at the position
    predicting token t, so the tint sits on the token the feature helped choose), forks underlined
    and bold; hovering shows the value."""
    scale = scale or max([a for a in activation if a > 0], default=1.0)
    spans = []
    for t, a, f in zip(token_strs, activation, is_fork):
        alpha = max(0.0, min(1.0, a / scale))
        style = f"background: rgba(255,80,0,{alpha:.2f});" + ("text-decoration: underline; font-weight: bold;" if f else "")
        spans.append(f'<span style="{style}" title="{a:.3f}">{html.escape(t)}</span>')
    return "<code>" + "".join(spans) + "</code>"


@dataclass
class DiffResult:
    """One fork diff, in memory (what `forksight sae diff` summarises; notebooks read it)."""

    traj: Trajectories
    stats: PairStats
    """Both models' teacher-forced entropies on `traj`."""
    forks: Bool[Tensor, "rows pos"]
    """Base-model forks among the answer tokens (top-rho by base entropy, over the batch)."""
    positions: Int[Tensor, "n 2"]
    """(row, pos) predicting each answer token, row-major; the i-th predicts the i-th answer token."""
    resid: dict[str, Float[Tensor, "n d_model"]]
    """"base" / "rl" -> the residuals the SAE encoded."""
    acts: dict[str, Float[Tensor, "n d_sae"]]
    """"base" / "rl" -> feature activations."""
    at_fork: Bool[Tensor, " n"]
    """Whether the predicted answer token is a base fork."""
    diff: FeatureDiff
    control: FeatureDiff
    """The same diff over the non-fork answer tokens."""
    ranked: dict[str, list[int]]
    """"pruned" / "amplified" -> every eligible feature, best first."""
    hook_name: str
    pass_rate: float | None = None


def fork_feature_diff(pair: Pair, sae: Any, traj: Trajectories, rho: float = 0.2, min_freq: float = 0.02,
                      batch_size: int = 64) -> DiffResult:
    """Teacher-force both models on `traj`, take base forks, encode both models' residuals at the
    SAE's site (positions predicting answer tokens), diff at forks and off forks, rank."""
    hook = check_sae(sae, pair.base)
    check_sae(sae, pair.rl)
    stats = pair_stats(pair, traj, batch_size)
    forks = fork_mask(stats.h_base, stats.mask, rho)
    pred = predicting_positions(traj.answer_mask)
    resid = {n: collect_activations(m, traj.tokens, traj.attention_mask, pred, hook.name, batch_size)
             for n, m in pair.items()}
    acts = {n: encode(sae, r) for n, r in resid.items()}
    at_fork = forks[traj.answer_mask]
    diff, control = feature_diff(acts["base"], acts["rl"], at_fork), feature_diff(acts["base"], acts["rl"], ~at_fork)
    ranked = {d: rank_features(diff, d, min_freq) for d in DIRECTIONS}
    return DiffResult(traj, stats, forks, pred.nonzero(), resid, acts, at_fork, diff, control, ranked, hook.name)


def never_emitted(tok: Any) -> list[int]:
    """The padding id when it is not the eos id: a token the model never emits (its logit is noise)."""
    return [tok.pad_token_id] if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id else []


def feature_records(res: DiffResult, sae: Any, hf: Any, tok: Any, top: int = 10, n_contexts: int = 5,
                    window: int = 24, through_final_norm: bool = True) -> dict[str, list[dict]]:
    """The `top` pruned and amplified features as JSON-able records: the diff, the non-fork
    control, the decoder logit effect and the top contexts (with RL activation, fork flag and
    both entropies of the predicted token)."""
    am = res.traj.answer_mask
    extra = {"next_is_base_fork": res.at_fork, "h_base_next": res.stats.h_base[am], "h_rl_next": res.stats.h_rl[am]}
    out = {}
    for d in DIRECTIONS:
        feats = res.ranked[d][:top]
        effects = decoder_logit_effects(sae, hf, feats, through_final_norm) if feats else []
        out[d] = [{"feature": i, **res.diff.row(i), "score_non_fork": res.control.score[i].item(),
                   "freq_base_non_fork": res.control.freq_base[i].item(),
                   "freq_rl_non_fork": res.control.freq_rl[i].item(),
                   "logit_effect": top_tokens(eff, tok, exclude=never_emitted(tok)),
                   "contexts": top_contexts(res.acts["base"][:, i], res.positions, res.traj.tokens, tok, n_contexts,
                                            window, {"activation_rl": res.acts["rl"][:, i], **extra})}
                  for i, eff in zip(feats, effects)]
    return out


def feature_row_html(res: DiffResult, feature: int, row: int, tokenizer: Any, which: str = "base",
                     scale: float | None = None) -> str:
    """`trajectory_html` of one trajectory of `res.traj` for one feature under `which` model; each
    token is tinted by the activation at the position that predicts it."""
    if which not in res.acts:
        raise ValueError(f"which={which!r}; allowed {sorted(res.acts)}")
    n = int(res.traj.attention_mask[row].sum())
    act = torch.zeros(n)
    sel = res.positions[:, 0] == row  # this row's predicting positions
    act[res.positions[sel, 1] + 1] = res.acts[which][sel, feature]  # onto the predicted token
    toks = tokenizer.convert_ids_to_tokens(res.traj.tokens[row, :n].tolist())
    return trajectory_html(toks, act.tolist(), res.forks[row, :n].tolist(), scale)

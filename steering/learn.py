"""Training a `steering.learned.LearnedEdit` on the frozen RL model: distillation or a breadth reward.

What it is: one small loop, `learn`, that changes only the edit's parameters (the RL model's
weights never receive a gradient). Each step draws `prompts_per_step` training prompts from the
caller's stream, samples `group_size` completions of each from the *steered* RL model with the
toolkit's sampler (on-policy, seeded per step), scores them with the task, and takes one Adam step
on one of two objectives:

- `distill`: KL(base || steered RL) of the next-token distributions at the answer positions of
  those samples (all answer tokens, or only the base model's forks: `distill_at="forks"`, the
  top-`rho` positions of the batch by base entropy). Needs the base model at training time only.
- `breadth`: REINFORCE on the edit's parameters with a group-relative reward that pays for
  *new* correct solutions: "unique", "novel" or "pass_at_k", defined with their advantages in
  `steering.breadth_reward`. The loss is the token-mean of -advantage * log p(token) over the
  steered samples' answer tokens. On-policy and one
  update per batch, so the PPO ratio is 1: plain policy gradient, no clipping.
  `anchor` > 0 adds anchor * KL(RL || steered RL) at the answer tokens of role `anchor_role`
  ("execution" by default: the tokens the rules force, where any change is an error), which
  protects pass@1 while the planning tokens are free to branch.

Resumable: every `save_every` steps (and at the end) the edit is saved to `out` with its
provenance and the loop state (`<out>.state.pt`: optimizer, step, log; `torch.load` with
`weights_only=True`); a rerun with the same `out` continues from there. The log (one dict per step)
is returned and stored in the provenance (`log`, with its last step again as `final`).

What it is not: a trainer of the model's weights (see the organism's GRPO for that) or a sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from probe.entropy import entropy_and_logprob, kl, trajectories_from_branches
from probe.forks import fork_mask
from probe.metrics.evaluate import ROLE_CODE, score_branches
from probe.models.budget import forward_rows, length_chunks
from probe.models.kv_cache import takes_logits_to_keep
from probe.sampling.sampler import SamplerConfig, sample_branches
from probe.tasks.protocol import Task
from steering.breadth_reward import REWARDS, breadth_advantages, unique_reward
from steering.learned import KINDS, LearnedEdit

OBJECTIVES = ("distill", "breadth")
DISTILL_AT = ("answer", "forks", "planning")


@dataclass
class LearnConfig:
    """How to learn an edit on the frozen RL model (see the module docstring)."""

    objective: str = "breadth"
    """"distill" (KL(base || steered RL)) or "breadth" (policy gradient on a breadth reward)."""
    kind: str = "vector"
    """Edit kind: "vector", "position", "mode", "sae" or "lowrank" (`steering.learned`)."""
    layers: tuple[int, ...] = (0, 1, 2, 3)
    """Blocks whose `blocks.{L}.hook_resid_post` is edited."""
    n_positions: int = 8
    """Answer-position buckets of the "position" kind."""
    rank: int = 4
    """Rank of the "lowrank" kind (<= 4)."""
    n_modes: int = 4
    """Modes of the "mode" kind (sample j uses mode j mod n_modes)."""
    where: str = "all"
    """Positions edited: "all" (prompt tokens too) or "generated" (decision positions only)."""
    steps: int = 150
    """Adam steps."""
    lr: float = 0.01
    """Adam learning rate."""
    prompts_per_step: int = 16
    """Training prompts per step."""
    group_size: int = 16
    """Completions per prompt (the group of the breadth reward)."""
    temperature: float = 1.0
    """Sampling temperature of the on-policy samples."""
    max_new_tokens: int = 32
    """Completion length cap of the samples."""
    reward: str = "unique"
    """Breadth reward: "unique" (correct / multiplicity in the group), "novel" (a steered sample's
    solution absent from the group's unsteered samples, / its multiplicity; needs fraction < 1) or
    "pass_at_k"."""
    fraction: float = 1.0
    """Share of each group's samples the edit steers while learning (sample indices < round(f n));
    the rest are the RL model's own, the reference of the "novel" reward. Only steered samples
    enter the loss."""
    k: int = 8
    """k of the pass@k reward."""
    std_normalize: bool = True
    """Divide group-centred advantages by the group's std (GRPO style)."""
    anchor: float = 0.0
    """Weight of KL(RL || steered RL) at `anchor_role` tokens (either objective)."""
    anchor_role: str = "execution"
    """Role of the anchored tokens: "execution", "planning" or "all"."""
    distill_at: str = "answer"
    """Distillation positions: "answer" (every answer token), "forks" (the base model's top-rho) or
    "planning" (tokens the task labels planning: plan like the base, execute like RL with `anchor`)."""
    rho: float = 0.2
    """Fork fraction of distill_at="forks"."""
    seed: int = 0
    """Seed of the initialisation and of each step's sampling (seed * 1_000_003 + step)."""
    save_every: int = 25
    """Save the edit and the loop state every this many steps (0 = only at the end)."""
    batch_size: int = 512
    """Sampler rows per forward pass."""
    micro_batch: int = 0
    """Rows per teacher-forced forward and backward (gradients accumulate; 0 = as many as the memory
    budget holds, `probe.models.budget.forward_rows`). The gradient does not depend on it."""

    def __post_init__(self) -> None:
        def need(ok: bool, what: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"LearnConfig: {what}. Fix: {fix}.")

        need(self.objective in OBJECTIVES, f"objective={self.objective!r} is not one of {OBJECTIVES}", "pick one")
        need(self.kind in KINDS, f"kind={self.kind!r} is not one of {KINDS}", "pick one")
        need(self.reward in REWARDS, f"reward={self.reward!r} is not one of {REWARDS}", "pick one")
        need(self.where in ("all", "generated"), f"where={self.where!r}", "use 'all' or 'generated'")
        need(self.anchor_role in ("execution", "planning", "all"), f"anchor_role={self.anchor_role!r}",
             "use 'execution', 'planning' or 'all'")
        need(self.distill_at in DISTILL_AT, f"distill_at={self.distill_at!r} is not one of {DISTILL_AT}", "pick one")
        need(0 < self.fraction <= 1, f"fraction={self.fraction} is outside (0, 1]", "steer e.g. 0.25 of the samples")
        need(self.reward != "novel" or self.fraction < 1, "reward='novel' needs unsteered samples to compare with",
             "use fraction < 1 (e.g. 0.25)")
        need(bool(self.layers), "layers is empty", "pass e.g. --layers 0 1 2 3")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "k"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1", "use a positive value")
        need(self.reward != "pass_at_k" or self.k <= self.group_size, f"k={self.k} exceeds group_size="
             f"{self.group_size}", "use k <= group_size")
        need(self.lr > 0 and self.anchor >= 0, f"lr={self.lr}, anchor={self.anchor}", "lr > 0 and anchor >= 0")


def learn(rl_model: Any, tokenizer: Any, task: Task, prompts: Callable[[int, int], list[str]], cfg: LearnConfig,
          out: str | Path, base_model: Any = None, provenance: dict | None = None,
          dictionary: Any = None) -> tuple[LearnedEdit, list[dict]]:
    """Train a `LearnedEdit` on `rl_model` (frozen) and save it to `out`; returns it and the log.

    prompts(step, count) -> `count` training prompts for that step (deterministic in step, so a
    resumed run sees the same data). base_model: needed by the "distill" objective only.
    dictionary: the `steering.sae_edit.FeatureDictionary` of kind="sae" (its site sets the layer).
    """
    if cfg.objective == "distill" and base_model is None:
        raise ValueError("objective='distill' needs base_model= (the teacher); breadth needs none")
    out = Path(out)
    state_path = out.with_name(out.name + ".state.pt")
    dev = next(rl_model.parameters()).device
    for p in rl_model.parameters():
        p.requires_grad_(False)
    layers = [] if cfg.kind == "sae" else list(cfg.layers)
    edit = LearnedEdit(int(rl_model.config.hidden_size), layers, cfg.kind, n_positions=cfg.n_positions,
                       rank=cfg.rank, n_modes=cfg.n_modes, seed=cfg.seed,
                       dictionary=dictionary).to(dev)
    opt = torch.optim.Adam(edit.parameters(), lr=cfg.lr)
    log: list[dict] = []
    start = 0
    if state_path.is_file() and out.is_file():
        loaded = LearnedEdit.load(out)
        edit.load_state_dict(loaded.state_dict())
        edit.sink_thresholds = loaded.sink_thresholds
        st = torch.load(state_path, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        start, log = int(st["step"]), [_log_entry(st["log_keys"], row) for row in st["log"].tolist()]
    if edit.kind in ("lowrank", "sae") and not edit.sink_thresholds:
        edit.sink_thresholds = sink_thresholds(rl_model, tokenizer, prompts(0, cfg.prompts_per_step),
                                               dict(zip(map(str, edit.layers), edit.sites())))
    sample_steer = edit.apply(rl_model, where=cfg.where, fraction=None if cfg.fraction == 1 else cfg.fraction)
    steer = edit.apply(rl_model, where=cfg.where)  # teacher forcing: its buckets mark the steered rows
    m = sample_steer.steered_samples(cfg.group_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.time() - (log[-1]["seconds"] if log else 0.0)  # seconds count on across resumes
    for step in tqdm(range(start, cfg.steps), desc=f"learn {cfg.objective}", initial=start, total=cfg.steps):
        batch = prompts(step, cfg.prompts_per_step)
        scfg = SamplerConfig(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.seed * 1_000_003 + step, batch_size=cfg.batch_size, device=str(dev))
        branches = sample_branches(rl_model, tokenizer, batch, scfg, intervention=sample_steer)
        scored = score_branches(branches, batch, task, tokenizer)
        traj = trajectories_from_branches(branches, scored.roles, pad_id=pad)
        tokens, attn, ans = traj.tokens.to(dev), traj.attention_mask.to(dev), traj.answer_mask.to(dev)
        steered = (branches.sample_index < m).to(dev)  # [rows]
        buckets = edit.buckets(attn, ans, branches.sample_index.to(dev), cfg.where).masked_fill(~steered[:, None], -1)
        roles, ans_s = traj.roles.to(dev), ans & steered[:, None]  # answer tokens of steered rows
        rec: dict[str, float] = {"step": step, "pass_rate": scored.correct[steered.cpu()].float().mean().item(),
                                 "distinct_per_group": float(unique_reward(scored.canonical, cfg.group_size).sum()
                                                             / len(batch))}
        opt.zero_grad(set_to_none=True)
        total = _backward(cfg, rl_model, base_model, steer, _Batch(tokens, attn.long(), ans_s, roles, buckets),
                          scored, m, rec)
        rec["loss"], rec["seconds"] = total, time.time() - t0
        opt.step()
        log.append(rec)
        done = step + 1
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            _save(edit, opt, out, state_path, done, log, cfg, provenance)
    if start >= cfg.steps and not out.is_file():
        _save(edit, opt, out, state_path, start, log, cfg, provenance)
    edit.meta = LearnedEdit.load(out).meta
    return edit, log


@dataclass
class _Batch:
    """One step's teacher-forced rows (right-padded prompt + completion)."""

    tokens: Int[Tensor, "rows T"]
    attn: Int[Tensor, "rows T"]
    ans: Bool[Tensor, "rows T"]
    """Answer tokens of the steered rows: the only ones any loss term reads."""
    roles: Int[Tensor, "rows T"]
    buckets: Int[Tensor, "rows T"]

    def take(self, rows: Int[Tensor, " r"], length: int) -> _Batch:
        """Rows `rows`, cut to their first `length` positions (the rest are right padding)."""
        return _Batch(*(x[rows, :length] for x in (self.tokens, self.attn, self.ans, self.roles, self.buckets)))


def _chunks(cfg: LearnConfig, model: Any, b: _Batch) -> list[tuple[Tensor, int]]:
    """Row chunks `(rows, length)` for the teacher-forced passes: rows ordered by length (longest
    first) and each chunk cut to its longest row, so a batch whose rows mostly end early (an RL
    model's short answers next to one that ran to the budget) does not pay for the padding. A chunk
    has `cfg.micro_batch` rows (0: as many as the memory budget holds for three models' logits at
    its length, `probe.models.budget.forward_rows`: every row at once on the organisms). Positions
    after a row's last real token are right padding: causal attention never lets them change an
    earlier position, so cutting them changes no value."""
    return length_chunks(b.attn, lambda n: cfg.micro_batch or forward_rows(model, n, models=3))


def _accumulate(cfg: LearnConfig, model: Any, steer: Any, b: _Batch, rec: dict, name: str,
                where: Bool[Tensor, "rows T"], terms: Callable[[Tensor, _Batch, Tensor, Tensor, Tensor], Tensor]) -> float:
    """Backpropagate mean(terms at `where`) + anchor * mean(KL(RL || steered) at the anchored
    tokens) over every row, chunk by chunk (`_chunks`; gradients accumulate; each mean's
    denominator is its count over the whole batch, so the gradient does not depend on the chunking).
    Logits are formed only at the chunk's prediction positions `cols` that some term reads
    (`_logits_at`: the unembedding and the full-vocabulary KL never see a prompt position), and each
    term only at its own (row, position) pairs.
    `terms(rows, chunk, cols, logits, pick)` -> [pick.sum()] per-token values for the chunk `chunk =
    b.take(rows, length)`: `logits` [len(rows), len(cols), V] are the steered predictions at positions
    `cols` (column j predicts token cols[j] + 1), `pick` [len(rows), len(cols)] the pairs of `where`.
    Records the two means in `rec` (`name`, "anchor_kl"); returns the loss value."""
    sel = b.ans if cfg.anchor_role == "all" else b.ans & (b.roles == ROLE_CODE[cfg.anchor_role])
    n_main, n_anchor = int(where.sum()), int(sel.sum()) if cfg.anchor > 0 else 0
    main = anchor = 0.0
    for rows, length in _chunks(cfg, model, b):
        c = b.take(rows, length)
        w, s = where[rows, 1:length], sel[rows, 1:length] & (n_anchor > 0)  # [r, length-1]: position t predicts t+1
        cols = (w | s).any(0).nonzero().squeeze(-1)
        if not len(cols):
            continue  # nothing in this chunk is read: it adds nothing to either mean or the gradient
        w, s = w[:, cols], s[:, cols]
        with steer, steer.positions(c.buckets):
            logits = _logits_at(model, c, cols)  # [r, len(cols), V]
        part = terms(rows, c, cols, logits, w).sum() / max(n_main, 1)
        loss = part
        if s.any():
            with torch.no_grad():
                plain = _logits_at(model, c, cols)[s]
            a = kl(plain, logits[s]).sum() / n_anchor
            loss = loss + cfg.anchor * a
            anchor += a.item()
        if loss.requires_grad:
            loss.backward()
        main += part.item()
    rec[name] = main
    if cfg.anchor > 0:
        rec["anchor_kl"] = anchor
    return main + cfg.anchor * anchor


def _logits_at(model: Any, c: _Batch, cols: Int[Tensor, " n"]) -> Float[Tensor, "rows n vocab"]:
    """The chunk's logits at positions `cols` only: transformers' `logits_to_keep` (an index tensor)
    where the model's forward takes it, so the unembedding runs on those positions alone (and any
    logit scaling or soft-capping the model applies still happens); else the full logits, indexed."""
    if takes_logits_to_keep(model):
        return model(input_ids=c.tokens, attention_mask=c.attn, logits_to_keep=cols).logits
    return model(input_ids=c.tokens, attention_mask=c.attn).logits[:, cols]


def _backward(cfg: LearnConfig, rl_model: Any, base_model: Any, steer: Any, b: _Batch, scored: Any, m: int,
              rec: dict) -> float:
    """Accumulate the step's gradient (the objective's loss plus the anchor); returns the loss value."""
    if cfg.objective == "distill":
        where = _distill_positions(cfg, base_model, b)
        return _accumulate(cfg, rl_model, steer, b, rec, "kl_base_steered", where,
                           lambda rows, c, cols, logits, pick: _distill_terms(base_model, c, cols, logits, pick))
    adv, mean_reward = breadth_advantages(cfg.reward, scored.correct, scored.canonical, cfg.group_size, m, k=cfg.k,
                                          std_normalize=cfg.std_normalize)
    if mean_reward is not None:
        rec["reward"] = mean_reward
    adv = adv.to(b.tokens.device)

    def pg(rows: Tensor, c: _Batch, cols: Tensor, logits: Tensor, pick: Tensor) -> Tensor:
        """-advantage x log p(token) at the picked pairs (log-softmax over those rows only)."""
        tok = c.tokens[:, cols + 1][pick]  # [k]
        lp = logits[pick].float().log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
        return -(adv[rows, None].expand_as(pick)[pick] * lp)

    return _accumulate(cfg, rl_model, steer, b, rec, "pg_loss", b.ans, pg)


def _distill_positions(cfg: LearnConfig, base_model: Any, b: _Batch) -> Bool[Tensor, "rows T"]:
    """Tokens whose prediction is distilled: `cfg.distill_at` among the steered answer tokens
    ("forks": the base model's top-rho by entropy over the whole batch)."""
    if cfg.distill_at == "planning":
        return b.ans & (b.roles == ROLE_CODE["planning"])
    if cfg.distill_at != "forks":
        return b.ans
    h = torch.zeros(b.tokens.shape, device=b.tokens.device)
    with torch.no_grad():
        for rows, length in _chunks(cfg, base_model, b):
            c = b.take(rows, length)
            logits = base_model(input_ids=c.tokens, attention_mask=c.attn).logits
            h[rows, :length] = entropy_and_logprob(logits, c.tokens)[0].to(h.dtype)
    return fork_mask(h, b.ans, cfg.rho)


def _distill_terms(base_model: Any, c: _Batch, cols: Int[Tensor, " n"], logits: Float[Tensor, "rows n vocab"],
                   pick: Bool[Tensor, "rows n"]) -> Float[Tensor, " k"]:
    """KL(base || steered) of the predictions at the picked (row, position) pairs of the chunk `c`
    (`logits`: the steered model's at positions `cols`)."""
    with torch.no_grad():
        base_logits = _logits_at(base_model, c, cols)[pick]
    return kl(base_logits, logits[pick])


def sink_thresholds(model: Any, tokenizer: Any, prompts: Sequence[str], sites: dict[str, str]) -> dict[str, float]:
    """{key: `probe.sae.sinks.sink_threshold` of the activation `sites[key]`'s norms over every token
    of `prompts`} (one unsteered forward per prompt): the fixed norm above which a learned edit that
    reads the residual leaves a position alone (`LearnedEdit.sink_thresholds`)."""
    from probe.sae.sinks import sink_threshold
    from probe.sampling.sampler import as_token_lists
    from steering.sites import on_site

    ids = as_token_lists(tokenizer, prompts, model.get_input_embeddings().num_embeddings)
    norms: dict[str, list[Tensor]] = {k: [] for k in sites}
    handles = []
    try:
        for k, site in sites.items():
            handles.append(on_site("hf", model, site, lambda x, k=k: norms[k].append(x.float().norm(dim=-1).flatten())))
        dev = next(model.parameters()).device
        with torch.no_grad():
            for p in ids:
                model(input_ids=torch.tensor([p], device=dev))
    finally:
        for handle in handles:
            handle.remove()
    return {k: sink_threshold(torch.cat(v)) for k, v in norms.items()}


def _log_entry(keys: list[str], row: list[float]) -> dict:
    """One step of the log read back from the state file's float64 table: steps as ints, absent keys (NaN) dropped."""
    return {k: int(v) if k == "step" else v for k, v in zip(keys, row) if v == v}


def _save(edit: LearnedEdit, opt, out: Path, state_path: Path, step: int, log: list[dict], cfg: LearnConfig,
          provenance: dict | None) -> None:
    keys = sorted({k for r in log for k in r})
    prov = {"objective": cfg.objective, "steps": step, "seed": cfg.seed, "config": asdict(cfg),
            "n_params": edit.n_params(), **(provenance or {}),
            "final": log[-1] if log else None, "log": log}
    edit.save(out, provenance=prov, recommended={"where": cfg.where, "coef": 1.0, "temperature": cfg.temperature})
    tmp = state_path.with_name(state_path.name + ".tmp")
    torch.save({"optimizer": opt.state_dict(), "step": step, "log_keys": keys,
                "log": torch.tensor([[float(r.get(k, float("nan"))) for k in keys] for r in log], dtype=torch.float64)},
               tmp)
    tmp.replace(state_path)

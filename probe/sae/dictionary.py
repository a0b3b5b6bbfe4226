"""Sparse autoencoders on a hooked model's activations: collect, train (sae-lens), save/load, check.

What it is:
- `collect_activations`: one named activation (`probe.models.hooks` names) at chosen token positions,
  via `HookedModel.run_with_sites` (so TransformerLens and nnsight give the same rows).
- `train_sae`: sae-lens's own `SAETrainer` fed with activations we provide (an in-memory tensor,
  reshuffled every epoch), TopK or standard (ReLU + L1) architecture. The returned SAE is the
  *inference* SAE exactly as `save_sae` writes it (`save_inference_model`), so sae-lens tooling
  reads our SAEs (`SAE.load_from_disk`) and `load_sae` reads theirs. The hook site is stored in
  `sae.cfg.metadata.hook_name`.
- `check_sae`: refuses an SAE whose `d_in` or hook site does not fit a model (`SAEMismatchError`).
- `encode`: feature activations in batches.

What it is not: quality metrics and splicing (`probe.sae.quality`), feature analysis
(`probe.sae.features`), or training on a live activation store (sae-lens's
`LanguageModelSAETrainingRunner`): organism activations fit in memory, so we collect them once.
Where it departs from sae-lens's defaults: training normalises activations to mean norm sqrt(d_in)
("expected_average_only_in"; sae-lens folds the factor into the weights at the end, so the SAE
reads raw activations), warms the learning rate up over 5% of the steps and decays it linearly to
0 over the last 20%, and records the batch FVU / L0 every ~1% of the steps (the trainer only
logs to wandb).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from probe.models.budget import activation_rows
from probe.models.hooks import HookSiteError, ResolvedHook, resolve_hook
from probe.models.pair import HookedModel

ARCHITECTURES: tuple[str, ...] = ("topk", "standard")


class SAEMismatchError(ValueError):
    """An SAE that does not fit a model: wrong width (d_in) or a hook site the model lacks."""


@dataclass
class SAESpec:
    """How to train one SAE; every field is validated on construction."""

    architecture: str = "topk"
    """"topk" (k largest pre-activations kept) or "standard" (ReLU + L1 penalty)."""
    d_sae: int = 1024
    """Number of features."""
    k: int = 32
    """Active features per token (topk only)."""
    l1_coefficient: float = 5.0
    """Sparsity penalty (standard only), on normalised activations."""
    lr: float = 4e-4
    """Adam learning rate (5% linear warm-up, linear decay to 0 over the last 20%)."""
    n_samples: int = 1_000_000
    """Activations seen in training (the data is reshuffled each epoch)."""
    batch_size: int = 1024
    """Activations per step."""
    dead_feature_window: int = 500
    """Steps without firing after which TopK's auxiliary loss revives a feature."""
    seed: int = 0
    """Seeds the initialisation and the shuffling."""
    device: str = "cpu"
    """Where to train (a torch device string)."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"SAESpec.{name}={getattr(self, name)!r} is invalid: allowed {allowed}. Fix: {fix}.")

        need(self.architecture in ARCHITECTURES, "architecture", f"one of {ARCHITECTURES}", "use 'topk'")
        need(self.d_sae >= 1, "d_sae", "an int >= 1", "use e.g. 8 * d_in")
        need(1 <= self.k <= self.d_sae, "k", f"an int in 1..d_sae={self.d_sae}", "use e.g. 32")
        need(self.l1_coefficient >= 0, "l1_coefficient", "a float >= 0", "use e.g. 5.0")
        need(self.lr > 0, "lr", "a float > 0", "use e.g. 4e-4")
        need(self.batch_size >= 1, "batch_size", "an int >= 1", "use e.g. 1024")
        need(self.n_samples >= 20 * self.batch_size, "n_samples", f">= 20 * batch_size = {20 * self.batch_size}",
             "train for more samples or use a smaller batch")
        need(self.dead_feature_window >= 1, "dead_feature_window", "an int >= 1", "use e.g. 500")

    @property
    def steps(self) -> int:
        return self.n_samples // self.batch_size


def predicting_positions(answer_mask: Bool[Tensor, "rows pos"]) -> Bool[Tensor, "rows pos"]:
    """True at position t - 1 for every answer token t: where the residual predicts that token
    (the alignment of `probe.entropy.pair_stats(..., resid_layers=...)`)."""
    pred = torch.zeros_like(answer_mask, dtype=torch.bool)
    pred[:, :-1] = answer_mask[:, 1:].bool()
    return pred


def collect_activations(
    model: HookedModel,
    tokens: Int[Tensor, "rows pos"],
    attention_mask: Bool[Tensor, "rows pos"],
    where: Bool[Tensor, "rows pos"],
    hook_name: str,
    batch_size: int = 64,
) -> Float[Tensor, "n d_model"]:
    """The activation `hook_name` at every `where` position, row-major, float32 on the CPU (the forward
    stops at that site: `HookedModel.activations`)."""
    if not (tokens.shape == attention_mask.shape == where.shape):
        raise ValueError(f"tokens {tuple(tokens.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"where {tuple(where.shape)} must share one [rows, pos] shape")
    out = []
    batch_size = min(batch_size, activation_rows(getattr(model, "hf", None), tokens.shape[1]))
    with torch.inference_mode():
        for r0 in range(0, tokens.shape[0], batch_size):
            sl = slice(r0, r0 + batch_size)
            a = model.activations(tokens[sl], [hook_name], attention_mask[sl].long())[hook_name]
            out.append(a[where[sl].to(a.device)].float().cpu())  # [n_b, d]
    return torch.cat(out)


def activation_batches(acts: Float[Tensor, "n d_in"], batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Endless `[batch_size, d_in]` batches of `acts`, reshuffled every epoch (seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[i : i + batch_size]]


class _RecordingTrainer(SAETrainer):
    """sae-lens's trainer, recording the batch FVU and L0 every `every` steps (its public `step` seam)."""

    def __init__(self, *args, every: int = 50, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.every, self.history = every, []

    def step(self, batch: Tensor):
        out = super().step(batch)
        if self.n_training_steps % self.every == 0:
            x, x_hat = out.sae_in.detach(), out.sae_out.detach()
            fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12)
            l0 = (out.feature_acts.detach() > 0).float().sum(-1).mean()
            self.history.append({"step": self.n_training_steps, "fvu": fvu.item(), "l0": l0.item()})
        return out


def train_sae(
    acts: Float[Tensor, "n d_in"], hook_name: str, spec: SAESpec, model_name: str = ""
) -> tuple[SAE, list[dict]]:
    """Train an SAE on `acts` with sae-lens's `SAETrainer`; returns (inference SAE, training history).

    hook_name: the site the activations came from (stored in the SAE's metadata for splicing).
    """
    if acts.ndim != 2 or not acts.is_floating_point():
        raise ValueError(f"acts must be a float [n, d_in] tensor; got {acts.dtype} of shape {tuple(acts.shape)}")
    if acts.shape[0] < spec.batch_size:
        raise ValueError(f"{acts.shape[0]} activations < batch_size={spec.batch_size}. Fix: collect more "
                         "trajectories or lower the batch size.")
    torch.manual_seed(spec.seed)
    common = dict(d_in=int(acts.shape[1]), d_sae=spec.d_sae, device=spec.device,
                  normalize_activations="expected_average_only_in")
    if spec.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=spec.k, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=spec.l1_coefficient, **common))
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.model_name = model_name
    steps = spec.steps
    tcfg = SAETrainerConfig(
        total_training_samples=spec.n_samples, train_batch_size_samples=spec.batch_size, lr=spec.lr,
        lr_end=spec.lr, lr_warm_up_steps=max(1, steps // 20), lr_decay_steps=steps // 5, device=spec.device,
        dead_feature_window=spec.dead_feature_window, feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=min(100, max(1, acts.shape[0] // spec.batch_size)),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = _RecordingTrainer(cfg=tcfg, sae=sae, data_provider=activation_batches(acts, spec.batch_size, spec.seed),
                                every=max(1, steps // 100))
    trained = trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:  # the inference SAE exactly as it will be on disk
        trained.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=spec.device), trainer.history


def save_sae(sae: SAE, path: str | os.PathLike) -> Path:
    """Write `sae` in sae-lens's on-disk format (cfg.json + sae_weights.safetensors); each file
    appears whole (written in a temporary directory, then moved with `os.replace`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".saving."))
    try:
        save = getattr(sae, "save_inference_model", None) or sae.save_model
        save(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # results are meant to be read
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_sae(path: str | os.PathLike, device: str = "cpu") -> SAE:
    """Read an SAE in sae-lens's on-disk format (ours or sae-lens's)."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an sae-lens SAE directory (no cfg.json). Fix: pass the "
                                "directory `forksight sae train` wrote (OUT/sae) or one saved by sae-lens.")
    return SAE.load_from_disk(path, device=device)


def sae_hook_name(sae: SAE, hook_name: str | None = None) -> str:
    """The SAE's hook site: `hook_name` if given, else the one in its metadata."""
    name = hook_name or sae.cfg.metadata.hook_name
    if not name:
        raise SAEMismatchError("the SAE's metadata has no hook_name, so its site is unknown. Fix: pass "
                               "hook_name='blocks.{L}.hook_resid_post' (the site it was trained on).")
    return name


def check_sae(sae: SAE, model: HookedModel, hook_name: str | None = None) -> ResolvedHook:
    """Resolve the SAE's hook site in `model` and check its width; raises `SAEMismatchError`."""
    name = sae_hook_name(sae, hook_name)
    try:
        hook = resolve_hook(name, model)
    except HookSiteError as e:
        raise SAEMismatchError(f"the SAE's hook site {name!r} does not fit {model.name}: {e}") from e
    if sae.cfg.reshape_activations != "none":
        raise SAEMismatchError(f"SAE reshape_activations={sae.cfg.reshape_activations!r}; allowed 'none' "
                               "(residual-stream-shaped sites). Fix: use an SAE trained on a residual site.")
    if sae.cfg.d_in != model.d_model:
        raise SAEMismatchError(
            f"SAE d_in={sae.cfg.d_in} does not match {name!r} of {model.name}, which is d_model={model.d_model} "
            f"wide; allowed d_in={model.d_model}. Fix: use an SAE trained on this model "
            "(`forksight sae train --base <this checkpoint>`).")
    return hook


def encode(sae: SAE, x: Float[Tensor, "n d_in"], batch_size: int = 4096) -> Float[Tensor, "n d_sae"]:
    """Feature activations of `x` (float32, CPU), in batches, written into one preallocated tensor."""
    out = torch.empty(x.shape[0], sae.cfg.d_sae, dtype=torch.float32)
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            out[i : i + batch_size] = sae.encode(x[i : i + batch_size].to(sae.device, sae.dtype)).float().cpu()
    return out

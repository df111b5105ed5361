# The two commands a newcomer needs (both install into .venv first when needed):
#   make demo   — the whole system end to end on the tiny default model, on this machine
#   make test   — the test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean-demo

install:
	@bash scripts/install.sh

demo: install
	@$(PY) -m gd_train.demo

test: install
	@$(PY) -m pytest -q

bench: install
	@$(PY) benchmarks/bench_stream.py

# Two entry points: `make demo` (set up, then run the whole pipeline on the example corpus) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench

setup: $(VENV)/.installed

# torch first, pinned: on this CPU-only setup 2.13.0 is the CPU build; elsewhere pyproject.toml says which work.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/engrain demo

test: setup
	$(PY) -m pytest -q

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# The two commands of the README. Each creates .venv on a fresh machine and installs moejax.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REF_STAMP := $(VENV)/.installed-reference
PYTEST_ARGS ?= -m 'not slow'

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The PyTorch reference for the HF parity tests (optional: those tests skip without it). torch
# 2.13.0 is the CPU build this machine image carries; where it cannot be had the tests say so.
$(REF_STAMP): $(STAMP)
	$(PY) -m pip install -q 'torch==2.13.0' 'transformers>=5.0' \
	  || echo "note: torch/transformers reference not installed; HF parity tests will be skipped"
	touch $(REF_STAMP)

install: $(STAMP)

# Trains the ALF-LB and aux-loss configs briefly on the embedded corpus (the Python standard library
# source), evaluates each, and prints the side-by-side table.
demo: $(STAMP)
	$(PY) -m moejax.demo --workdir runs/demo

test: $(REF_STAMP)
	$(PY) -m pytest -q -n 2 --dist load --durations=12 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

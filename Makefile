# The two commands of the README. Each creates .venv on a fresh machine and installs moejax.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Trains the ALF-LB and aux-loss configs briefly on the embedded corpus (the Python standard library
# source), evaluates each, and prints the side-by-side table.
demo: $(STAMP)
	$(PY) -m moejax.demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# Quick start: `make demo` (set up and run the whole pipeline on built-in data), `make test` (set up and run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: test demo setup clean-venv

setup: $(VENV)/.installed

# The stamp is rebuilt whenever requirements change, so a stale venv never hides a missing package.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

# The whole pipeline, offline, on generated colored shapes: ~20 minutes on 2 CPU cores (plus the install), everything under data/demo/
# (a re-run reuses finished steps; delete data/demo/ to start over). Ends with `prompt-following: color C shape S`.
demo: setup
	$(PY) -m demo.run

clean-venv:
	rm -rf $(VENV)

# Quick start: `make demo` (set up and run the whole pipeline on built-in data), `make test` (set up and run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: test test-fast demo setup clean-venv gpu-wheels gpu-check-dry

setup: $(VENV)/.installed

# The stamp is rebuilt whenever requirements change, so a stale venv never hides a missing package.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	@# pip byte-compiles one file at a time; compileall uses every core (install 70 s instead of 90 s on 2 cores).
	@# A few packages ship files that are not Python 3 on purpose (test data); their errors are not ours.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

# Tests run in 2 pytest workers (pytest-xdist), one thread each: most tests launch small scripts whose start-up and
# tiny tensors keep one core busy, so two at a time use both cores.
TEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

# Everything, what CI runs (.ci/run): the unit tests and the real scripts end to end on tiny local models and data.
test: setup
	$(TEST) tests

# The inner loop: pure pieces and in-process tests (no script launched, no full-size model), under 2 minutes.
test-fast: setup
	$(TEST) -m "not slow" tests

# The whole pipeline, offline, on generated colored shapes: 7-12 minutes on 2 CPU cores with the install, everything
# under data/demo/ (a re-run reuses finished steps; delete data/demo/ to start over).
# Ends with `prompt-following: color C shape S`. Another seed: make demo DEMO_ARGS="--seed 1 --root data/demo_s1".
demo: setup
	$(PY) -m demo.run $(DEMO_ARGS)

# The GPU check (bench/gpu_check.sh, README "GPU check"): the wheels a GPU machine without network lacks, into .whl/,
# and the whole check rehearsed on this CPU at tiny sizes (log and tables in bench/results/gpu-run/).
gpu-wheels: setup
	bash bench/gpu_wheels.sh

gpu-check-dry: gpu-wheels
	bash bench/gpu_check.sh --cpu-dry

clean-venv:
	rm -rf $(VENV)

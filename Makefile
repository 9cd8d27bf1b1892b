# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both first make .venv exactly requirements/lock.txt (scripts/venv.sh): the same versions on every
# machine, a rebuild when the lock changes, and a one-line failure when the venv drifts from it.
PYTHON ?= python3
VENV := .venv

.PHONY: venv browser demo test test-ray test-all mutation lock clean

venv:
	@PYTHON=$(PYTHON) bash scripts/venv.sh

# Debian's Chromium, which the HTML report's browser test drives (scripts/chromium.sh; root + apt).
browser:
	@bash scripts/chromium.sh

demo: venv
	$(VENV)/bin/unet-export demo

# pytest-xdist: one worker per core (at most 4; each holds torch and its own session exports), a
# test file per worker (--dist loadfile) so a module's and the docs' shared runs are made once,
# and the cores shared out between the workers: each worker's torch, and every command it starts,
# gets cores/workers OpenMP threads. Left at torch's default (all cores each), two workers ran four
# threads on two cores and took 11:42 instead of 8:28 (2-core AMD EPYC, alone; one process: 17:37).
CORES := $(shell nproc 2>/dev/null || echo 1)
WORKERS := $(shell n=$(CORES); [ $$n -gt 4 ] && n=4; echo $$n)
test: venv browser
	OMP_NUM_THREADS=$$(( $(CORES) / $(WORKERS) )) $(VENV)/bin/python -m pytest -q -p no:logging -n $(WORKERS) --dist loadfile --durations=25

# The Ray tests start a two-node cluster on 127.0.0.1 (about 90 s): kept out of `make test`'s
# 20 minutes, run by .ci/run after it.
test-ray: venv
	$(VENV)/bin/python -m pytest -q -p no:logging -m ray

test-all: venv browser
	$(VENV)/bin/python -m pytest -q -p no:logging -m "not gpu and not tensorrt"

# mutmut over the verdict and storage modules (pyproject [tool.mutmut]); ends with the score line.
mutation: venv
	$(VENV)/bin/python scripts/mutation.py

# Re-resolve requirements/lock.in (the torch pair + pyproject's [dev] set) into requirements/lock.txt.
lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh

clean:
	rm -rf $(VENV) exports build mutants *.egg-info

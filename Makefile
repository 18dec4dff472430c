# The two commands of the README. Each creates .venv on first use and installs gitseg into it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-faults bench rehearsal clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on the embedded default: synth, prepare, search + refit on local Ray, ensemble, report.
demo: $(STAMP)
	$(VENV)/bin/gitseg demo --out runs/demo

# Lint first (ruff, configured in pyproject.toml): CI enforces it through this target.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

# The fault tests that need minutes of Ray (issue 18): worker nodes lost under a search, its refit
# and a distributed prediction on a Ray cluster of several nodes on this machine, and a search
# driver killed twice then resumed by `ray job submit` on a head node: about 5.5 minutes, more
# than `make test` can afford (its budget is 6 minutes in all).
test-faults: $(STAMP)
	$(VENV)/bin/python -m pytest -m faults

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_hausdorff.py
	$(VENV)/bin/python benchmarks/bench_loader.py
	$(VENV)/bin/python benchmarks/bench_infer.py
	$(VENV)/bin/python benchmarks/bench_train.py
	$(VENV)/bin/python benchmarks/bench_ensemble.py
	$(VENV)/bin/python benchmarks/bench_asha.py
	$(VENV)/bin/python benchmarks/bench_ensemble_gain.py
	$(VENV)/bin/python benchmarks/bench_distill.py

# The real-size rehearsal (issue 12; not part of `make test`): the whole pipeline on a synthetic tree
# with the real data's shape at 1/8, 1/4, 1/2 and all of its case-days, each stage measured. Hours
# on 2 cores; BENCHMARKS.md, "Real size".
rehearsal: $(STAMP)
	$(VENV)/bin/python benchmarks/real_size.py --out runs/real_size --fractions 0.125 0.25 0.5 1 --plot

clean:
	rm -rf runs .pytest_cache

# The two commands of the README. Each creates .venv on first use and installs gitseg into it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-faults test-sources peer peer-check bench-nnunet bench rehearsal clean

# rt-utils writes the foreign RT Structure Sets of tests/test_sources.py; it is installed without its
# dependencies: it asks for opencv-python, which would shadow the opencv-python-headless gitseg uses.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(VENV)/bin/python -m pip install --quiet --no-deps 'rt-utils>=1.2.7,<2'
	touch $(STAMP)

# nnU-Net, the peer of the benchmarks, in an environment of its own (it pins timm and others that
# gitseg's would then share); gitseg never imports it. `make peer-check` runs nnU-Net's own dataset
# check on gitseg's export (tests/test_sources.py).
PEER := .venv-peer
$(PEER)/.installed-stamp:
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install --quiet 'nnunetv2>=2.5,<3'
	touch $@

peer: $(PEER)/.installed-stamp

# The head to head with nnU-Net (issue 34; BENCHMARKS.md): hours on 2 cores. `make bench-nnunet EPOCHS=3`
# measures one point; points already in runs/bench_nnunet/bench_nnunet.json stay; ARGS=... passes options on.
EPOCHS ?= 3 9 30
bench-nnunet: $(STAMP) $(PEER)/.installed-stamp
	$(VENV)/bin/python benchmarks/bench_nnunet.py --out runs/bench_nnunet --epochs $(EPOCHS) $(ARGS)

peer-check: $(STAMP) $(PEER)/.installed-stamp
	$(VENV)/bin/python -m pytest tests/test_sources.py -k nnunet -ra

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

# The whole pipeline (prepare, search on local Ray, ensemble, report, predict) on a generated nnU-Net
# data set and on generated contoured DICOM cases (issue 33): about 4 minutes, beside `make test`.
test-sources: $(STAMP)
	$(VENV)/bin/python -m pytest -m sources

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

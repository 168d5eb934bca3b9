# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean bench

# The stamp is rebuilt whenever the project's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned, so pip takes the local wheels instead of resolving a download.
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# The embedded-default sweep: SynthMed (prepared once, then cached), 8 TPE trials over the
# MedAlign knobs, ASHA early stopping, 2 trials at a time, a short trainer budget so it ends
# in minutes on a 2-core laptop. Each run gets its own folder under sweeps/.
DEMO_NAME ?= demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_ARGS ?= experiment=synthmed_vqa search=medalign_default \
	trainer.max_steps=90 trainer.eval_every=30 trainer.val_size=100 trainer.test_size=100 \
	sweep.num_samples=8 sweep.max_concurrent=2 sweep.verbose=0 sweep.name=$(DEMO_NAME)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/medalign prepare data=synthmed
	HF_HUB_OFFLINE=1 $(VENV)/bin/medalign sweep $(DEMO_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/step_bench.py --size tiny
	$(PY) benchmarks/sweep_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info platform/*.egg-info

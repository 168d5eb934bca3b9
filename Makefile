# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean bench system-deps

# The stamp is rebuilt whenever the project's dependency list changes.
# pip's torch 2.14.1 is a CUDA build: the venv takes about 5.5 GB. CI's last failed try ran out of
# disk in this step (`No space left on device` from pip), so say up front what is free and where.
VENV_GB := 6
$(STAMP): pyproject.toml
	@d=$(VENV); while [ ! -d "$$d" ]; do d=$$(dirname "$$d"); done; \
	free=$$(df -Pk "$$d" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ -n "$$free" ] && [ "$$free" -lt $(VENV_GB) ] && [ ! -x $(PY) ]; then \
		echo "make: $(VENV) needs about $(VENV_GB) GB (torch's CUDA wheels) and $$d has $$free GB free: free disk space there, or set VENV=<a folder on a larger disk>" >&2; \
		exit 1; \
	fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned, so pip takes the local wheels instead of resolving a download.
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# The embedded-default sweep: SynthMed (prepared once, then cached), 6 TPE trials over the
# MedAlign knobs at the preset's 500 steps (in 90 or 300 steps the fine-tune stays at chance
# on test, docs/synthmed.md), ASHA early stopping at step 250, 2 trials at a time: the two
# recipe points of the search space, then four TPE draws (with 4 trials none of the draws
# learned). Each run gets its own folder under sweeps/. More trials: make demo DEMO_TRIALS=12.
DEMO_NAME ?= demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_TRIALS ?= 6
DEMO_ARGS ?= experiment=synthmed_vqa search=medalign_default \
	trainer.eval_every=250 trainer.val_size=100 trainer.test_size=100 \
	sweep.num_samples=$(DEMO_TRIALS) sweep.max_concurrent=2 sweep.verbose=0 sweep.name=$(DEMO_NAME)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/medalign prepare data=synthmed
	HF_HUB_OFFLINE=1 $(VENV)/bin/medalign sweep $(DEMO_ARGS)

# System packages that some tests need: PostgreSQL's server binaries (the study-storage
# tests start a real server; as root they run it as the `postgres` user the package creates)
# and Chromium with its WebDriver (the dashboards are checked in a headless browser).
# apt-get installs the missing ones when we are root (as on CI); otherwise this says what to
# install, and those tests skip with that reason. Nothing is fetched when all are present.
system-deps:
	@missing=""; \
	{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; } \
		&& { [ "$$(id -u)" != 0 ] || id -u postgres >/dev/null 2>&1; } || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make system-deps: apt-get install$$missing"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } \
			|| echo "make system-deps: apt-get failed; the tests that need$$missing skip"; \
	else \
		echo "make system-deps: missing$$missing (Debian: sudo apt-get install$$missing); the tests that need them skip"; \
	fi

# Two pytest workers (pytest-xdist), each test module on one worker, the heaviest modules first
# (tests/conftest.py; --no-loadscope-reorder keeps that order: by default xdist 3.8 hands out the
# modules with the most tests first, which left a 150 s module running alone at the end): much
# of the suite waits on Ray, subprocesses or one-threaded training, so two at a time fill two
# cores. One intra-op thread per process: two processes with two OpenMP
# threads each on two cores spin-wait on each other (a 5x slower step, docs/performance.md).
# The package is byte-compiled first: every Ray worker, trial actor and `medalign` subprocess the
# tests start imports it, and with PYTHONDONTWRITEBYTECODE set (as on this image) each would
# compile it again (~0.3 s of CPU per process).
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(PY) -m compileall -q platform
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/step_bench.py --size tiny
	$(PY) benchmarks/sweep_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info platform/*.egg-info

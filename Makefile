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

# Until `medalign sweep` lands (issue #5) the demo is one embedded-default run on Ray Train.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/medalign prepare data=synthmed
	HF_HUB_OFFLINE=1 $(VENV)/bin/medalign train experiment=synthmed_vqa

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/step_bench.py --size tiny

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info platform/*.egg-info

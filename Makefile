# fxprune: two commands on a fresh machine.
#   make test   set up .venv (torch + torchvision + timm + dev tools) and run the test suite
#   make demo   set up .venv and run the demo job
# The torch/torchvision pin is a set that loads together: torchvision 0.28.0 from the registry
# is built against the registry's torch 2.13.0 and fails against a CPU-only torch build
# ("operator torchvision::nms does not exist"). Where pip is configured to prefer a local
# CPU-only torch wheel (the wheel directory named by PIP_FIND_LINKS and by pip's config file),
# this install sets both aside.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_SET := torch==2.13.0 torchvision==0.28.0
STAMP  := $(VENV)/.fxprune-setup-done

.PHONY: setup test test-slow demo lint bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --quiet --upgrade pip
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --quiet $(TORCH_SET)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --quiet -e '.[dev,export]' $(TORCH_SET)
	@$(PY) -c "import torch, torchvision, timm; print('environment ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" \
	  || { echo >&2 ""; \
	       echo >&2 "fxprune set-up FAILED: 'import timm' does not work in $(VENV)."; \
	       echo >&2 "Most likely torchvision was built against another torch ('operator torchvision::nms does not exist')."; \
	       echo >&2 "Fix: rm -rf $(VENV) and run make again; the install must ignore PIP_FIND_LINKS and pip.conf (a local CPU-only torch wheel breaks torchvision)."; \
	       exit 1; }
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m "slow or not slow" --hypothesis-profile=slow

demo: setup
	$(PY) -m fxprune demo

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_speed.py

clean:
	rm -rf $(VENV) build *.egg-info runs

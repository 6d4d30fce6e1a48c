# Every target sets up its own virtual environment on first use, so a fresh machine
# needs nothing but python3 (>=3.10) and access to PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf,train]'
	touch $(STAMP)

# The main job: a small attention experiment on 8 simulated CPU devices.
demo: $(STAMP)
	$(PY) -m experiments.demo

# The whole test suite (8 simulated CPU devices are configured in tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

# The attention benchmarks: single-device, then sequence-parallel (~30 min; writes results/).
bench: $(STAMP)
	$(PY) -m experiments.benchmark_attention
	$(PY) -m experiments.benchmark_ring

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

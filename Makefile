# Every target sets up its own virtual environment on first use, so a fresh machine
# needs nothing but python3 (>=3.10) and access to PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The experiments need the package with its [train] extra; the tests need every extra
# (transformers + CPU torch for the parity tests, nbclient for the notebooks), installed
# on top when first needed.
STAMP := $(VENV)/.train-stamp
TEST_STAMP := $(VENV)/.test-stamp

.PHONY: demo demo-attention progressive arena test bench bench-train clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train]'
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,hf,train,notebook]'
	touch $(TEST_STAMP)

# The main job: train the tiny model with ring attention on 8 simulated CPU devices on
# passkey retrieval, then evaluate the needle grid (workdirs/tiny/eval/needle_grid.png).
# A rerun resumes from workdirs/tiny's checkpoints; delete the folder to start over.
demo: $(STAMP)
	$(PY) -m experiments.train --config configs/tiny.py --workdir workdirs/tiny --devices 8

# Attention only: flash and ring attention vs the float64 reference, plus a quick timing.
demo-attention: $(STAMP)
	$(PY) -m experiments.demo

# Progressive context extension 256 -> 512 -> 1024 tokens (about 9 minutes).
progressive: $(STAMP)
	$(PY) -m experiments.train --config configs/progressive.py --workdir workdirs/progressive --devices 8

# The long-context arena: every attention option trained on the same task mixture,
# evaluated at L..8L as trained and with training-free extensions, fine-tuned at 4L;
# writes results/arena/ (resumes from workdirs/arena's finished rows).
arena: $(STAMP)
	$(PY) -m experiments.arena --config configs/arena.py --workdir workdirs/arena --devices 8

# The whole test suite (8 simulated CPU devices are configured in tests/conftest.py).
test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 -q --durations=15 tests

# The attention benchmarks: single-device, then sequence-parallel (~30 min; writes results/).
bench: $(STAMP)
	$(PY) -m experiments.benchmark_attention
	$(PY) -m experiments.benchmark_ring

# Training throughput: ring on 8 simulated devices vs dot_product attention on one.
bench-train: $(STAMP)
	$(PY) -m experiments.benchmark_train

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

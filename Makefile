# Two commands for a fresh machine, each doing its own set-up:
#   make test    install into .venv and run the tests (CPU, no network beyond package indexes)
#   make repro   install with the GPU extra and run the whole pipeline (`dvc repro`, CUDA + hub)
# and a third to see the pipeline work on a CPU before renting a GPU:
#   make smoke   the whole pipeline on a tiny local model and the shipped Korean sample
# Reviewing (no GPU):
#   make review BASE=main   the pull-request comment against BASE (what .github/workflows/review.yml posts)
#   make exps               the experiment table: changed params and headline metrics, one screen
# (`make mutate` runs mutation testing by hand: docs/development.md.)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# dvc.yaml runs `python -m stages.<name>`: that `python` must be the one in the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

BASE ?= main
# The set-up that the reviewing targets run first. The smoke workspace's copy of this file
# (tools/smoke.py) sets it empty and VENV to the environment that built it: no second install.
SETUP ?= install

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

review: $(SETUP)
	$(PY) -m tools.review $(BASE)

exps: $(SETUP)
	$(PY) -m tools.review --experiments

clean-smoke:
	rm -rf smoke

# The two README commands: `make train` (set up + train MAT on the default task) and `make test`.
# Both create .venv on first use and install everything the project needs; nothing is assumed installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `pip install torch==2.13.0` takes the CPU wheel on a machine without a GPU here, and the CUDA wheel
# from the registry on a CUDA machine; the code picks the GPU itself when torch sees one.
TORCH := torch==2.13.0
TRAIN_ARGS ?= --algo mat --env smax:3m --steps 500000 --seed 0

.PHONY: setup train test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[smax,mujoco,dev]"
	touch $@

train: setup
	$(BIN)/seqmarl train $(TRAIN_ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache

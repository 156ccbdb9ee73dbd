# Two front-door commands: `make repro` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DVC_NO_ANALYTICS := 1
# Stages run `python -m pipeline.<stage>`: make sure that is the venv's python.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test params lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project (CPU torch on CI machines)

repro: $(STAMP)  ## run the pipeline on params.yaml (the default config)
	$(BIN)/dvc repro

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest

params: $(STAMP)  ## regenerate params.yaml from conf/ (extra Hydra overrides: make params O="a=b")
	$(BIN)/python -m pipeline.config $(O)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

bench: $(STAMP)  ## speed figures (needs the full archive; see README)
	$(BIN)/python tests/bench/bench_tokenize.py

clean-venv:
	rm -rf $(VENV)

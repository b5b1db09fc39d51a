# Two entry points for a fresh machine; each sets up .venv first (torch pinned, installed before the rest,
# so pip never swaps in another build). On a CUDA machine: make train TORCH="torch==2.13.0 --index-url ..."
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

.PHONY: setup train test
setup: $(BIN)/.installed

train: setup  ## train the default model on the embedded corpus (~10 min on 2 CPU cores)
	$(BIN)/python scripts/train.py $(ARGS)

test: setup  ## the whole test suite
	$(BIN)/python -m pytest -n 2 $(ARGS)

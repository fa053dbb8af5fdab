# Every command a user needs; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# On a machine whose Python already has the dependencies (a lent GPU machine with the
# gpu-bundle): `make test-gpu PY=python3`.
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Figure 1 sweep: both arms x SEEDS, 50,000 steps each (Section 4.1), JOBS in parallel; the
# seeds of an arm train stacked in one process (the fast path, `seeds=[...]`).
SEEDS ?= [1,2,3,4,5]
JOBS ?= 2
# cpu (default) or cuda: where the Figure-1 sweep trains (trainer.device); results record it.
DEVICE ?= cpu
# Extra overrides for the training sweeps, e.g. ARGS="trainer.steps=5000 logger=none".
ARGS ?=
SWEEP_DIR ?= logs/reproduce-mnist
GRID_SWEEP_DIR ?= logs/reproduce-mnist-grid
MNIST_RESULTS := results/mnist
FASHION_SWEEP_DIR ?= logs/reproduce-fashion
FASHION_RESULTS := results/fashion_mnist
# Figures 2 and 3 at small scale: BN-Inception scaled down on Fashion-MNIST, 7 arms x 3 seeds,
# the seeds of an arm stacked in one process (StackedBNInception, `seeds=[...]`).
FIG2_SEEDS ?= [1,2,3]
FIG2_DEVICE ?= auto
FIG2_SWEEP_DIR ?= logs/reproduce-fig2-small
FIG2_RESULTS := results/fig2_small
# First the base learning rate, calibrated as the paper's was (Inception without BN, one seed,
# each rate for the same fixed budget, no plateau rule; configs/experiment/fig2_small/
# lr_search.yaml): 2x apart.
FIG2_LRS ?= 0.00075,0.0015,0.003,0.006,0.012,0.024,0.048,0.096
FIG2_LR_STEPS ?= 1500
FIG2_LR_SWEEP_DIR ?= logs/reproduce-fig2-small-lr
# The seven arms of Figures 2 and 3 and the dropout pair's other halves (the control); the
# longest first, so the two jobs end together.
FIG2_ARMS := inception inception_no_dropout bn_baseline bn_x5 bn_x5_dropout bn_x30 bn_x5_sigmoid \
	inception_x5 inception_sigmoid
comma := ,
space := $(subst ,, )
FIG2_EXPERIMENTS := $(subst $(space),$(comma),$(addprefix fig2_small/,$(FIG2_ARMS)))
# Issue 13, beyond the paper (README, "Beyond the paper"): ICS measured, BN's inference
# statistics compared, and the batch-size sensitivity of each normalisation. 5 seeds each,
# stacked in one process per arm (the fast path).
ICS_SEEDS ?= [1,2,3,4,5]
ICS_SWEEP_DIR ?= logs/reproduce-ics
# Where the network without BN stops training: the landscape's step range ends just below it.
ICS_LRS ?= 0.1,0.2,0.4,0.8,1.6,3.2,6.4,12.8,25.6,51.2,102.4
ICS_LR_STEPS ?= 2000
ICS_LR_SWEEP_DIR ?= logs/reproduce-ics-lr
# The ICS arms' rate (configs/optim/sgd.yaml): the step scales are multiples of it.
ICS_LR := 0.1
ICS_RESULTS := results/ics
BN_STATS_SEEDS ?= [1,2,3,4,5]
BN_STATS_BATCH_SIZES ?= 8,16,32,60,150,600
BN_STATS_SWEEP_DIR ?= logs/reproduce-bn-stats
BN_STATS_RESULTS := results/bn_stats
# Issue 22: the same comparison where Wu & Johnson see the EMA fail: the scaled BN-Inception at
# batch 2048, linear lr scaling with warm-up (configs/experiment/bn_stats_large/), 3 seeds.
BN_STATS_LARGE_SEEDS ?= [1,2,3]
BN_STATS_LARGE_DIR ?= logs/reproduce-bn-stats-large
BN_STATS_LARGE_RESULTS := $(BN_STATS_RESULTS)/large
BATCH_SEEDS ?= [1,2,3,4,5]
BATCH_SIZES ?= 2,4,8,16,32,64,128,256
# batch_renorm_scaled: Ioffe 2017's schedule scaled to these short runs (configs/norm/).
BATCH_NORMS ?= none,bn,batch_renorm_scaled,group_norm,layer_norm
BATCH_SWEEP_DIR ?= logs/reproduce-batch-size-mlp
BATCH_RESULTS := results/batch_size
# Issue 22: the batch-size study on a conv net (configs/experiment/batch_size_conv/), in two
# designs: Wu & He's (SGD batch = normalisation batch, lr x B/32) and Ioffe 2017's (SGD batch
# 32, BN / Batch Renorm over ghost batches), 5 epochs of 6,000 images, 3 seeds stacked per arm.
CONV_BATCH_SEEDS ?= [1,2,3]
CONV_BATCH_SIZES ?= 2,4,8,16,32
CONV_BATCH_NORMS ?= none,bn,batch_renorm_scaled,group_norm,layer_norm
CONV_GHOST_BATCHES ?= 2,4,8,16
CONV_GHOST_NORMS ?= bn,batch_renorm_scaled
# The base rate: BN at batch 32, one seed, each rate for the full 5 epochs (2x apart).
CONV_BATCH_LRS ?= 0.0125,0.025,0.05,0.1,0.2,0.4,0.8,1.6,3.2
CONV_BATCH_LR_SWEEP_DIR ?= logs/reproduce-batch-size-lr
CONV_BATCH_SWEEP_DIR ?= logs/reproduce-batch-size
CONV_BATCH_RESULTS := results/batch_size_conv
CONV_BATCH_LR = $$($(PY) scripts/make_lr_search.py --winner $(CONV_BATCH_RESULTS)/lr_search.json)
# The Figure 3 grid in miniature: every combination of the variant groups on the MNIST MLP.
GRID := norm=none,bn lr_mult=x1,x5,x30 activation=sigmoid,relu dropout=none,inception

.PHONY: help install lint format test test-full test-gpu $(addprefix reproduce-,$(EXPERIMENTS)) \
	reproduce-fig2-small-lr \
	reproduce-ics-lr reproduce-deep-linear reproduce-batch-size-lr reproduce-batch-size-ghost \
	reproduce-bn-stats-large \
	report figures bench bench-imagenet bench-gpu clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}'
	@$(foreach e,$(EXPERIMENTS),printf "  \033[36m%-22s\033[0m %s\n" reproduce-$(e) "$($(e)_HELP)";)

# With PY pointing elsewhere, that Python's packages are used as they are: nothing installed.
ifeq ($(PY),$(VENV)/bin/python)
INSTALLED := $(STAMP)
endif

install: $(INSTALLED) ## Create .venv with the pinned dependencies (idempotent)

$(STAMP): pyproject.toml src/bnrepro/speedups/_mkl_intel_cpu.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check src scripts tests
	$(VENV)/bin/ruff format --check src scripts tests

format: install ## ruff: fix what it can and format
	$(VENV)/bin/ruff check --fix src scripts tests
	$(VENV)/bin/ruff format src scripts tests

# pytest-xdist workers: one per core of the 2-core machines this suite is sized for.
TEST_WORKERS ?= 2

test: lint ## Install, lint, then the quick tier: every contract, slow repeats left out (~5 min)
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal

test-full: lint ## The whole test suite, slow tests included
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test-gpu: ## The GPU tests (marker gpu): every experiment on cuda, CPU parity, resume, NCCL
	$(PY) -m pytest -m gpu -v

# The experiments: each `reproduce-<name>` target is one sweep through the entrypoint, its runs
# collected into results/, and its figure drawn from them (REPRODUCE below); `make figures`
# redraws every figure from the same list. Per experiment: _SWEEP (the sweep's overrides), _DIR
# (the sweep directory), _RUNS (where its runs are collected), _FIGURE (the figure script and its
# flags), _OUT (the results folder), _HELP. Idempotent: run again after an interruption,
# finished runs are skipped, unfinished ones resume.
EXPERIMENTS := mnist mnist-grid fashion fig2-small ics bn-stats batch-size batch-size-mlp

mnist_HELP := Figure 1: baseline and BN x SEEDS x 50k steps, then results/mnist/figure1.*
mnist_SWEEP := experiment=mnist/baseline,mnist/bn "seeds=$(SEEDS)" trainer.device=$(DEVICE)
mnist_DIR := $(SWEEP_DIR)
mnist_RUNS := $(MNIST_RESULTS)/runs
mnist_FIGURE := make_figure1.py
mnist_OUT := $(MNIST_RESULTS)

mnist-grid_HELP := The variant grid on MNIST (24 runs), then results/mnist/grid.*
mnist-grid_SWEEP := experiment=mnist/grid $(GRID)
mnist-grid_DIR := $(GRID_SWEEP_DIR)
mnist-grid_RUNS := $(MNIST_RESULTS)/grid_runs
mnist-grid_FIGURE := make_mnist_grid.py
mnist-grid_OUT := $(MNIST_RESULTS)

fashion_HELP := Figure 1 on Fashion-MNIST (data=fashion_mnist), then results/fashion_mnist/
fashion_SWEEP := experiment=mnist/baseline,mnist/bn data=fashion_mnist "seeds=$(SEEDS)" \
	trainer.device=$(DEVICE)
fashion_DIR := $(FASHION_SWEEP_DIR)
fashion_RUNS := $(FASHION_RESULTS)/runs
fashion_FIGURE := make_figure1.py
fashion_OUT := $(FASHION_RESULTS)

fig2-small_HELP := Figures 2 and 3 at small scale (Fashion-MNIST), results/fig2_small/
# `=`, not `:=`: the winning rate is read (by the shell) when the sweep starts, after the search.
fig2-small_SWEEP = experiment=$(FIG2_EXPERIMENTS) "seeds=$(FIG2_SEEDS)" \
	trainer.device=$(FIG2_DEVICE) \
	optim.base_lr=$$($(PY) scripts/make_lr_search.py --winner $(FIG2_RESULTS)/lr_search.json)
fig2-small_BEFORE := reproduce-fig2-small-lr
fig2-small_DIR := $(FIG2_SWEEP_DIR)
fig2-small_RUNS := $(FIG2_RESULTS)/runs
fig2-small_FIGURE := make_figure2.py --small
fig2-small_OUT := $(FIG2_RESULTS)

ics_HELP := ICS and loss landscape: no BN, BN, noisy BN, noise alone (Santurkar et al.), results/ics/
# `=`: the step range is read from the search when the sweep starts. `++`: the key exists in
# the ics experiments only, and a multirun checks its overrides against the bare config first.
ics_SWEEP = experiment=ics/baseline,ics/bn,ics/noisy_bn,ics/noise "seeds=$(ICS_SEEDS)" \
	++trainer.ics.step_scales=$$($(PY) scripts/make_lr_search.py --scales $(ICS_LR) $(ICS_RESULTS)/lr_search.json)
ics_BEFORE := reproduce-ics-lr
ics_DIR := $(ICS_SWEEP_DIR)
ics_RUNS := $(ICS_RESULTS)/runs
ics_FIGURE := make_ics_figure.py
ics_OUT := $(ICS_RESULTS)

# The largest jobs (the smallest batches) first: data.batch_size varies slowest in the sweep.
bn-stats_HELP := BN's inference statistics (EMA, cumulative, Alg. 2, precise) on the MLP by batch size, results/bn_stats/
bn-stats_SWEEP := experiment=bn_stats/bn data.batch_size=$(BN_STATS_BATCH_SIZES) \
	"seeds=$(BN_STATS_SEEDS)"
bn-stats_DIR := $(BN_STATS_SWEEP_DIR)
bn-stats_RUNS := $(BN_STATS_RESULTS)/runs
bn-stats_FIGURE := make_bn_stats_figure.py
bn-stats_OUT := $(BN_STATS_RESULTS)

batch-size_HELP := Normalisation vs batch size on a conv net, Wu & He's and Ioffe's designs, results/batch_size_conv/
# `=`: the base rate is read from the search when the sweep starts. Wu & He's design here; the
# ghost-batch design runs first (reproduce-batch-size-ghost) into the same sweep directory.
# The smallest batches (the longest jobs) first: data.batch_size varies slowest.
batch-size_SWEEP = experiment=batch_size_conv/wu_he data.batch_size=$(CONV_BATCH_SIZES) \
	norm=$(CONV_BATCH_NORMS) "seeds=$(CONV_BATCH_SEEDS)" optim.base_lr=$(CONV_BATCH_LR)
batch-size_BEFORE := reproduce-batch-size-ghost
batch-size_DIR := $(CONV_BATCH_SWEEP_DIR)
batch-size_RUNS := $(CONV_BATCH_RESULTS)/runs
batch-size_FIGURE := make_batch_size_conv_figure.py
batch-size_OUT := $(CONV_BATCH_RESULTS)

batch-size-mlp_HELP := Issue 13's batch-size grid on the MNIST MLP (batch 2..256, 1 epoch), results/batch_size/
batch-size-mlp_SWEEP := experiment=batch_size/grid data.batch_size=$(BATCH_SIZES) norm=$(BATCH_NORMS) \
	"seeds=$(BATCH_SEEDS)"
batch-size-mlp_DIR := $(BATCH_SWEEP_DIR)
batch-size-mlp_RUNS := $(BATCH_RESULTS)/runs
batch-size-mlp_FIGURE := make_batch_size_figure.py
batch-size-mlp_OUT := $(BATCH_RESULTS)

# $(1): an experiment of EXPERIMENTS.
define REPRODUCE
reproduce-$(1): install $$($(1)_BEFORE)
	$$(PY) -m bnrepro.train --multirun $$($(1)_SWEEP) hydra/launcher=joblib \
		hydra.launcher.n_jobs=$$(JOBS) hydra.sweep.dir=$$($(1)_DIR) $$(ARGS)
	$$(PY) scripts/collect_runs.py $$($(1)_DIR) $$($(1)_RUNS)
	$$(PY) scripts/$$($(1)_FIGURE) --runs $$($(1)_RUNS) --out $$($(1)_OUT)
endef
$(foreach e,$(EXPERIMENTS),$(eval $(call REPRODUCE,$(e))))

reproduce-fig2-small-lr: install ## The base learning rate for fig2-small: Inception at each of FIG2_LRS
	$(PY) -m bnrepro.train --multirun experiment=fig2_small/lr_search optim.base_lr=$(FIG2_LRS) \
		trainer.steps=$(FIG2_LR_STEPS) trainer.plateau=null trainer.device=$(FIG2_DEVICE) hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) \
		hydra.sweep.dir=$(FIG2_LR_SWEEP_DIR) $(ARGS)
	$(PY) scripts/collect_runs.py $(FIG2_LR_SWEEP_DIR) $(FIG2_RESULTS)/lr_search_runs
	$(PY) scripts/make_lr_search.py --runs $(FIG2_RESULTS)/lr_search_runs --out $(FIG2_RESULTS)

reproduce-bn-stats-large: install ## BN's statistics on the scaled BN-Inception at batch 2048 (lr x64, warm-up), results/bn_stats/large/
	$(PY) -m bnrepro.train --multirun experiment=bn_stats_large/bn "seeds=$(BN_STATS_LARGE_SEEDS)" \
		hydra.sweep.dir=$(BN_STATS_LARGE_DIR) $(ARGS)
	$(PY) scripts/collect_runs.py $(BN_STATS_LARGE_DIR) $(BN_STATS_LARGE_RESULTS)/runs
	$(PY) scripts/make_bn_stats_large_figure.py --runs $(BN_STATS_LARGE_RESULTS)/runs --out $(BN_STATS_LARGE_RESULTS)

CONV_BATCH_LR_FLAGS := --network "conv net with BN at batch 32" \
	--command "make reproduce-batch-size" --experiment batch_size_conv/lr_search \
	--paper "Wu & He tune the rate for BN at 32 images per GPU and scale it linearly with the batch."

reproduce-batch-size-lr: install ## The base rate of the conv batch-size study: BN at batch 32 at each of CONV_BATCH_LRS
	$(PY) -m bnrepro.train --multirun experiment=batch_size_conv/lr_search optim.base_lr=$(CONV_BATCH_LRS) \
		hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) \
		hydra.sweep.dir=$(CONV_BATCH_LR_SWEEP_DIR) $(ARGS)
	$(PY) scripts/collect_runs.py $(CONV_BATCH_LR_SWEEP_DIR) $(CONV_BATCH_RESULTS)/lr_search_runs
	$(PY) scripts/make_lr_search.py --runs $(CONV_BATCH_RESULTS)/lr_search_runs --out $(CONV_BATCH_RESULTS) $(CONV_BATCH_LR_FLAGS)

reproduce-batch-size-ghost: install reproduce-batch-size-lr ## Ioffe 2017's design: SGD batch 32, BN and Batch Renorm over ghost batches of CONV_GHOST_BATCHES
	$(PY) -m bnrepro.train --multirun experiment=batch_size_conv/ghost norm=$(CONV_GHOST_NORMS) \
		+model.bn.ghost_batch=$(CONV_GHOST_BATCHES) "seeds=$(CONV_BATCH_SEEDS)" \
		optim.base_lr=$(CONV_BATCH_LR) hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) \
		hydra.sweep.dir=$(CONV_BATCH_SWEEP_DIR) $(ARGS)

ICS_LR_FLAGS := --network "MLP without BN (Section 4.1)" --command "make reproduce-ics" \
	--experiment ics/lr_search \
	--paper "Santurkar et al. move along the gradient up to just below the rate at which the network without BN diverges."

reproduce-ics-lr: install ## Where the ICS network without BN stops training: its rate at each of ICS_LRS
	$(PY) -m bnrepro.train --multirun experiment=ics/lr_search optim.base_lr=$(ICS_LRS) \
		trainer.steps=$(ICS_LR_STEPS) trainer.ics=null hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) \
		hydra.sweep.dir=$(ICS_LR_SWEEP_DIR) $(ARGS)
	$(PY) scripts/collect_runs.py $(ICS_LR_SWEEP_DIR) $(ICS_RESULTS)/lr_search_runs
	$(PY) scripts/make_lr_search.py --runs $(ICS_RESULTS)/lr_search_runs --out $(ICS_RESULTS) $(ICS_LR_FLAGS)

reproduce-deep-linear: install ## Santurkar et al.'s deep linear network: landscape with and without BN (about a minute), results/ics/deep_linear/
	$(PY) scripts/deep_linear.py --out $(ICS_RESULTS)/deep_linear --seeds 1 2 3 --steps 10000

report: install ## results/REPORT.md: every claim of the paper, ours with a 95 % CI and a verdict
	$(PY) scripts/make_report.py --results results --out results/REPORT.md

figures: install ## Rebuild every figure in results/ from the run logs stored there
	@set -e; if [ -d $(FIG2_RESULTS)/lr_search_runs ]; then \
		$(PY) scripts/make_lr_search.py --runs $(FIG2_RESULTS)/lr_search_runs --out $(FIG2_RESULTS); fi
	@set -e; if [ -d $(BN_STATS_LARGE_RESULTS)/runs ]; then \
		$(PY) scripts/make_bn_stats_large_figure.py --runs $(BN_STATS_LARGE_RESULTS)/runs --out $(BN_STATS_LARGE_RESULTS); fi
	@set -e; if [ -d $(CONV_BATCH_RESULTS)/lr_search_runs ]; then \
		$(PY) scripts/make_lr_search.py --runs $(CONV_BATCH_RESULTS)/lr_search_runs --out $(CONV_BATCH_RESULTS) $(CONV_BATCH_LR_FLAGS); fi
	@set -e; if [ -d $(ICS_RESULTS)/lr_search_runs ]; then \
		$(PY) scripts/make_lr_search.py --runs $(ICS_RESULTS)/lr_search_runs --out $(ICS_RESULTS) $(ICS_LR_FLAGS); fi
	@set -e; $(foreach e,$(EXPERIMENTS),\
		echo "$(PY) scripts/$($(e)_FIGURE) --runs $($(e)_RUNS) --out $($(e)_OUT)"; \
		$(PY) scripts/$($(e)_FIGURE) --runs $($(e)_RUNS) --out $($(e)_OUT);)

bench: install ## MNIST speed (DataLoader vs in-memory vs the trainer, make reproduce-mnist's wall time) and the conv net per model-step (eager vs stacked seeds)
	$(PY) scripts/bench_mnist.py --data-dir "$${DATA_DIR:-data}"
	$(PY) scripts/bench_conv.py --out results/bench

bench-imagenet: install ## BN-Inception vs GoogLeNet training images/s (GPU if any), results/bench/
	$(PY) scripts/bench_imagenet.py

bench-gpu: ## GPU: Figure-1 sweep, BN-Inception img/s, JPEG input; results/bench/gpu.*
	$(PY) scripts/bench_gpu.py

clean: ## Remove caches (keeps .venv, logs/ and results/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

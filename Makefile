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
# The Figure 3 grid in miniature: every combination of the variant groups on the MNIST MLP.
GRID := norm=none,bn lr_mult=x1,x5,x30 activation=sigmoid,relu dropout=none,inception

.PHONY: help install lint format test test-full test-gpu reproduce-mnist reproduce-mnist-grid \
	figures bench bench-imagenet bench-gpu clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}'

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

test: lint ## Install, lint, then run the test suite (skips tests marked slow)
	$(PY) -m pytest -m "not slow"

test-full: lint ## The whole test suite, slow tests included
	$(PY) -m pytest

test-gpu: ## The GPU tests (marker gpu): every experiment on cuda, CPU parity, resume, NCCL
	$(PY) -m pytest -m gpu -v

# Idempotent: run again after an interruption, finished runs are skipped, unfinished ones resume.
reproduce-mnist: install ## Figure 1: baseline and BN x SEEDS x 50k steps, then results/mnist/figure1.*
	$(PY) -m bnrepro.train --multirun experiment=mnist/baseline,mnist/bn "seeds=$(SEEDS)" \
		trainer.device=$(DEVICE) hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) \
		hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)
	$(PY) scripts/collect_runs.py $(SWEEP_DIR) $(MNIST_RESULTS)/runs
	$(PY) scripts/make_figure1.py --runs $(MNIST_RESULTS)/runs --out $(MNIST_RESULTS)

reproduce-mnist-grid: install ## The variant grid on MNIST (24 runs), then results/mnist/grid.*
	$(PY) -m bnrepro.train --multirun experiment=mnist/grid $(GRID) \
		hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) hydra.sweep.dir=$(GRID_SWEEP_DIR) $(ARGS)
	$(PY) scripts/collect_runs.py $(GRID_SWEEP_DIR) $(MNIST_RESULTS)/grid_runs
	$(PY) scripts/make_mnist_grid.py --runs $(MNIST_RESULTS)/grid_runs --out $(MNIST_RESULTS)

figures: install ## Rebuild every figure in results/ from the run logs stored there
	$(PY) scripts/make_figure1.py --runs $(MNIST_RESULTS)/runs --out $(MNIST_RESULTS)
	$(PY) scripts/make_mnist_grid.py --runs $(MNIST_RESULTS)/grid_runs --out $(MNIST_RESULTS)

bench: install ## MNIST speed: DataLoader vs in-memory vs the trainer, and make reproduce-mnist's wall time
	$(PY) scripts/bench_mnist.py --data-dir "$${DATA_DIR:-data}"

bench-imagenet: install ## BN-Inception vs GoogLeNet training images/s (GPU if any), results/bench/
	$(PY) scripts/bench_imagenet.py

bench-gpu: ## GPU: Figure-1 sweep, BN-Inception img/s, JPEG input; results/bench/gpu.*
	$(PY) scripts/bench_gpu.py

clean: ## Remove caches (keeps .venv, logs/ and results/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

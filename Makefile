# rcit-bench: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SPEC   ?= benchmarks/quick.yaml
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install test test-all bench bench-smoke estimate status leaderboard preview speed clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-13s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install the suite with its pinned torch/torchvision pair

test: $(VENV)/.installed ## Run the fast test suite (W&B disabled; slow tests skipped)
	WANDB_MODE=disabled $(PY) -m pytest -q

test-all: $(VENV)/.installed ## Run every test, the slow ones too
	WANDB_MODE=disabled $(PY) -m pytest -q -m ''

bench: $(VENV)/.installed ## Train every method, sweep the corruption grid, write leaderboards/quick/
	$(VENV)/bin/rcit-bench bench $(SPEC)

bench-smoke: $(VENV)/.installed ## A tiny end-to-end run of the whole pipeline (about a minute)
	$(VENV)/bin/rcit-bench bench benchmarks/smoke.yaml

estimate: $(VENV)/.installed ## Predict the wall time of SPEC (default the quick spec) on this machine, by entry and phase
	$(VENV)/bin/rcit-bench estimate $(SPEC)

status: $(VENV)/.installed ## What SPEC's results folder holds: trained entries, done / pending / failed cells
	$(VENV)/bin/rcit-bench status $(SPEC)

leaderboard: $(VENV)/.installed ## Rebuild leaderboards from result files, without training
	$(VENV)/bin/rcit-bench leaderboard $(SPEC)

preview: $(VENV)/.installed ## Write a labelled grid of every corruption x severity on a real photo to corruptions.jpg
	$(VENV)/bin/rcit-bench corrupt astronaut --out corruptions.jpg
	@wc -c < corruptions.jpg | awk '{printf "corruptions.jpg: %d bytes\n", $$1}'

speed: $(VENV)/.installed ## Run the speed scripts in benchmarks/ (corruptions, metrics, similarity, training, grid cost)
	$(PY) benchmarks/corruption_speed.py
	$(PY) benchmarks/metrics_speed.py
	$(PY) benchmarks/similarity_speed.py --sizes 1000x5000,5000x25000
	WANDB_MODE=disabled $(PY) benchmarks/train_throughput.py
	WANDB_MODE=disabled $(PY) benchmarks/grid_cost.py

clean: ## Remove caches (keeps .venv, data and runs)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

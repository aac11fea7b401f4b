# RLHF pipeline: `make all` runs tokenizer -> pretrain -> sft -> reward -> ppo -> export; `make test` tests it.
#
#   make all [CONFIG=configs/tiny.yaml] [LAUNCH=cpu|ddp|zero2|zero3] [NPROC=N] [ARGS="sft.lr=1e-4 run.name=try2"]
#   make sft                  # sft and whatever it needs first; done stages are skipped, partial ones resume
#   make sft FORCE=1          # a stale stage (config or inputs changed) is moved aside and made again
#   make export EXPORT_DIR=out/model      make status      make report      make chat CHAT="--stage sft"
#
# Every target goes through `python -m pipeline` (pipeline/__main__.py).

CONFIG ?= configs/tiny.yaml
LAUNCH ?= cpu
NPROC ?= 0
ARGS ?=
FORCE ?=
EXPORT_DIR ?=
CHAT ?=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_VENV ?= .venv-bench
HF4_VENV ?= .venv-hf4

OVERRIDES = $(ARGS) $(if $(EXPORT_DIR),export.dir=$(EXPORT_DIR))
RUN = $(PY) -m pipeline run --config $(CONFIG) --launch $(LAUNCH) --nproc $(NPROC) $(if $(filter 1 yes true,$(FORCE)),--force)
STAGES = tokenizer pretrain sft reward ppo export

.PHONY: install all $(STAGES) status report chat test test-slow test-interop smoke lint format bench bench-env clean

install: $(STAMP)

# One-time set-up (the stamp makes it run once; edit pyproject.toml or delete the stamp to redo it).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e '.[dev,deepspeed]'
	touch $(STAMP)

all: $(STAMP)
	$(RUN) all $(OVERRIDES)

$(STAGES): $(STAMP)
	$(RUN) $@ $(OVERRIDES)

status: $(STAMP)
	$(PY) -m pipeline status --config $(CONFIG) $(OVERRIDES)

report: $(STAMP)
	$(PY) -m pipeline report --config $(CONFIG) $(OVERRIDES)

chat: $(STAMP)
	$(PY) -m pipeline chat --config $(CONFIG) $(CHAT) $(OVERRIDES)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The export loads in transformers 4.x too: a second venv ($(HF4_VENV)) that the export check runs in.
test-interop: $(STAMP) $(HF4_VENV)/.installed
	HF4_PYTHON=$(HF4_VENV)/bin/python $(PY) -m pytest -q -m slow tests/test_export.py -k transformers_4

$(HF4_VENV)/.installed:
	test -x $(HF4_VENV)/bin/python || $(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/pip install torch==2.13.0 'transformers<5'
	touch $@

# The whole pipeline on a micro config in a temporary folder (about a minute on 2 CPU cores).
smoke: $(STAMP)
	$(PY) -m pytest -q -m "" tests/test_e2e.py::test_micro_pipeline_end_to_end

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages tests bench
	$(VENV)/bin/ruff format --check pipeline stages tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix pipeline stages tests bench
	$(VENV)/bin/ruff format pipeline stages tests bench

# Measurements, appended to bench/RESULTS.md with their commands.
bench: $(STAMP)
	$(PY) bench/pretrain_throughput.py

# TRL 1.12 in its own venv ($(BENCH_VENV)): the reference side of bench/ppo_throughput.py (issue #6).
bench-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install torch==2.13.0 'trl==1.12.0' 'transformers==5.23.0'
	touch $@

# Caches only: runs/ holds trained stages and is never deleted here (remove a run folder by hand).
clean:
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build *.egg-info

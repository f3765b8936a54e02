# Two commands on a machine with only Python 3.11 and git:
#   make repro   create .venv, install, run the DVC pipeline
#   make test    create .venv, install, run the whole test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
# Rebuilt only when the project's dependencies change.
STAMP  := $(VENV)/.installed

.PHONY: repro test install system-packages up down clean

repro: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro
	@$(BIN)/vae summary

test: $(STAMP) system-packages
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest

# Debian packages the tests run for real: PostgreSQL (an MLflow backend store) and Chromium
# (the MLflow UI test). Installed when missing and we are root, as in CI; otherwise their
# tests skip, naming the package (and fail under CI=1).
system-packages:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "make test: Debian packages missing:$$missing (install them as root); their tests will skip"; \
	fi

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# The infra/ topology on this machine, 127.0.0.1 only: PostgreSQL, MLflow on it, a 2-node
# Ray cluster. Then `source .stack/env` points the pipeline at it.
STACK ?= .stack
up: $(STAMP) system-packages
	$(BIN)/python infra/local/stack.py up $(STACK)

down: $(STAMP)
	$(BIN)/python infra/local/stack.py down $(STACK)

clean:
	rm -rf $(VENV) .ray_results mlartifacts mlflow.db

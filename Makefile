# Two commands on a machine with only Python 3.11 and git:
#   make repro   install uv.lock into .venv, run the DVC pipeline
#   make test    install uv.lock into .venv, run the whole test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
# uv, bootstrapped from PyPI at this version into .tools/ (pip is all Python brings).
UV_VERSION := 0.13.9
UV     := .tools/bin/uv
# Re-synced only when uv.lock changes.
STAMP  := $(VENV)/.installed
# Where PYTHON is missing, uv would download a Python build from GitHub: only PyPI is fetched.
export UV_PYTHON_DOWNLOADS := never
# The first line of each recipe that runs PYTHON, so that an installed .venv needs none. Run, not
# looked up: a pyenv shim is found for a version pyenv does not have active.
REQUIRE_PYTHON = @$(PYTHON) -c "" >/dev/null 2>&1 || { echo "make: cannot run $(PYTHON); install it, or name \
	another Python, 3.11 to 3.13: make PYTHON=<its path> $(or $(MAKECMDGOALS),repro)" >&2; exit 2; }

.PHONY: repro git-repo test test-fast install lock lock-check system-packages up down clean wheelhouse gpu-kit

# Python caches compiled modules (__pycache__) in .venv unless PYTHONDONTWRITEBYTECODE is set,
# as many container images set it. Then every process (each stage, each Ray worker and actor,
# each test's server) compiles torch, Ray and MLflow from source again: the trivial Ray Train
# run of benchmarks/startup.py is done 48 to 69 s after its process starts here without the
# cache, 20 to 25 s with it (2.4x to 2.7x).
unexport PYTHONDONTWRITEBYTECODE

# The last stage that runs prints where the results are (`vae summary` prints it again).
repro: git-repo $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro

# DVC runs the pipeline in a git repository: a downloaded archive of the project is not one,
# and DVC would say so only after the install.
git-repo:
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "make repro: $(CURDIR) is not a git repository (a \
	downloaded archive?), and DVC needs one: clone the project, or run git init && git add -A && git commit -m \
	project here first" >&2; exit 2; }

# The suite in TEST_WORKERS pytest processes (pytest-xdist): in one, the integration tests wait on
# servers, clusters and subprocesses and left this 2-core machine a third idle; in two, 0.80x the
# time (benchmarks/RESULTS.md). A module stays in one process (--dist loadfile): its fixtures (a
# pipeline run, `make up`'s stack, a server) start once. Session fixtures (S3, the Ray cluster,
# MLflow) start once per process. Modules go out in conftest's order. TEST_WORKERS=0: one process.
# Each process (and what it starts) gets cores / TEST_WORKERS torch threads (conftest.py).
TEST_WORKERS ?= 2
test: lock-check $(STAMP) system-packages
	"$(BIN)/ruff" check .
	PATH="$(BIN):$$PATH" "$(BIN)/python" -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The edit loop: lint and the unit tests, none of the servers, clusters or pipeline runs.
# Modules of integration tests alone are not even imported, nor the plugins only they use.
FAST_SKIP := --ignore=tests/test_pipeline_dvc.py --ignore=tests/test_local_stack.py --ignore=tests/test_resume_dvc.py \
	-p no:schemathesis -p no:hydra_pytest -p no:anyio -p no:hypothesispytest
test-fast: $(STAMP)
	"$(BIN)/ruff" check .
	PATH="$(BIN):$$PATH" "$(BIN)/python" -m pytest -m "not integration" -q $(FAST_SKIP)

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

# pip --target skips a virtual environment's 8 s of creation (measured here); where the
# interpreter has no pip of its own (or refuses), a small venv lends one.
$(UV):
	$(REQUIRE_PYTHON)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .tools uv==$(UV_VERSION) 2>/dev/null || { \
		$(PYTHON) -m venv .tools/venv && \
		.tools/venv/bin/python -m pip install --quiet --disable-pip-version-check --target .tools uv==$(UV_VERSION); }

# Exactly the lock (--frozen: never re-resolved here), the project editable, the dev extra
# (the tests) included; packages the lock does not name are removed.
$(STAMP): uv.lock | $(UV)
	$(REQUIRE_PYTHON)
	$(UV) sync --frozen --extra dev --python $(PYTHON)
	@touch $@

# Re-resolve uv.lock from pyproject.toml (the default index, or uv's UV_DEFAULT_INDEX).
lock: $(UV)
	$(REQUIRE_PYTHON)
	$(UV) lock --python $(PYTHON)

# pyproject.toml and uv.lock must agree (CI runs this through `make test`). Offline: when they
# agree, the lock alone answers.
lock-check: $(UV)
	@$(UV) lock --check --offline --python $(PYTHON) 2>/dev/null || { \
		echo "uv.lock does not match pyproject.toml: run \`make lock\` and commit uv.lock" >&2; exit 1; }

# An offline install for a node that brings its own CUDA torch: every locked runtime package but
# torch, torchvision and what only they need, as wheels for CPython WHEEL_PYTHON on Linux x86-64
# (how to install them there: infra/wheelhouse.py).
# NODE_HAS=FILE (the node's `pip list --format=freeze`) leaves out what the node already has;
# WHEEL_EXTRAS=dev adds the test suite's packages.
WHEEL_PYTHON ?= 3.12
wheelhouse: $(STAMP)
	rm -rf wheelhouse  # no wheels of an earlier run (another Python or NODE_HAS) left beside this one's
	"$(BIN)/python" infra/wheelhouse.py wheelhouse --python $(WHEEL_PYTHON) --pip $(PYTHON) $(if $(NODE_HAS),--node-has $(NODE_HAS)) $(foreach e,$(WHEEL_EXTRAS),--extra $(e))

# Less than that, for a bare GPU node's table and GPU tests (benchmarks/gpu_kit.py, docs/GPU.md):
# MNIST, pydantic's wheels and onnxruntime-gpu in parts of 60 MiB, as gpu_kit/. PIPELINE=1 adds
# the wheelhouse for the pipeline there, in parts too (NODE_HAS=FILE: less of it), and leaves the
# kit's other parts as they are: they may be on the node already.
gpu-kit: $(STAMP)
	"$(BIN)/python" benchmarks/gpu_kit.py gpu_kit --python $(WHEEL_PYTHON) --pip $(PYTHON) $(if $(PIPELINE),--pipeline $(if $(NODE_HAS),--node-has $(NODE_HAS)))

# The infra/ topology on this machine, 127.0.0.1 only: PostgreSQL, MLflow on it, a 2-node
# Ray cluster. Then `source .stack/env` points the pipeline at it.
STACK ?= .stack
up: $(STAMP) system-packages
	"$(BIN)/python" infra/local/stack.py up $(STACK)

down: $(STAMP)
	"$(BIN)/python" infra/local/stack.py down $(STACK)

clean:
	rm -rf $(VENV) .tools .ray_results mlartifacts mlflow.db

# The two commands: `make pipeline` and `make test` (ruff, mypy, then pytest). Each creates .venv if needed
# and installs the project.
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

# No phone-home from the stack (MLflow honours only the literal "true"); Prefect state stays in the project.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_HOME
# DVC runs stage commands with whatever python/metadqn is first on PATH: make it the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: install pipeline test typecheck lint bench lock clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned here: a CPU wheel on local disk (a looser spec pulls a multi-GB CUDA build); every other
	# package pinned by constraints.txt, so two clones of one commit get the same packages
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

pipeline: $(STAMP)
	$(BIN)/metadqn pipeline

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

# mypy on src/metadqn and flows/ (configured in pyproject.toml's [tool.mypy])
typecheck: $(STAMP)
	$(BIN)/mypy

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/dqn_throughput.py

# Regenerate constraints.txt from pyproject.toml's ranges in a throwaway venv (a deliberate update: review the
# diff and rerun the pipeline, whose bytes may change with a dependency).
LOCK_VENV ?= /tmp/metadqn-lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/pip install -q -e '.[dev,bench]'
	{ sed -n '1,/^# torch is pinned/p' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

clean-venv:
	rm -rf $(VENV)

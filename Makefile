# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

export DJANGO_SETTINGS_MODULE := config.settings

.PHONY: run test install lint format check-migrations clean mutate

$(STAMP): pyproject.toml provider_agent/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./provider_agent -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@HOST=$(HOST) PORT=$(PORT) $(BIN)/python scripts/run_dev.py

test: $(STAMP)
	@$(BIN)/python scripts/run_tests.py

# Mutation testing of the critical modules (docs/testing.md); MODULES= picks some, e.g.
# `make mutate MODULES="ledger billing"`. Not part of `make test`.
mutate: $(STAMP)
	@$(BIN)/python scripts/mutate.py $(MODULES)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var test-artifacts

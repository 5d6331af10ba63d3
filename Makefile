# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed
LOCK := requirements.lock

export DJANGO_SETTINGS_MODULE := config.settings

.PHONY: run test install lock lint format check-migrations clean mutate fuzz-api

# Everything from the lock (hash-checked), then the two local packages without their
# dependencies (the lock has them), built with the lock's setuptools; pip check proves the lock
# still satisfies both pyproject.toml files.
$(STAMP): $(LOCK) pyproject.toml provider_agent/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e ./provider_agent -e .
	$(BIN)/pip check
	@touch $(STAMP)

install: $(STAMP)

# Regenerate the lock from the direct pins of both pyproject.toml files (dev extra included)
# after changing either. Not through $(STAMP): the old lock may lack what was just added.
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/pip-compile || $(BIN)/pip install --quiet "$$(grep -o 'pip-tools==[0-9.]*' pyproject.toml)"
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra dev \
	    --no-emit-index-url --no-emit-find-links --output-file $(LOCK) \
	    pyproject.toml provider_agent/pyproject.toml

run: $(STAMP)
	@HOST=$(HOST) PORT=$(PORT) $(BIN)/python scripts/run_dev.py

test: $(STAMP)
	@$(BIN)/python scripts/run_tests.py

# Mutation testing of the critical modules (docs/testing.md); MODULES= picks some, e.g.
# `make mutate MODULES="ledger billing"`. Not part of `make test`.
mutate: $(STAMP)
	@$(BIN)/python scripts/mutate.py $(MODULES)

# The long Schemathesis run (docs/testing.md): the db tier's tests/db/test_api_fuzz.py with
# FUZZ_EXAMPLES examples per operation, mode and role (CI: 8) and fresh randomness each run.
# Not part of `make test`. PostgreSQL as `make test` uses it (TEST_DATABASE_URL).
FUZZ_EXAMPLES ?= 200
fuzz-api: $(STAMP)
	DJANGO_DEBUG=true MOLT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) MOLT_FUZZ_RANDOM=1 \
	    DATABASE_URL=$${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/molt} \
	    $(BIN)/python -m pytest tests/db/test_api_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var test-artifacts

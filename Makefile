# Fixed verbs: run, test, lint, bench. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint fmt check clean bench soak users

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the proxy with an emulated XSUAA and iFlow runtime on loopback
	$(BIN)/cpi-proxy dev

test: $(STAMP)  ## the whole suite
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format proxy tests
	$(BIN)/ruff check --fix proxy tests

check: $(STAMP)  ## validate bindings and the route file without serving
	$(BIN)/cpi-proxy check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

bench: $(STAMP)  ## side-by-side benchmark (installs nginx and wrk when root); ARGS="--duration 5"
	$(BIN)/python -m pip install --quiet 'uvloop>=0.19'
	$(BIN)/python bench/run.py $(ARGS)

soak: $(STAMP)  ## bounded mixed-load soak against the emulators; ARGS="--minutes 5"
	$(BIN)/python bench/soak.py $(ARGS)

users: $(STAMP)  ## 100,000 distinct users, one request each: the token caches hold; ARGS="--cache-size 100000"
	$(BIN)/python bench/users.py $(ARGS)

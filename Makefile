# sandport: `make demo` runs a gateway with one desktop sandbox; `make test` runs every tier.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
# Tiers run in parallel where they do not share state: each test file builds its own
# gateway with its own state dir, bridge and subnet.
WORKERS ?= 3

.PHONY: setup demo test test-unit lint bench soak fuzz clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/sandport up --demo

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	shellcheck src/sandport/sandbox/images/guest/*.sh scripts/*.sh .ci/run  # guest: busybox sh

test: setup lint
	SANDPORT_REQUIRE=all $(BIN)/pytest -n $(WORKERS) --dist loadfile -p no:cacheprovider tests

test-unit: setup
	$(BIN)/pytest -m unit -p no:cacheprovider tests

bench: setup
	$(BIN)/python bench/run.py && $(BIN)/python bench/ws.py && $(BIN)/python bench/ready.py && $(BIN)/python bench/usernet.py

# Minutes, not a test (short versions of its scenarios are in `make test`).
soak: setup
	$(BIN)/python bench/soak_scale.py && $(BIN)/python bench/soak_faults.py

# Every parser of untrusted bytes under atheris, 10**6 inputs each (fuzz/run.py; 11-26 min here).
fuzz: setup
	$(BIN)/python fuzz/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build src/*.egg-info

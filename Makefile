# The two commands of the README. Both run scripts/setup.sh first, which installs what a fresh
# machine lacks (Debian TTS packages, .venv with a CPU torch and this package) and is a no-op
# afterwards.
VENV ?= .venv
DEMO_DIR ?= runs/demo
# The whole suite, the long end-to-end scenarios included, is what CI runs (.ci/run);
# `make test-quick` leaves the `long` ones out while working on the code.
PYTEST_ARGS ?=

.PHONY: setup demo test test-all test-quick

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/pretrain iterate --config configs/demo.yaml run_dir=$(DEMO_DIR)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-all: test

test-quick: setup
	$(VENV)/bin/python -m pytest -m "not long" $(PYTEST_ARGS)

# The two commands of the README. Both run scripts/setup.sh first, which installs what a fresh
# machine lacks (Debian TTS packages, .venv with a CPU torch and this package) and is a no-op
# afterwards.
VENV ?= .venv
DEMO_DIR ?= runs/demo
# CI's suite: everything but the `long` end-to-end scenarios (README, "Tests"), which
# `make test-all` adds.
PYTEST_ARGS ?= -m "not long"

.PHONY: setup demo test test-all

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/pretrain iterate --config configs/demo.yaml run_dir=$(DEMO_DIR)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/python -m pytest

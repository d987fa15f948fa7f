# The two commands of the README. Both run scripts/setup.sh first, which installs what a fresh
# machine lacks (Debian TTS packages, .venv with a CPU torch and this package) and is a no-op
# afterwards.
VENV ?= .venv
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/pretrain corpus synth --config configs/corpus/demo.yaml --out $(DEMO_DIR)/corpus overwrite=true
	$(VENV)/bin/pretrain shards build --input $(DEMO_DIR)/corpus --out $(DEMO_DIR)/shards --per-shard 16 overwrite=true
	$(VENV)/bin/pretrain shards verify $(DEMO_DIR)/shards
	$(VENV)/bin/pretrain features mfcc --shards $(DEMO_DIR)/shards --out $(DEMO_DIR)/mfcc --fraction 1.0 --jobs 2
	$(VENV)/bin/pretrain kmeans fit --features $(DEMO_DIR)/mfcc --out $(DEMO_DIR)/kmeans --k 100
	$(VENV)/bin/pretrain kmeans assign --kmeans $(DEMO_DIR)/kmeans --shards $(DEMO_DIR)/shards --name km100 --jobs 2
	$(VENV)/bin/pretrain kmeans quality --shards $(DEMO_DIR)/shards --labels km100 --reference phones100 \
		--out $(DEMO_DIR)/quality
	$(VENV)/bin/launch local --nproc 2 pretrain train --config configs/model/tiny.yaml \
		--config configs/train/tiny_cpu.yaml --run-dir $(DEMO_DIR)/train_km100 data.shards=$(DEMO_DIR)/shards \
		data.labels=[km100]
	$(VENV)/bin/pretrain export hf $(DEMO_DIR)/train_km100/checkpoints/step_40 $(DEMO_DIR)/hf

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# make demo: set up, then pretrain on Fashion-MNIST and report k-NN / linear accuracy.
# make test: set up, lint, run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?=
DEMO_ARGS ?=

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo:
	@DATA_ROOT=$(DATA_ROOT) bash scripts/setup.sh --data
	$(PY) -m attnssl pretrain --config mae_fashion_mnist views.global_crops=1 optim.lr=3e-3 $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check attnssl tests benchmarks

test: setup lint
	$(PY) -m pytest -q -n auto --dist worksteal tests

bench:
	@DATA_ROOT=$(DATA_ROOT) bash scripts/setup.sh --data
	$(PY) -m benchmarks.views_throughput
	$(PY) -m benchmarks.b3_bam_memory --readme
	$(PY) -m benchmarks.b1_pretrain --readme $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

clean:
	rm -rf runs .pytest_cache .ruff_cache

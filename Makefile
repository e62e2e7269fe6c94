# wanwu: `make run` serves the demo model on 127.0.0.1:8080; `make test` runs every
# test against a real Docker engine. Both set up whatever is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The worker extra pins torch; ask for it by itself first so pip takes a local CPU build
# where one is configured (override TORCH_PIP_ARGS to pick an index).
TORCH_PIP_ARGS ?= torch==2.13.0
FLAVOR ?= cpu
PYTEST_ARGS ?=

.PHONY: help venv engine base-image image test unit lint run bench clean

help:
	@echo "make run     set up what is missing, build the worker image, serve the demo model on 127.0.0.1:8080"
	@echo "make test    unit, integration and e2e tests against a real Docker engine"
	@echo "make image   build wanwu-worker:$(FLAVOR)"
	@echo "make bench   benchmarks: a table on stdout and JSON in bench-results/"
	@echo "make lint    ruff and mypy"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	touch $@

venv: $(VENV)/.installed

engine:
	@bash deploy/ensure-docker.sh

image: venv engine
	$(BIN)/wanwu image build --flavor $(FLAVOR)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test: image
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check gateway scheduler worker_image tests
	$(BIN)/mypy

run: image
	$(BIN)/wanwu serve --host 127.0.0.1 --port 8080

bench: image
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) worker_image/wheelhouse bench-results .pytest_cache .mypy_cache .ruff_cache

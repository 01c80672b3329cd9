# Two entry points: `make serve` serves the shipped default model, `make test` runs every check
# (lint, the documentation site, the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# `make serve` installs only what serving needs (no torch, no dev tools). Where `nvidia-smi -L`
# lists a GPU it adds onnxruntime-gpu's CUDA 13 and cuDNN 9 runtime wheels (the `cuda` extra);
# a CPU machine never downloads them. `make venv` (and so `make test`) adds everything else.
COMMA := ,
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
SERVE_EXTRAS := $(if $(filter gpu,$(GPU)),serve$(COMMA)cuda,serve)
.PHONY: venv serve-venv serve test lint docs system-packages clean default-model screenshot grpc-stubs

$(BIN)/.serve-$(GPU): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(SERVE_EXTRAS)]"
	touch $@

$(BIN)/.installed: pyproject.toml $(BIN)/.serve-$(GPU)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[train,serve,dev]"
	touch $@

venv: $(BIN)/.installed

# The documentation tools, for `make docs` and `make test` only (not needed to serve).
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

serve-venv: $(BIN)/.serve-$(GPU)

serve: serve-venv
	$(BIN)/python -m service --host $(HOST) --port $(PORT) --models-dir models

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service training
	BIN=$(BIN) deploy/check.sh

# The session-store tests need a real redis-server, and the replicas test a real nginx running
# deploy/nginx.conf; deploy/check.sh needs docker-compose (v1 can validate a compose file without
# an engine); the live page's tests drive Debian's chromium through Playwright (never
# `playwright install`). All four come from Debian's packages.
system-packages:
	@command -v redis-server >/dev/null && command -v docker-compose >/dev/null && command -v chromium >/dev/null && \
		test -x /usr/sbin/nginx || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server docker-compose chromium nginx >/dev/null)

# The site goes to build/site; --strict fails on a broken link or anchor, a missing page or a
# generator error (not with --quiet, which hides the warnings that --strict counts).
docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: system-packages lint docs
	$(BIN)/python -m pytest

# The live page's picture in the docs (docs/assets/live-page.png), taken by its browser test.
screenshot: system-packages venv
	RNNSERVE_DOCS_ASSETS=docs/assets $(BIN)/python -m pytest tests/service/test_ui.py -q -k screenshot
# The gRPC modules in service/grpc/proto from its .proto files (committed; a test checks they match).
grpc-stubs: venv
	$(BIN)/python -m service.grpc.proto.generate

default-model: venv
	$(BIN)/python -m training train --cell gru --task co2 --difference --hidden-size 48 --num-layers 1 \
		--epochs 60 --seed 0 --no-progress --plot --out runs/co2-gru
	$(BIN)/python -m training export runs/co2-gru/checkpoint.pt --out models/co2-forecaster/1 \
		--name co2-forecaster --version 1 --force

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build/site

# Two entry points: `make serve` serves the shipped default model, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve test lint system-packages clean default-model grpc-stubs

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[train,serve,dev]"
	touch $@

venv: $(BIN)/.installed

serve: venv
	$(BIN)/python -m service --host $(HOST) --port $(PORT) --models-dir models

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service training
	BIN=$(BIN) deploy/check.sh

# The session-store tests need a real redis-server; deploy/check.sh needs docker-compose (v1 can
# validate a compose file without an engine). Both come from Debian's packages.
system-packages:
	@command -v redis-server >/dev/null && command -v docker-compose >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server docker-compose >/dev/null)

test: system-packages lint
	$(BIN)/python -m pytest

# The gRPC modules in service/grpc/proto from its .proto files (committed; a test checks they match).
grpc-stubs: venv
	$(BIN)/python -m service.grpc.proto.generate

default-model: venv
	$(BIN)/python -m training train --cell gru --task co2 --difference --hidden-size 48 --num-layers 1 \
		--epochs 60 --seed 0 --no-progress --plot --out runs/co2-gru
	$(BIN)/python -m training export runs/co2-gru/checkpoint.pt --out models/co2-forecaster/1 \
		--name co2-forecaster --version 1

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

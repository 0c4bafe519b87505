# medmesh: `make up` starts the whole platform, `make test` tests it. Both set up first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
BOOTSTRAP := build/bootstrap
UV := $(BOOTSTRAP)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := build/proto/medmesh.binpb
# `buf breaking` compares the protos with this git revision (skipped where it has no protos).
BREAKING_AGAINST ?= main

.PHONY: help setup up down status test lint typecheck proto-lint proto-breaking gateway-validate unit integration k8s-gateway bench-startup bench-auth bench-mqtt clean

help:
	@echo "make up     - set up if needed, then start the platform (Ctrl-C stops it)"
	@echo "make test   - set up if needed, then lint, type-check and run every test"
	@echo "make setup  - install everything the project needs (idempotent)"
	@echo "make down / make status - stop or inspect a platform started with 'medmesh up --detach'"
	@echo "make bench-startup - time a cold make setup and a warm make up (fresh clone, empty caches)"
	@echo "make bench-auth - time login and authenticated, audited requests through the gateway"
	@echo "make bench-mqtt - device ingest, latency, fleet, commands and memory, medmesh beside Mosquitto (about 20 min)"

$(UV):
	$(PYTHON) -m venv $(BOOTSTRAP)
	$(BOOTSTRAP)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --quiet
	@touch $@

$(GEN_STAMP): $(VENV)/.synced $(PROTOS) tools/protogen.py
	$(PY) tools/protogen.py

setup: $(VENV)/.synced $(GEN_STAMP)
	tools/install-ferretdb.sh
	tools/install-mosquitto.sh
	$(BIN)/medmesh init

up: setup
	$(BIN)/medmesh up

down:
	$(BIN)/medmesh down

status:
	$(BIN)/medmesh status

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check medmesh/runtime services mqtt_adapter tools

typecheck: setup
	$(BIN)/mypy medmesh services mqtt_adapter tools tests clients

proto-lint: setup
	$(BIN)/buf lint $(GEN_STAMP) --config buf.yaml

proto-breaking: setup
	tools/proto-breaking.sh $(BREAKING_AGAINST)

gateway-validate: setup
	$(BIN)/envoy --mode validate -c gateway/envoy.yaml --log-level warn

unit: setup
	$(BIN)/pytest tests/unit -q

integration: setup
	$(BIN)/pytest tests/integration -q

test: lint typecheck proto-lint proto-breaking gateway-validate
	$(BIN)/pytest -q

bench-mqtt: setup
	$(PY) tools/bench_mqtt.py $(BENCH_MQTT_ARGS)

bench-startup:
	tools/bench-startup.sh

k8s-gateway: setup
	$(PY) tools/render_k8s_gateway.py

clean:
	rm -rf build $(VENV)

bench-auth: setup
	$(PY) tools/bench_auth.py

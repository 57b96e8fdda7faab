# Two commands matter: `make demo` and `make test`. Both set themselves up (cached under ~/.cache/anomalyd).
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/anomalyd
VENV ?= $(CACHE)/venv
export ANOMALYD_CACHE := $(CACHE)
export ANOMALYD_VENV := $(VENV)
PY := $(VENV)/bin/python

.PHONY: setup test unit demo lint format kafka-start kafka-stop
setup:
	@bash scripts/setup.sh

test: setup
	@$(VENV)/bin/ruff check .
	@$(PY) -m pytest -q

unit: setup
	@$(PY) -m pytest -q -m "not integration"

demo: setup
	@$(VENV)/bin/anomalyd demo $(DEMO_ARGS)

lint: setup
	@$(VENV)/bin/ruff check .

kafka-start: setup
	@bash scripts/kafka.sh start

kafka-stop:
	@bash scripts/kafka.sh stop

format: setup
	@$(VENV)/bin/ruff format detector pipelines tests benchmarks

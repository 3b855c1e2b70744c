"""What import-linter cannot express (it sees external packages only whole): Kafka clients are built, and
aiokafka's internals touched, only in ``pipeline/kafka.py``. The package layers themselves are checked by
``lint-imports`` (``.importlinter``) in ``make test``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}
INTERNALS = {"_fetcher", "_coordinator", "_client", "_txn_manager", "_subscription", "_sender"}
AIOKAFKA_MODULES = {"aiokafka", "aiokafka.errors", "aiokafka.structs", "aiokafka.admin"}


def _modules():
    for pkg in ("pipeline", "consumers", "producers"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if p != ROOT / "pipeline" / "kafka.py":
                yield p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))


def test_kafka_clients_and_aiokafka_internals_only_in_pipeline_kafka():
    found = []
    for path, tree in _modules():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CLIENTS:
                found.append(f"{rel}:{node.lineno} builds {node.func.id}")
            if isinstance(node, ast.Attribute) and node.attr in INTERNALS:
                found.append(f"{rel}:{node.lineno} reads aiokafka's {node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aiokafka") \
                    and node.module not in AIOKAFKA_MODULES:
                found.append(f"{rel}:{node.lineno} imports {node.module}")
    assert not found, "\n".join(found)


def test_the_layer_contracts_are_configured():
    cfg = (ROOT / ".importlinter").read_text()
    for contract in ("core-is-standalone", "kafka-in-one-place", "consumers-producers", "no-cycles"):
        assert f"[importlinter:contract:{contract}]" in cfg

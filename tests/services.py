"""Real-service fixtures: Apache Kafka (KRaft) and redis-server, never mocks.

Kafka, in order of preference: the broker named by STREAMLABEL_TEST_BOOTSTRAP; a testcontainers broker where a
Docker engine answers; else the local broker that deploy/kafka/kafka.sh starts from Maven Central jars.
Redis: a redis-server on a free port per test, so a test can kill and restart it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from pipeline.cli.local_services import LocalKafka, LocalRedis


def _docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """A session-wide broker; yields an object with ``.bootstrap`` (a LocalKafka when we started one)."""
    named = os.environ.get("STREAMLABEL_TEST_BOOTSTRAP")
    if named:
        yield type("External", (), {"bootstrap": named})()
        return
    if _docker_engine() and os.environ.get("STREAMLABEL_TEST_NO_DOCKER") != "1":
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kc:
            yield type("Container", (), {"bootstrap": kc.get_bootstrap_server()})()
        return
    broker = LocalKafka(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture()
def redis_server(tmp_path):
    r = LocalRedis(workdir=tmp_path / "redis").start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture()
def names():
    """Unique topic and group names for one test."""
    tag = uuid.uuid4().hex[:8]
    return type("Names", (), {"input": f"in-{tag}", "output": f"out-{tag}", "dlq": f"dlq-{tag}", "group": f"g-{tag}",
                              "tag": tag})()

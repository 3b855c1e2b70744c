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


class LocalRegistry:
    """A real Confluent-compatible Schema Registry (Apicurio Registry from Maven Central, deploy/schema-registry/)
    on free ports, its state in a Kafka topic of the test broker: a restart keeps every schema and id."""

    SCRIPT = os.path.join(os.path.dirname(__file__), "..", "deploy", "schema-registry", "registry.sh")

    def __init__(self, workdir, bootstrap: str | None, *, tls: tuple[str, str] | None = None) -> None:
        """``bootstrap`` None: in memory. ``tls``: (certificate, key) PEM files; HTTPS on ``self.tls_port`` too."""
        from pipeline.cli.local_services import free_port

        self.dir = str(workdir)
        self.bootstrap = bootstrap
        self.topic = f"registry-{uuid.uuid4().hex[:8]}"
        self.port = free_port(pair=True)
        self.url = f"http://127.0.0.1:{self.port}/apis/ccompat/v7"
        self.env = dict(os.environ)
        if tls is not None:
            self.tls_port = free_port()
            self.https_url = f"https://127.0.0.1:{self.tls_port}/apis/ccompat/v7"
            self.env["REGISTRY_EXTRA_OPTS"] = (f"-Dquarkus.http.ssl-port={self.tls_port} "
                                               f"-Dquarkus.http.ssl.certificate.files={tls[0]} "
                                               f"-Dquarkus.http.ssl.certificate.key-files={tls[1]}")

    def start(self) -> LocalRegistry:
        storage = ["--kafka", self.bootstrap, "--topic", self.topic] if self.bootstrap else []
        subprocess.run([self.SCRIPT, "start", "--port", str(self.port), "--dir", self.dir, *storage], check=True,
                       capture_output=True, timeout=180, env=self.env)
        return self

    def stop(self, kill: bool = False) -> None:
        subprocess.run([self.SCRIPT, "kill" if kill else "stop", self.dir], check=False, capture_output=True,
                       timeout=60)


@pytest.fixture(scope="module")
def schema_registry(kafka, tmp_path_factory):
    reg = LocalRegistry(tmp_path_factory.mktemp("registry"), kafka.bootstrap).start()
    try:
        yield reg
    finally:
        reg.stop()

"""The broker bundle (deploy/kafka/bundle.py: a jlink'd Java runtime + the broker jars, this platform's native code
only), which starts Kafka on a machine with no Java and no network: it runs on its own runtime, serves a produce/
consume round trip with each compression codec (the broker compresses: the kept native libraries load), and
exactly-once transactions (a committed one is read, an aborted one is not)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.cli.local_services import LocalKafka
from producers.topics import ensure_topics, produce, read_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not shutil.which("jlink"), reason="building the bundle needs the JDK's jlink")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "kafka-bundle"
    r = subprocess.run([sys.executable, str(ROOT / "deploy/kafka/bundle.py"), "build", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "native libraries of other platforms left out" in r.stdout
    return out


@pytest.fixture(scope="module")
def broker(bundle, tmp_path_factory):
    b = LocalKafka(tmp_path_factory.mktemp("bundle-kafka"), bundle=bundle).start()
    try:
        yield b
    finally:
        b.stop()


def test_the_bundle_keeps_only_this_platforms_native_code(bundle):
    natives = [n for jar in (bundle / "lib").glob("*.jar") for n in zipfile.ZipFile(jar).namelist()
               if n.endswith((".so", ".dylib", ".dll", ".jnilib", ".a"))]
    assert natives and all("linux/" in n.lower() for n in natives), natives
    assert not any(s in n.lower() for n in natives for s in ("darwin", "win", "aarch64", "s390x", "ppc64"))
    assert (bundle / "jre" / "bin" / "java").exists() and not (bundle / "jre" / "include").exists()


def test_the_broker_runs_on_the_bundles_own_java(broker, bundle):
    exe = os.readlink(f"/proc/{broker.pid}/exe")
    assert exe == str(bundle / "jre" / "bin" / "java")


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "gzip"])
async def test_a_round_trip_through_a_topic_the_broker_compresses(broker, names, codec):
    topic = f"{names.input}-{codec}"
    await ensure_topics(broker.bootstrap, [topic], partitions=1, configs={"compression.type": codec})
    values = [f"event {i} {'x' * (i % 50)}".encode() for i in range(200)]
    await produce(broker.bootstrap, topic, values)
    got = await read_until(broker.bootstrap, [topic], lambda r: len(r) >= len(values), 30)
    assert [r.value for r in got] == values


async def test_exactly_once_transactions_commit_and_abort(broker, names):
    topic = names.input
    await ensure_topics(broker.bootstrap, [topic], partitions=1)
    p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=f"{names.group}-tx",
                         enable_idempotence=True)
    await p.start()
    try:
        async with p.transaction():
            for i in range(5):
                await p.send(topic, f"committed {i}".encode())
        await p.begin_transaction()
        await p.send(topic, b"aborted")
        await p.abort_transaction()
        async with p.transaction():
            await p.send(topic, b"committed last")
    finally:
        await p.stop()
    c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, isolation_level="read_committed",
                         enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        seen: list[bytes] = []
        end = (await c.end_offsets([tp]))[tp]
        while await c.position(tp) < end:
            for recs in (await c.getmany(timeout_ms=1000)).values():
                seen += [r.value for r in recs]
    finally:
        await c.stop()
    assert seen == [f"committed {i}".encode() for i in range(5)] + [b"committed last"]

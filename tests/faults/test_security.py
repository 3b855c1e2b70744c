"""SASL_SSL/SCRAM to Kafka and AUTH + TLS to Redis, against real servers; secrets and texts never logged."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import orjson
import pytest

from pipeline.config import Settings
from pipeline.kafka import client_kwargs as kafka_client_kwargs
from pipeline.events import encode_input
from pipeline.cli.local_services import LocalKafka, LocalRedis, free_port
from producers.topics import ensure_topics, produce, read_until

pytestmark = pytest.mark.faults

KAFKA_PASSWORD = "kafka-Secret-8731"
REDIS_PASSWORD = "redis-Secret-4419"
MARKER = "CONFIDENTIAL-TEXT"


def make_certs(d) -> dict:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl), plus a PKCS12 keystore for Kafka."""
    def sh(*args):
        subprocess.run(args, check=True, capture_output=True, cwd=d)

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
       "-subj", "/CN=streamlabel-test-ca")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
       "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
       "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    sh("openssl", "pkcs12", "-export", "-in", "server.pem", "-inkey", "server.key", "-out", "server.p12",
       "-passout", "pass:changeit", "-name", "broker")
    return {k: str(d / f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"), ("p12", "server.p12"))}


@pytest.fixture()
def secure(tmp_path):
    certs = make_certs(tmp_path)
    port, sport = free_port(pair=True), free_port()
    props = "\n".join([
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1},SASL_SSL://127.0.0.1:{sport}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sport}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms=SCRAM-SHA-256",
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"ssl.keystore.location={certs['p12']}", "ssl.keystore.type=PKCS12",
        "ssl.keystore.password=changeit", "ssl.key.password=changeit",
    ])
    broker = LocalKafka(tmp_path / "kafka", port=port, extra_props=props,
                        scram=f"SCRAM-SHA-256=[name=alice,password={KAFKA_PASSWORD}]").start()
    redis = LocalRedis(password=REDIS_PASSWORD, tls=(certs["cert"], certs["key"], certs["ca"]),
                       workdir=tmp_path / "redis").start()
    try:
        yield type("Secure", (), {"bootstrap": f"127.0.0.1:{sport}", "certs": certs, "redis": redis})()
    finally:
        redis.stop()
        broker.kill()


def client_kw(secure, password=KAFKA_PASSWORD) -> dict:
    s = Settings().replace(kafka={"bootstrap_servers": secure.bootstrap, "security_protocol": "SASL_SSL",
                                  "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "alice",
                                  "sasl_password": password, "ssl_cafile": secure.certs["ca"]})
    kw = kafka_client_kwargs(s.kafka)
    kw.pop("bootstrap_servers")
    return kw


def worker_env(secure, names, password=KAFKA_PASSWORD) -> dict:
    return {**os.environ,
            "STREAMLABEL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "STREAMLABEL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
            "STREAMLABEL_KAFKA__SASL_USERNAME": "alice", "STREAMLABEL_KAFKA__SASL_PASSWORD": password,
            "STREAMLABEL_KAFKA__SSL_CAFILE": secure.certs["ca"],
            "STREAMLABEL_CACHE__REDIS_URL": secure.redis.url, "STREAMLABEL_CACHE__REDIS_PASSWORD": REDIS_PASSWORD,
            "STREAMLABEL_CACHE__REDIS_CA_FILE": secure.certs["ca"], "STREAMLABEL_CACHE__TIMEOUT_MS": "500",
            "STREAMLABEL_LOG__LEVEL": "debug", "STREAMLABEL_LOG__FORMAT": "json", "STREAMLABEL_METRICS__PORT": "none",
            "STREAMLABEL_METRICS__SUMMARY_INTERVAL_S": "0.5"}


def run_worker(secure, names, artifact, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--model", str(artifact), "--bootstrap",
                             secure.bootstrap, "--input", names.input, "--output", names.output, "--dlq", names.dlq,
                             "--group", names.group], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_sasl_ssl_scram_and_redis_tls_auth_and_no_secrets_in_logs(secure, names, tiny_artifact):
    import redis

    kw = client_kw(secure)
    await ensure_topics(secure.bootstrap, [names.input, names.output, names.dlq], **kw)
    texts = [f"{MARKER} {i}: my card number is on file" for i in range(50)]
    await produce(secure.bootstrap, names.input, [encode_input(t, id=f"s{i}") for i, t in enumerate(texts)]
                  + [b'{"text": 5, "note": "' + MARKER.encode() + b'"}'], **kw)
    proc = run_worker(secure, names, tiny_artifact, worker_env(secure, names))
    try:
        want = {f"s{i}" for i in range(50)}
        out = await read_until(secure.bootstrap, [names.output],
                               lambda r: want <= {orjson.loads(x.value)["id"] for x in r}, 120, **kw)
        assert want <= {orjson.loads(x.value)["id"] for x in out}
        r = redis.Redis(host="127.0.0.1", port=secure.redis.port, password=REDIS_PASSWORD, ssl=True,
                        ssl_ca_certs=secure.certs["ca"])
        assert len(r.keys("sl:*")) == 50, "labels were cached in Redis over TLS with AUTH"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=secure.redis.port, password="wrong", ssl=True,
                        ssl_ca_certs=secure.certs["ca"]).ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        logs = (await asyncio.to_thread(proc.communicate, timeout=60))[0].decode()
    assert proc.returncode == 0, logs[-2000:]
    assert "worker_started" in logs and "dead_letter" in logs and "summary" in logs, "debug logs were captured"
    for secret in (KAFKA_PASSWORD, REDIS_PASSWORD, "changeit", MARKER):
        assert secret not in logs, f"{secret!r} appears in the logs"


async def test_wrong_kafka_password_is_one_clear_error(secure, names, tiny_artifact):
    proc = run_worker(secure, names, tiny_artifact, worker_env(secure, names, password="not-the-password"))
    out = (await asyncio.to_thread(proc.communicate, timeout=120))[0].decode()
    assert proc.returncode == 2, out[-2000:]
    last = out.strip().splitlines()[-1]  # at debug level aiokafka's own lines come first
    assert last.startswith(f"error: Kafka at {secure.bootstrap} refused the SASL credentials"), out[-2000:]
    assert "Traceback" not in out and "not-the-password" not in out


def sasl_config(tmp_path, secure, password=KAFKA_PASSWORD):
    cfg = tmp_path / "sasl.toml"
    cfg.write_text(f"""[kafka]
bootstrap_servers = "{secure.bootstrap}"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-256"
sasl_username = "alice"
sasl_password = "{password}"
ssl_cafile = "{secure.certs['ca']}"
""")
    return cfg


async def test_produce_replay_and_tail_use_the_sasl_ssl_settings_of_the_config(secure, names, tmp_path):
    """The feeding and reading commands build their clients from the same settings as the worker."""
    kw = client_kw(secure)
    await ensure_topics(secure.bootstrap, [names.input, names.output], **kw)
    cfg = sasl_config(tmp_path, secure)
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\nthree\n")
    env = {**os.environ, "STREAMLABEL_LOG__FORMAT": "json"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    r = cli("produce", "-c", str(cfg), "--topic", names.input, "--count", "5", "--rate", "100")
    assert r.returncode == 0 and orjson.loads(r.stdout)["acked"] == 5, r.stderr[-2000:]
    r = cli("replay", str(texts), "-c", str(cfg), "--topic", names.input, "--rate", "100")
    assert r.returncode == 0 and orjson.loads(r.stdout)["acked"] == 3, r.stderr[-2000:]
    got = await read_until(secure.bootstrap, [names.input], lambda x: len(x) >= 8, 60, **kw)
    assert len(got) == 8
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(cfg.read_text().replace(KAFKA_PASSWORD, "wrong-one"))
    r = cli("produce", "-c", str(wrong), "--topic", names.input, "--count", "1")
    assert r.returncode == 2 and "refused the SASL credentials" in r.stderr and "wrong-one" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

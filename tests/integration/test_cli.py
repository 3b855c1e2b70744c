"""The CLI against a real broker (and redis-server): missing topics, --create-topics, --config, Redis refusals,
and Ctrl-C / SIGTERM to long commands (prompt exit 130 / 143, cleanup, no traceback)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest

from pipeline.cli.local_services import LocalRedis
from producers.topics import ensure_topics, produce, read_until, topic_names

pytestmark = pytest.mark.integration

DRAIN_S = 10  # worker.drain_timeout_s: the promptness bound for a stop


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


class Running:
    """A CLI subprocess whose stderr is read as it comes, so a test can wait for a line (with a timeout)."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        # SIGINT back to its default in the child: a suite started as a background job of a script inherits it
        # ignored, and the CLI keeps an ignored SIGINT ignored (as nohup asks), which is not what these tests test.
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # EOF marker
            self._changed.notify_all()

    def _wait(self, pattern: str, timeout: float) -> re.Match | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == ""):
                    return None
                self._changed.wait(left)

    async def line(self, pattern: str, timeout: float = 60) -> re.Match:
        m = await asyncio.to_thread(self._wait, pattern, timeout)
        assert m, f"no stderr line matching {pattern!r} in {timeout} s: {''.join(self.lines)[-2000:]}"
        return m

    def signal(self, sig: int, timeout: float = DRAIN_S + 5) -> tuple[int, float, str, str]:
        """Send ``sig``; return (exit code, seconds it took to exit, stdout, stderr)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        took = time.monotonic() - t0
        out = self.proc.stdout.read()
        self._reader.join(10)
        return self.proc.returncode, took, out, "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)




# ------------------------------------------------------------------------------------------ topics
@pytest.mark.parametrize("cmd, line", [
    (["produce", "--count", "3"], "error: produce: the target topic '{t}' does not exist on {b} (create it "
                                  "with kafka-topics.sh --create, fix the name, or pass --create-topics)"),
    (["replay", "FILE"], "error: replay: the target topic '{t}' does not exist on {b} (create it "
                         "with kafka-topics.sh --create, fix the name, or pass --create-topics)"),
    (["alerts", "tail"], "error: alerts tail: the alert topic '{t}' does not exist on {b} (start `streamlabel alerts "
                         "run`, which publishes there, or fix --topic / alerting.output)"),
])
async def test_missing_topic_is_one_line_and_is_not_created(kafka, tmp_path, cmd, line):
    f = tmp_path / "texts.txt"
    f.write_text("one\ntwo\n")
    topic = f"missing-{uuid.uuid4().hex[:8]}"
    r = cli(*[str(f) if a == "FILE" else a for a in cmd], "--topic", topic, "--bootstrap", kafka.bootstrap)
    assert (r.returncode, r.stderr, r.stdout) == (2, line.format(t=topic, b=kafka.bootstrap) + "\n", "")
    assert topic not in await topic_names(kafka.bootstrap), "a check must not auto-create the topic"


async def test_create_topics_flag_creates_then_sends(kafka, names):
    r = cli("produce", "--count", "3", "--rate", "200", "--topic", names.input, "--bootstrap", kafka.bootstrap,
            "--create-topics")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acked"] == 3
    got = await read_until(kafka.bootstrap, [names.input], lambda x: len(x) >= 3, 30)
    assert len(got) == 3 and all(b'"text"' in x.value for x in got)


async def test_config_file_drives_replay_topic_and_creation(kafka, names, tmp_path):
    """``--config`` on replay: bootstrap, the default topic (topics.input) and topics.create come from the file."""
    cfg = tmp_path / "feed.toml"
    cfg.write_text(f'[kafka]\nbootstrap_servers = "{kafka.bootstrap}"\n\n[topics]\ninput = "{names.input}"\n'
                   'create = true\npartitions = 2\n')
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"text": "Shares fell", "entity": "ACME"}\n{"text": "Guidance raised", "entity": "ACME"}\n')
    r = cli("replay", str(f), "-c", str(cfg), "--rate", "200")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acked"] == 2
    got = await read_until(kafka.bootstrap, [names.input], lambda x: len(x) >= 2, 30)
    assert sorted(orjson.loads(x.value)["id"] for x in got) == ["corpus-0", "corpus-1"]
    assert {x.partition for x in got} <= {0, 1} and {x.key for x in got} == {b"ACME"}


# ------------------------------------------------------------------------------------------ Ctrl-C / SIGTERM
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_produce_stops_promptly_on_signal(kafka, names, sig, code):
    await ensure_topics(kafka.bootstrap, [names.input])
    p = Running("produce", "--topic", names.input, "--rate", "50", "--duration", "300", "--bootstrap", kafka.bootstrap)
    try:
        await read_until(kafka.bootstrap, [names.input], lambda x: len(x) >= 5, 30)  # it is sending
        rc, took, out, err = p.signal(sig)
    finally:
        p.kill()
    assert rc == code and took < DRAIN_S, (rc, took, err[-2000:])
    assert "Traceback" not in err and "Unclosed" not in err
    report = json.loads(out)
    assert report["interrupted"] == signal.Signals(sig).name
    assert report["sent"] >= 5 and report["acked"] == report["sent"] and report["failed"] == 0


async def test_replay_loop_stops_promptly_on_sigint(kafka, names, tmp_path):
    await ensure_topics(kafka.bootstrap, [names.input])
    f = tmp_path / "loop.csv"
    f.write_text("text\nalpha\nbeta\n")
    p = Running("replay", str(f), "--loop", "--topic", names.input, "--rate", "50", "--bootstrap", kafka.bootstrap)
    try:
        await read_until(kafka.bootstrap, [names.input], lambda x: len(x) >= 5, 30)  # looping
        rc, took, out, err = p.signal(signal.SIGINT)
    finally:
        p.kill()
    assert rc == 130 and took < DRAIN_S and "Traceback" not in err, (rc, took, err[-2000:])
    report = json.loads(out)
    assert report["interrupted"] == "SIGINT" and report["acked"] == report["sent"] >= 5


async def test_alerts_tail_renders_and_stops_on_sigint(kafka, names):
    topic = f"alerts-{names.tag}"
    await ensure_topics(kafka.bootstrap, [topic])
    alert = {"alert_id": "neg:ACME:1", "status": "firing", "rule": "negative-news", "kind": "share", "key": "entity",
             "entity": "ACME", "severity": "critical", "value": 0.83, "threshold": 0.7, "window_s": 300,
             "labels": ["negative"], "sample_ids": ["e17", "e19"], "first_event_at": 1732330000123,
             "last_event_at": 1732330290000, "at": 1732330290000}
    await produce(kafka.bootstrap, topic, [orjson.dumps(alert), b"not json"], keys=[b"ACME", b"ACME"])
    r = cli("alerts", "tail", "--topic", topic, "--bootstrap", kafka.bootstrap, "--count", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.match(r"FIRING  \d\d:\d\d:\d\d negative-news entity=ACME value 0\.83 \(threshold 0\.7\) window 300s "
                    r"samples e17, e19$", lines[0]), lines
    assert lines[1].startswith("not an alert event: partition ")

    p = Running("alerts", "tail", "--topic", topic, "--bootstrap", kafka.bootstrap, "--no-from-beginning")
    try:
        await p.line(rf"alerts on {topic} ")  # its consumer has started
        rc, took, out, err = p.signal(signal.SIGINT)
    finally:
        p.kill()
    assert rc == 130 and took < DRAIN_S and "Traceback" not in err, (rc, took, err[-2000:])
    assert out == ""  # --no-from-beginning: nothing new arrived


# ------------------------------------------------------------------------------------------ alerts run
def alerts_config(tmp_path: Path, bootstrap: str, names, redis_url: str) -> Path:
    cfg = tmp_path / "alerts.toml"
    cfg.write_text(f'[kafka]\nbootstrap_servers = "{bootstrap}"\n\n[topics]\noutput = "{names.output}"\n\n'
                   f'[alerting]\noutput = "alerts-{names.tag}"\ngroup_id = "al-{names.tag}"\n'
                   f'state_redis_url = "{redis_url}"\n\n'
                   '[[alerting.rules]]\nname = "neg"\nkind = "share"\nlabels = ["negative"]\nthreshold = 0.7\n'
                   'window_s = 300\n')
    return cfg


def test_alerts_run_redis_password_refused_or_missing(kafka, names, tmp_path):
    r = LocalRedis(password="the-right-one", workdir=tmp_path / "redis").start()
    try:
        cfg = alerts_config(tmp_path, kafka.bootstrap, names, r.url)
        wrong = cli("alerts", "run", "-c", str(cfg), env={"STREAMLABEL_CACHE__REDIS_PASSWORD": "not-the-password"})
        none = cli("alerts", "run", "-c", str(cfg))
    finally:
        r.stop()
    assert (wrong.returncode, wrong.stderr) == (
        2, f"error: alerting.state_redis_url: Redis at {r.url} refused the password "
           "(check cache.redis_password or STREAMLABEL_CACHE__REDIS_PASSWORD)\n")
    assert (none.returncode, none.stderr) == (
        2, f"error: alerting.state_redis_url: Redis at {r.url} needs a password "
           "(set cache.redis_password or STREAMLABEL_CACHE__REDIS_PASSWORD)\n")


async def test_alerts_run_missing_label_topic_then_runs_and_stops(kafka, names, redis_server, tmp_path):
    cfg = alerts_config(tmp_path, kafka.bootstrap, names, redis_server.url)
    r = cli("alerts", "run", "-c", str(cfg))
    assert (r.returncode, r.stderr) == (
        2, f"error: alerts run: the label topic '{names.output}' does not exist on {kafka.bootstrap} (also missing: "
           f"'alerts-{names.tag}') (create it with kafka-topics.sh --create, fix the name, or pass --create-topics)\n")
    await ensure_topics(kafka.bootstrap, [names.output])
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):  # SIGTERM is a service's normal stop
        p = Running("alerts", "run", "-c", str(cfg), "--create-topics")  # creates the alert topic
        try:
            await p.line("alerting_assigned")
            rc, took, out, err = p.signal(sig)
        finally:
            p.kill()
        assert rc == code and took < DRAIN_S and "Traceback" not in err, (rc, took, err[-2000:])
        assert "alerting_stopped" in err
    assert f"alerts-{names.tag}" in await topic_names(kafka.bootstrap)


# ------------------------------------------------------------------------------------------ demo
async def test_demo_sigint_stops_worker_and_its_redis(kafka, tiny_artifact):
    p = Running("demo", "--model", str(tiny_artifact), "--bootstrap", kafka.bootstrap, "--rate", "50")
    try:
        port = int((await p.line(r"redis-server on redis://127\.0\.0\.1:(\d+)/0", 60)).group(1))
        await p.line(r"worker on tiny@1", 120)
        await p.line(r"labelled +\d+ ", 30)  # the feed runs and the live view prints
        rc, took, out, err = p.signal(signal.SIGINT)
    finally:
        p.kill()
    assert rc == 130 and took < DRAIN_S and "Traceback" not in err, (rc, took, err[-3000:])
    with pytest.raises(OSError):  # the redis-server the demo started is gone
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_demo_task_reply_generates_answers_end_to_end(kafka, tiny_generator):
    r = cli("demo", "--task", "reply", "--model", str(tiny_generator), "--events", "12", "--rate", "20",
            "--bootstrap", kafka.bootstrap, "--redis", "none", "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["produced"] == 12 and out["lost"] == 0 and out["task"] == "reply"
    assert out["model"].startswith("tiny-generator@") and out["tokens_per_answer"] > 0
    assert out["slo"]["objective_ms"] == 5000.0, "a generation's deadline is seconds, not the classifier's 100 ms"
    assert out["samples"] and all(s["out"] is not None for s in out["samples"])


@pytest.mark.train
def test_demo_preset_builds_into_its_own_slot(kafka, tmp_path):
    r = cli("demo", "--preset", "tiny", "--events", "40", "--rate", "100", "--bootstrap", kafka.bootstrap,
            "--redis", "none", "--json", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["produced"] == 40 and out["lost"] == 0 and out["model"] == "tiny@1"
    manifest = json.loads((tmp_path / "models" / "tiny" / "1" / "manifest.json").read_text())
    assert manifest["name"] == "tiny"
    assert not (tmp_path / "models" / "sentiment-minilm").exists(), "another preset's slot was written"

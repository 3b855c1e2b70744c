"""Local real services for the demo, the benchmarks and the tests: Apache Kafka (KRaft) and redis-server.

Part of the CLI (``demo`` and ``bench`` start them when no broker or Redis is named); the tests use them too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from pipeline.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def free_port(pair: bool = False) -> int:
    """A free TCP port on loopback (and the next one too, with ``pair``: Kafka's controller uses it)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair or port >= 65535:
            return port
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair found")


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)  # polling a port: the only readiness signal a server process gives
    return False


class LocalKafka:
    """A single-node KRaft broker from the jars deploy/kafka resolves; its data dir survives restarts."""

    def __init__(self, data_dir: str | Path, port: int | None = None, extra_props: str = "",
                 scram: str | None = None, bundle: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        # A broker bundle (deploy/kafka/bundle.py: its own Java runtime and jars); default: $KAFKA_BUNDLE, if set.
        self.bundle = str(bundle) if bundle else os.environ.get("KAFKA_BUNDLE") or None
        self.port = port or free_port(pair=True)
        self.extra_props = extra_props
        self.scram = scram  # e.g. "SCRAM-SHA-256=[name=alice,password=secret]", created at format time

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _sh(self, *args: str, timeout: float = 300) -> None:
        if not self.bundle and not shutil.which("java"):
            raise UsageError("Java is not installed; the local Kafka broker needs it",
                             hint="apt-get install openjdk-17-jre-headless, set KAFKA_BUNDLE to a broker bundle "
                                  "(make broker-bundle), or point --bootstrap at a running broker")
        env = {**os.environ, "KAFKA_EXTRA_PROPS": self.extra_props, "KAFKA_SCRAM": self.scram or ""}
        if self.bundle:
            env["KAFKA_BUNDLE"] = self.bundle
        r = subprocess.run([str(KAFKA_SH), *args], capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise UsageError(f"local Kafka: {(r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else 'failed'}",
                             hint=f"see {self.data_dir / 'broker.log'}")

    def start(self) -> LocalKafka:
        self._sh("start", str(self.port), str(self.data_dir))
        return self

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "broker.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.pid:
            self._sh("stop", str(self.data_dir), timeout=60)

    def kill(self) -> None:
        pid = self.pid
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid)
            (self.data_dir / "broker.pid").unlink(missing_ok=True)

    def pause(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGCONT)


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)


class LocalRedis:
    """redis-server on a fixed port (kept across restarts so clients reconnect), no persistence."""

    def __init__(self, port: int | None = None, password: str | None = None, workdir: str | Path | None = None,
                 tls: tuple[str, str, str] | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.workdir = Path(workdir) if workdir else None
        self.tls = tls  # (cert, key, ca): TLS only, no plaintext port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> LocalRedis:
        exe = shutil.which("redis-server")
        if exe is None:
            raise UsageError("redis-server is not installed", hint="apt-get install redis-server, or run without a cache")
        args = [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--loglevel", "warning"]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)
            args += ["--dir", str(self.workdir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if not wait_port(self.port, 10, self.proc):
            raise UsageError(f"redis-server did not start on port {self.port}")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

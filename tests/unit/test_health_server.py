"""The metrics/health endpoint: bounded threads and timeouts, and liveness that reflects the event loop."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time

from pipeline.metrics import Heartbeat, Metrics


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling a condition, bounded above


def test_idle_connections_cannot_pin_threads_without_bound():
    m = Metrics()
    port = _free_port()
    server, _ = m.serve(port, max_connections=4, timeout_s=0.5)
    base = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]  # connect, send nothing
    try:
        _wait(lambda: server.refused >= 36, 5, "the connections beyond the bound to be refused")
        assert threading.active_count() <= base + 4, "one thread per connection, without bound"
        refused = idle[-1].recv(100)
        assert refused.startswith(b"HTTP/1.0 503")
        # the idle ones time out after 0.5 s and the endpoint answers again
        _wait(lambda: threading.active_count() <= base, 5, "the idle handler threads to time out")
        status, body = _get(port, "/metrics")
        assert status == 200 and b"streamlabel_events_total" in body
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_liveness_fails_while_the_event_loop_is_wedged():
    hb = Heartbeat(stall_s=0.3, period_s=0.05)
    m = Metrics()
    port = _free_port()
    server, _ = m.serve(port, liveness=hb)
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        asyncio.run_coroutine_threadsafe(hb.run(), loop)
        _wait(lambda: _get(port, "/healthz")[0] == 200, 5, "a live loop")
        wedged = threading.Event()

        def wedge():  # a blocking call on the loop: nothing else runs on it meanwhile
            wedged.set()
            time.sleep(1.0)

        loop.call_soon_threadsafe(wedge)
        wedged.wait(5)
        _wait(lambda: _get(port, "/healthz")[0] == 503, 5, "liveness to fail while the loop is wedged")
        status, body = _get(port, "/healthz")
        assert b'"alive": false' in body and b"loop_heartbeat_age_s" in body
        _wait(lambda: _get(port, "/healthz")[0] == 200, 5, "liveness to come back with the loop")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        server.shutdown()
        server.server_close()

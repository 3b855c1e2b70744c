"""A small OTLP/HTTP trace receiver (the tracing tests, and the benches that measure tracing): the SDK's real exporter posts protobuf
``ExportTraceServiceRequest`` bodies to ``/v1/traces`` here, as it would to an OpenTelemetry Collector.

(No collector or Jaeger build installs from the package registries in CI time; the wire protocol, the
exporter and the span model are the real ones.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)
    attributes: dict = field(default_factory=dict)
    service: str = ""


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 — http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._take(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take(self, req) -> None:
        spans = []
        for rs in req.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        v = a.value
                        attrs[a.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
                    spans.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                                      s.start_time_unix_nano, s.end_time_unix_nano,
                                      [(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links], attrs, service))
        with self._lock:
            self.spans.extend(spans)
            self.requests += 1

    async def wait_for(self, pred, timeout: float = 30.0) -> list[Span]:
        """The spans once ``pred(spans)`` holds (raises AssertionError after ``timeout``)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                got = list(self.spans)
            if pred(got):
                return got
            if time.monotonic() > end:
                raise AssertionError(f"spans never matched: got {[(s.name, s.trace_id[:8]) for s in got]}")
            await asyncio.sleep(0.05)  # polling a condition with a deadline

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

"""OpenTelemetry traces through the pipeline (``[tracing] otlp_endpoint``; off by default, and then nothing here
is imported or called: the worker holds ``None`` and checks it once per poll batch).

Spans, following the OpenTelemetry messaging conventions:

* ``{topic} process`` (CONSUMER), one per message, child of the record's ``traceparent`` header when it has a
  valid one (else the root of a new trace). It starts at the record's timestamp and ends when its output is
  acknowledged (exactly-once: committed), so its length is the ``e2e`` latency the SLO measures. Its child
  ``queue``: record timestamp → taken from the poll.
* ``infer`` (INTERNAL), one per engine call, and ``{output topic} publish`` (PRODUCER), one per published poll
  batch, each in a trace of its own with a **link** to every message span it served: one call serves N messages
  from N traces (the messaging conventions' batch shape). Per message that is two spans, not four: the SDK
  costs about 17 µs a span to record and 16 µs to encode.
* ``generate`` (INTERNAL), for a generator, one per generated answer, child of its message span: admitted →
  last token, with the first token as an event. A generator's engine calls are decode steps shared by every row
  of the batch, dozens per answer: one span each would cost more than the generation.
* The output record's ``traceparent`` (and ``tracestate``) continue the message's trace from its span.

Spans go to an OTLP/HTTP endpoint through the SDK's batch processor (export off the event loop); a backend
that is down costs dropped spans, never a stalled worker.
"""

from __future__ import annotations

import time

from pipeline.config import TracingSettings
from pipeline.errors import ConfigError

_PROPAGATED = ("traceparent", "tracestate")


class Tracing:
    def __init__(self, t: TracingSettings, *, group_id: str, resource: dict | None = None, exporter=None) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise ConfigError("tracing needs the OpenTelemetry SDK and its OTLP exporter",
                              hint="pip install 'streamlabel[tracing]'") from None
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=t.otlp_endpoint.rstrip("/") + "/v1/traces", timeout=t.export_timeout_s)
        self._trace = trace
        self.provider = TracerProvider(resource=Resource.create({"service.name": t.service_name, **(resource or {})}),
                                       sampler=ParentBased(TraceIdRatioBased(t.sample_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=t.max_queue_spans))
        self.tracer = self.provider.get_tracer("streamlabel")
        self.propagator = TraceContextTextMapPropagator()
        self.group_id = group_id
        self.CONSUMER, self.PRODUCER = trace.SpanKind.CONSUMER, trace.SpanKind.PRODUCER
        self.Link = trace.Link

    def messages(self, topic: str, partition: int, records, polled_ns: int) -> list:
        """One consumer span per record (None for a record that is not a message, e.g. unreadable), with its
        ``queue`` child ended at the poll."""
        spans = []
        start_span, extract, kind = self.tracer.start_span, self.propagator.extract, self.CONSUMER
        set_in = self._trace.set_span_in_context
        name = f"{topic} process"
        for r in records:
            headers = getattr(r, "headers", None)
            carrier = {}
            if headers:
                for k, v in headers:
                    if k in _PROPAGATED and isinstance(v, (bytes, bytearray)) and len(v) <= 512:
                        carrier[k] = v.decode("ascii", "replace")  # a bad value is ignored by the propagator
            ts_ns = int(getattr(r, "timestamp", 0) or 0) * 1_000_000
            start = ts_ns if 0 < ts_ns <= polled_ns else polled_ns
            span = start_span(name, context=extract(carrier) if carrier else None, kind=kind, start_time=start)
            if span.is_recording():  # a message the sampler left out costs no attributes and no child span
                span.set_attributes({"messaging.system": "kafka", "messaging.operation.type": "process",
                                     "messaging.destination.name": topic,
                                     "messaging.destination.partition.id": str(partition),
                                     "messaging.kafka.offset": getattr(r, "offset", -1),
                                     "messaging.consumer.group.name": self.group_id})
                start_span("queue", context=set_in(span), start_time=start).end(end_time=polled_ns)
            spans.append(span)
        return spans

    def engine_call(self, links, start_ns: int, end_ns: int, *, rows: int, tokens: int, model: str,
                    error: str | None = None) -> None:
        """The ``infer`` span of one engine call, linked to every message it answered."""
        span = self.tracer.start_span("infer", context=None, start_time=start_ns,
                                      links=[self.Link(c) for c in links if c is not None and c.trace_flags.sampled],
                                      attributes={"streamlabel.batch.rows": rows, "streamlabel.batch.tokens": tokens,
                                                  "streamlabel.model": model, "messaging.batch.message_count": rows})
        if error:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error[:200]))
        span.end(end_time=end_ns)

    def generation(self, parent, answer, end_ns: int) -> None:
        """The ``generate`` span of one generated answer, from its timings (admitted → first token → last)."""
        if not parent.is_recording():
            return
        t = answer.timings
        start = end_ns - int((t.ttft + t.decode) * 1e9)
        span = self.tracer.start_span("generate", context=self._trace.set_span_in_context(parent), start_time=start,
                                      attributes={"streamlabel.model": answer.model, "gen_ai.usage.output_tokens":
                                                  answer.tokens, "gen_ai.response.finish_reasons": (answer.finish_reason,),
                                                  "streamlabel.queue_ms": round(t.queue * 1000, 3)})
        span.add_event("first_token", timestamp=start + int(t.ttft * 1e9))
        span.end(end_time=end_ns)

    def continue_in(self, span, headers: list) -> None:
        """Point an output's ``traceparent`` (and ``tracestate``) at its message's span."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        headers[:] = [(k, v) for k, v in headers if k not in _PROPAGATED]
        headers.extend((k, v.encode()) for k, v in carrier.items())

    def publish(self, topic: str, spans, n: int) -> object:
        """The publish span of one poll batch's outputs, linked to the sampled message spans (ended by ``end``)."""
        return self.tracer.start_span(f"{topic} publish", context=None, kind=self.PRODUCER,
                                      links=[self.Link(c) for s in spans if s is not None
                                             and (c := s.get_span_context()).trace_flags.sampled],
                                      attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                                                  "messaging.destination.name": topic,
                                                  "messaging.batch.message_count": n})

    @staticmethod
    def end(spans, *, error: str | None = None) -> None:
        now = time.time_ns()
        for s in spans:
            if s is not None and s.is_recording():
                if error:
                    s.set_attribute("streamlabel.outcome", error)
                s.end(end_time=now)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued (bounded: a backend that is down does not hold up the exit)."""
        self.provider.force_flush(int(timeout_s * 1000))
        self.provider.shutdown()

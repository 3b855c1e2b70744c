"""Output records: the answer's record (label or generated text) and the dead-letter copy, each sized to fit.

Headers: outputs keep the input's key and headers. A DLQ record carries the original bytes (capped at
``worker.dlq_max_bytes`` and below the DLQ topic's limit) with our headers first, then the input's own (any
posing as ours renamed). A record that could never fit has a fallback: a DLQ record with the reason and the
coordinates only (the input stays in its topic at the offset the headers name).
"""

from __future__ import annotations

from aiokafka import TopicPartition

from consumers.delivery import Output
from pipeline import kafka as K
from pipeline.events import Event, Generation, Prediction, deadline_ms
from pipeline.serving import ServingTask

H_ERROR = "streamlabel.error"
H_TOPIC = "streamlabel.source.topic"
H_PARTITION = "streamlabel.source.partition"
H_OFFSET = "streamlabel.source.offset"
H_TRUNCATED = "streamlabel.value.truncated"  # the original value's length when the DLQ copy is cut
H_DROPPED = "streamlabel.dropped"  # what a fallback DLQ record left out, and why
H_DEADLINE = "streamlabel.deadline_ms"  # input: this record's deadline, epoch ms (default: timestamp + objective)
_RESERVED = "streamlabel."
_INPUT_PREFIX = "streamlabel.input."  # input headers that would pose as ours are renamed under this
_RECORD_OVERHEAD = 512  # bytes of batch and record framing allowed for when a record must fit a topic limit
_RECORD_FRAMING = 70  # bytes of record and batch framing per record, roughly


class RecordBuilder:
    """Builds one output per input record. ``output_limit``/``dlq_limit``: the topics' ``max.message.bytes``
    as read at start (the broker's refusal is still handled by delivery's fallback path)."""

    def __init__(self, task: ServingTask, *, output: str, dlq: str, dlq_max_bytes: int, log, log_text: bool,
                 ignored_deadline) -> None:
        self.task = task
        self.output = output
        self.dlq = dlq
        self.log = log
        self.log_text = log_text
        self.dlq_cap = dlq_max_bytes
        self.dlq_limit = K.MAX_REQUEST_BYTES
        self.output_limit = K.MAX_REQUEST_BYTES
        self._ignored_deadline = ignored_deadline  # a counter: streamlabel_ignored_total{what="deadline_header"}
        self._bad_deadline_logged = False

    def set_limits(self, output_limit: int | None, dlq_limit: int | None, dlq_max_bytes: int) -> None:
        """The topics' size limits (None: not readable, the client's own limit applies)."""
        limit = min(K.MAX_REQUEST_BYTES, dlq_limit or K.MAX_REQUEST_BYTES)
        self.dlq_cap = max(1024, min(dlq_max_bytes, limit - 16 * 1024))
        self.dlq_limit = limit
        self.output_limit = min(K.MAX_REQUEST_BYTES, output_limit or K.MAX_REQUEST_BYTES)

    def answer(self, tp: TopicPartition, r, ev: Event, answer: Prediction | Generation, now: int, wait: float) -> Output:
        try:
            value = self.task.encode(ev, answer, wait_s=wait, now_ms=now, record_ts_ms=r.timestamp)
        except Exception as exc:  # noqa: BLE001 — an output schema (pipeline/registry.py) refusing a value: this record's
            return self.dead_letter(tp, r, f"output encoding: {type(exc).__name__}: {str(exc)[:200]}")
        out = Output(self.output, r.key, value, list(r.headers) if r.headers else [],
                     lambda: self.fallback(tp, r, "publish: the output record is larger than the output topic allows "
                                                  "(input key and headers are kept on outputs)"))
        if (len(value) < 4096 and not r.headers) or size(out) <= self.output_limit - _RECORD_OVERHEAD:
            return out
        return out.fallback

    def _ours(self, tp: TopicPartition, r, reason: str) -> list:
        return [(H_ERROR, reason.encode()), (H_TOPIC, tp.topic.encode()),
                (H_PARTITION, str(tp.partition).encode()), (H_OFFSET, str(r.offset).encode())]

    def dead_letter(self, tp: TopicPartition, r, reason: str) -> Output:
        """The DLQ copy: our headers first, then the input's (any posing as ours renamed), the value capped."""
        if self.log_text:  # switched on explicitly: the record's value may hold personal data
            self.log.info("dead_letter", partition=tp.partition, offset=r.offset, reason=reason[:200],
                          value=(r.value or b"")[:500].decode("utf-8", "replace"))
        else:
            self.log.debug("dead_letter", partition=tp.partition, offset=r.offset, reason=reason[:200])
        headers = self._ours(tp, r, reason)
        value = r.value if r.value is not None else b""
        if len(value) > self.dlq_cap:
            headers.append((H_TRUNCATED, str(len(value)).encode()))
            value = value[: self.dlq_cap]
        for k, v in r.headers or ():
            headers.append((_INPUT_PREFIX + k[len(_RESERVED):] if k.startswith(_RESERVED) else k, v))
        fallback = self.fallback(tp, r, reason)
        out = Output(self.dlq, r.key, value, headers, fallback)
        return out if size(out) <= self.dlq_limit - _RECORD_OVERHEAD else fallback

    def fallback(self, tp: TopicPartition, r, reason: str) -> Output:
        """A DLQ record that always fits: reason and coordinates only (the input stays in its topic)."""
        headers = self._ours(tp, r, reason[:2000])
        key = r.key if r.key is None or len(r.key) <= 4096 else None
        headers.append((H_DROPPED, f"value ({len(r.value or b'')} bytes) and input headers: the record would "
                                   f"exceed the topic's size limit".encode()))
        return Output(self.dlq, key, b"", headers)

    def deadline(self, headers) -> int | None:
        """``streamlabel.deadline_ms``: the record's own deadline, epoch milliseconds (1-15 ASCII digits). Any
        other value is ignored, counted (``streamlabel_ignored_total{what="deadline_header"}``) and logged once."""
        for k, v in headers:
            if k == H_DEADLINE:
                ms = deadline_ms(v)
                if ms is None:
                    self._ignored_deadline.inc()
                    if not self._bad_deadline_logged:
                        self._bad_deadline_logged = True
                        self.log.warning("deadline_header_ignored", header=H_DEADLINE, value=repr(v)[:40],
                                         note="expected epoch milliseconds as 1-15 ASCII digits; the default deadline "
                                              "(record timestamp + slo.objective_ms) applies; counted in "
                                              "streamlabel_ignored_total")
                return ms
        return None


def size(o: Output) -> int:
    return len(o.value) + len(o.key or b"") + sum(len(k) + len(v or b"") + 2 for k, v in o.headers)


def record_bytes(records) -> int:
    """The memory a poll batch holds while in flight: values, keys and headers (and their DLQ copies scale
    with them)."""
    total = _RECORD_FRAMING * len(records)
    for r in records:
        total += len(r.value or b"") + len(r.key or b"")
        if r.headers:
            total += sum(len(k) + len(v or b"") for k, v in r.headers)
    return total

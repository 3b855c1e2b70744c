"""structlog set-up: JSON in production, readable in a terminal; one line per lifecycle event."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    # aiokafka logs expected, self-healing events (coordinator moves, retries) as errors; our own lifecycle
    # lines say what matters. Its real failures surface as exceptions in the worker.
    # Its connection errors still reach pipeline.kafka (which names their reason in the user's error),
    # but are printed only at debug level.
    client = logging.getLogger("aiokafka")
    client.setLevel(logging.ERROR if level != "debug" else logging.DEBUG)
    client.propagate = level == "debug"
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=False,
    )


class _Stderr:
    """``sys.stderr`` looked up at each write, so a replaced stream (pytest capture, a daemon) is followed."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_SECRET_KEYS = ("password", "secret", "token", "sasl_plain_password")


def _redact(_, __, event: dict) -> dict:
    for k in list(event):
        if any(s in k.lower() for s in _SECRET_KEYS):
            event[k] = "***"
    return event


def get(name: str = "streamlabel"):
    return structlog.get_logger(name)

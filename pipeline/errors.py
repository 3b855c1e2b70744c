"""Typed errors. Each carries what a user needs to act: what was wrong, where, and the fix."""

from __future__ import annotations


class StreamlabelError(Exception):
    """Base class. ``str(err)`` is one line a user can act on; ``hint`` says what to do."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None) -> None:
        self.message = message
        self.hint = hint
        self.where = where
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class UsageError(StreamlabelError):
    """Bad input from the user: a file, a flag, a label name. CLI exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is missing, mistyped or out of range."""


class KafkaUnreachable(ConfigError):
    """No broker answered (or it refused the connection). Fatal at start; retried once a worker has run."""


class MissingTopic(ConfigError):
    """A topic a command needs does not exist (and creating it was not asked for)."""

    def __init__(self, message: str, *, topic: str, role: str, hint: str | None = None, where: str | None = None) -> None:
        self.topic = topic
        self.role = role
        super().__init__(message, hint=hint, where=where)


class ModelError(UsageError):
    """A model directory or artifact is missing, incomplete, corrupt or does not fit."""


class QualityGateError(StreamlabelError):
    """A built variant lost more accuracy than allowed; the artifact is not published. Exit code 3."""

    exit_code = 3


class EngineError(StreamlabelError):
    """The model engine is broken (fails even a text it answered before) or hung (a call outlived its timeout).

    Not retriable in-process: the worker stops and ``streamlabel run`` exits with code 4.
    """

    exit_code = 4


class BadEvent(Exception):
    """An input record that cannot be labelled. ``reason`` is what the DLQ header carries."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def is_input_failure(exc: BaseException) -> bool:
    """Did a library fail on one input (a tokenizer's error, or its Rust panic, which pyo3 raises as a
    ``BaseException``) rather than ask the process to stop? Interrupts, exits and cancellation are not."""
    import asyncio

    return not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError))

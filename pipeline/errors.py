"""The error taxonomy: every error streamlabel raises, in one place.

Two families:

- ``StreamlabelError`` and its subclasses stop something: a command (exit code ``exit_code``, one line from
  ``render()``: what was wrong, where, what to do) or a worker. ``retriable`` says whether running again can
  help: ``streamlabel run`` rebuilds a worker whose error is retriable (fresh clients; whatever was not
  committed is read again) and exits with the error's code otherwise. As aiokafka marks its errors.
- Per-record outcomes, not failures of anything: ``BadEvent`` (an input that cannot be labelled) and
  ``EngineFailure`` (a text the engine failed on alone) become dead-letter records with their ``reason``;
  ``NoTokens`` is the engine's way of saying a text has no content for the model.
"""

from __future__ import annotations


class StreamlabelError(Exception):
    """Base class. ``str(err)`` is one line a user can act on; ``hint`` says what to do."""

    exit_code = 1
    retriable = False

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


# ---------------------------------------------------------------------------------------------- the user's to fix
class UsageError(StreamlabelError):
    """Bad input from the user: a file, a flag, a label name. CLI exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is missing, mistyped or out of range."""


class KafkaUnreachable(ConfigError):
    """No broker answered (or it refused the connection). Fatal at the first start (a wrong address); once a
    worker has run, an outage that is waited out."""

    retriable = True


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


# ---------------------------------------------------------------------------------------------- a worker stops
class EngineError(StreamlabelError):
    """The model engine is broken (fails even a text it answered before) or hung (a call outlived its timeout).

    Not retriable in-process: the worker stops and ``streamlabel run`` exits with code 4.
    """

    exit_code = 4


class WorkerError(StreamlabelError):
    """The worker cannot go on without risking loss (an output not acknowledged, a task that died). Retriable:
    it stops uncommitted and a rebuilt worker reads again what was not committed."""

    retriable = True


class DeliveryFailed(WorkerError):
    """A publish or a transaction failed; the partition is latched until it is read again."""


class OffsetReadTimeout(WorkerError):
    """The group coordinator did not answer a committed-offset read in time (loading, moving)."""


class PartitionClosed(StreamlabelError):
    """Not published: the partition was revoked or failed meanwhile; its next owner reads the records again.
    Control flow inside the worker, never shown to a user."""

    retriable = True


# ---------------------------------------------------------------------------------------------- one record
class BadEvent(Exception):
    """An input record that cannot be labelled. ``reason`` is what the DLQ header carries."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class EngineFailure(Exception):
    """The engine failed on this one text (after the batch was split down to it): a DLQ record, ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class NoTokens(Exception):
    """A text from which the tokenizer produced no content tokens (e.g. only zero-width characters)."""


def is_input_failure(exc: BaseException) -> bool:
    """Did a library fail on one input (a tokenizer's error, or its Rust panic, which pyo3 raises as a
    ``BaseException``) rather than ask the process to stop? Interrupts, exits and cancellation are not."""
    import asyncio

    return not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError))

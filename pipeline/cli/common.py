"""What the commands share: settings with overrides, value checks, JSON output, topic checks, and running an
async command until it finishes or a signal stops it. Imports stay light: ``--help`` must be instant."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Mapping, Optional, TypeVar

import typer

if TYPE_CHECKING:
    import asyncio

    from pipeline.config import Settings

T = TypeVar("T")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (STREAMLABEL_* env vars win).")]
CreateTopicsOpt = Annotated[bool, typer.Option("--create-topics", help="Create the topic when it does not exist "
                                               "(topics.partitions, topics.replication_factor); else that is an error.")]
# A reachable broker answers in milliseconds; a command the user waits on gives up on a silent one after this.
CONNECT_TIMEOUT_S = 10.0


def settings(config: Optional[Path], **overrides: Mapping[str, Any]) -> Settings:
    """The config file + environment, with the command's flags (those given) on top."""
    from pipeline.config import load_settings

    s = load_settings(config)
    clean = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in overrides.items()}
    clean = {k: v for k, v in clean.items() if v}
    return s.replace(**clean) if clean else s


def emit_json(data: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ value checks
# Typer callbacks: a bad value is a parse error (one line naming the flag, exit 2) before anything starts.
def positive(value):
    """More than 0 (rates, counts, durations, workers)."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be greater than 0, got {value:g}")
    return value


def share(value):
    """A share between 0 and 1 (duplicate ratio, bad-event ratio)."""
    if value is not None and not 0 <= value <= 1:
        raise typer.BadParameter(f"must be between 0 and 1, got {value:g}")
    return value


# ------------------------------------------------------------------------------------------ signals
class Interrupted(BaseException):
    """A command stopped on SIGINT or SIGTERM. ``main()`` exits ``128 + signal`` (130 for Ctrl-C), no traceback.

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def raise_interrupted(signum: int, _frame=None) -> None:
    """SIGTERM handler outside an event loop (building a model, starting a broker): unwind like Ctrl-C."""
    raise Interrupted(signum)


def run_async(command: Callable[[asyncio.Event], Awaitable[T]], *, drain_s: float = 10.0) -> tuple[T | None, int | None]:
    """Run ``command(stop)`` on a fresh event loop until it returns or a signal stops it.

    The first SIGINT/SIGTERM sets ``stop``: the command winds down (stops feeding, drains, closes what it
    started) and returns. If it has not returned ``drain_s`` later, or a second signal comes, it is
    cancelled (its ``finally`` blocks still run). Returns ``(result, signal number or None)``; the result is
    ``None`` when the command was cancelled. Callers decide the exit code (``Interrupted(signum)``).
    """
    import asyncio

    got: list[int] = []
    # A SIGINT ignored from the start (nohup, a background job of a script) stays ignored, as outside the loop.
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]

    async def main() -> T | None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.ensure_future(command(stop))

        def on_signal(signum: int) -> None:
            got.append(signum)
            if len(got) == 1:
                stop.set()
                loop.call_later(drain_s, task.cancel)
            else:
                task.cancel()

        for sig in handled:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await task
        except asyncio.CancelledError:
            if not got:
                raise
            return None
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    previous = {sig: signal.getsignal(sig) for sig in handled}
    try:
        result = asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)  # the loop leaves SIG_DFL / default_int_handler behind
    return result, (got[0] if got else None)


# ------------------------------------------------------------------------------------------ Kafka
async def require_topics(s: Settings, topics: Mapping[str, str], *, where: str, create: bool = False,
                         hint: str | None = None) -> None:
    """``pipeline.kafka.check_topics`` with a bounded wait; its one-line errors say which command failed.

    ``hint`` replaces the advice of a missing topic (a reader cannot ``--create-topics``).
    """
    from pipeline import kafka as K
    from pipeline.errors import ConfigError, MissingTopic

    try:
        await K.check_topics(s, topics, create=create, partitions=s.topics.partitions,
                             replication_factor=s.topics.replication_factor, timeout_s=CONNECT_TIMEOUT_S)
    except MissingTopic as exc:
        raise MissingTopic(exc.message, topic=exc.topic, role=exc.role, where=exc.where or where,
                           hint=hint or exc.hint) from None
    except ConfigError as exc:
        raise type(exc)(exc.message, where=exc.where or where, hint=exc.hint) from None


async def reachable(s: Settings, where: str) -> None:
    """Fail fast (one line) when the broker does not answer; used before long work such as a model build."""
    await require_topics(s, {}, where=where)


async def start_client(s: Settings, client, where: str) -> None:
    """Start an aiokafka client within the connect timeout; a failure is one line (and the client is closed)."""
    import asyncio
    import contextlib

    from pipeline.kafka import KafkaError

    try:
        await asyncio.wait_for(client.start(), CONNECT_TIMEOUT_S)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await client.stop()
        raise kafka_error(s, exc, where) from None


def kafka_error(s: Settings, exc: BaseException, where: str):
    """A Kafka error in the middle of a command, as one line (``pipeline.kafka.connection_error``)."""
    from pipeline import kafka as K

    err = K.connection_error(s, exc)
    return type(err)(err.message, where=err.where or where, hint=err.hint)

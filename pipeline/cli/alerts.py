"""``streamlabel alerts run | tail``: the alerting worker, and a readable live view of the alert topic."""

from __future__ import annotations

import signal
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ConfigOpt, CreateTopicsOpt, Interrupted, positive, run_async, settings

app = typer.Typer(help="The alerting feed: windowed rules on the label stream.", no_args_is_help=True)
BootstrapOpt = Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (overrides the config).")]
COLOUR = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


@app.command("run")
def alerts_run(
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    create_topics: CreateTopicsOpt = False,
) -> None:
    """Evaluate the alerting.rules tables of the config on the label topic; publish alerts until SIGTERM.

    SIGTERM is the normal stop (exit 0); Ctrl-C stops it the same way and exits 130.
    """
    import asyncio

    from consumers.alerting import AlertingWorker
    from pipeline import logs

    s = settings(config, kafka={"bootstrap_servers": bootstrap}, topics={"create": True if create_topics else None})
    logs.configure(s.log.level, s.log.format)
    w = AlertingWorker(s)

    async def go(stop: asyncio.Event) -> None:
        task = asyncio.ensure_future(_run(w))
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            w.stop()  # finish the batch in hand: its state is saved before its offsets are committed
        else:
            stopping.cancel()
        await task

    _, sig = run_async(go, drain_s=s.worker.drain_timeout_s)
    if sig == signal.SIGINT:
        raise Interrupted(sig)


async def _run(w) -> None:
    from pipeline.errors import ConfigError

    try:
        await w.run()
    except ConfigError as exc:
        if exc.where:
            raise
        raise ConfigError(exc.message, where="alerts run", hint=exc.hint) from None


@app.command("tail")
def alerts_tail(
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    topic: Annotated[Optional[str], typer.Option(help="Alert topic (default: alerting.output of the config).")] = None,
    from_beginning: Annotated[bool, typer.Option(help="Show past alerts too.")] = True,
    count: Annotated[Optional[int], typer.Option(help="Stop after this many alerts.", callback=positive)] = None,
) -> None:
    """A readable live view of the alert topic (until --count alerts or Ctrl-C)."""
    import asyncio

    from rich.console import Console

    s = settings(config, kafka={"bootstrap_servers": bootstrap})
    topic = topic or s.alerting.output
    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)

    async def go(stop: asyncio.Event) -> int:
        from pipeline.kafka import KafkaError

        from pipeline import kafka as K
        from pipeline.cli.common import kafka_error, require_topics, start_client

        await require_topics(s, {"alert": topic}, where="alerts tail",
                             hint="start `streamlabel alerts run`, which publishes there, or fix --topic / alerting.output")
        c = K.consumer(s, topic, group_id=None, auto_offset_reset="earliest" if from_beginning else "latest")
        await start_client(s, c, "alerts tail")
        n = 0
        try:
            err.print(f"[dim]alerts on {topic} ({s.kafka.bootstrap_servers}); Ctrl-C to stop[/]")
            while not stop.is_set() and (count is None or n < count):
                batch = await c.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        out.print(render(r.value, r.partition, r.offset))
                        n += 1
                        if count is not None and n >= count:
                            break
                    if count is not None and n >= count:
                        break
        except KafkaError as exc:
            raise kafka_error(s, exc, "alerts tail") from None
        finally:
            await c.stop()
        return n

    _, sig = run_async(go, drain_s=s.worker.drain_timeout_s)
    if sig is not None:
        raise Interrupted(sig)


def render(value: bytes | None, partition: int, offset: int) -> str:
    """One alert as one line of rich markup; a record that is not an alert says so instead of failing."""
    import datetime as dt

    import orjson
    from rich.markup import escape

    try:
        a = orjson.loads(value or b"")
        when = dt.datetime.fromtimestamp(a["last_event_at"] / 1000).strftime("%H:%M:%S")
        firing = a["status"] == "firing"
        style = COLOUR.get(a.get("severity", ""), "") if firing else "green"
        samples = ", ".join(map(str, a.get("sample_ids", [])[:3]))
        return (f"[{style}]{'FIRING ' if firing else 'resolved'}[/] {when} {escape(str(a['rule']))} "
                f"{escape(str(a['key']))}={escape(str(a['entity']))} value {float(a['value']):.2f} "
                f"(threshold {a['threshold']}) window {float(a['window_s']):.0f}s samples {escape(samples)}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"[dim]not an alert event: partition {partition} offset {offset}[/]"

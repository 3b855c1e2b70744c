"""``streamlabel replay`` and ``streamlabel produce``: put texts onto an existing topic at a steady, open-loop rate.

Both check the topic first (missing: one error naming it, created only with ``--create-topics``), build the
producer from the config (SASL/TLS apply), stop at ``--count`` / ``--duration`` / the end of the file or on
Ctrl-C / SIGTERM (then what was sent is acknowledged, the JSON report says ``interrupted``, exit 130 / 143).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterable, Optional

import typer

from pipeline.cli.common import ConfigOpt, CreateTopicsOpt, Interrupted, emit_json, positive, run_async, settings, share

if TYPE_CHECKING:
    from pipeline.config import Settings

TopicOpt = Annotated[Optional[str], typer.Option(help="Topic to write to (default: topics.input of the config).")]
BootstrapOpt = Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (overrides the config).")]
RateOpt = Annotated[float, typer.Option(help="Events per second (open loop).", callback=positive)]
CountOpt = Annotated[Optional[int], typer.Option(help="Stop after this many events.", callback=positive)]
DurationOpt = Annotated[Optional[float], typer.Option(help="Stop after this many seconds.", callback=positive)]


class Profile(str, Enum):
    support = "support"
    news = "news"
    mixed = "mixed"


def replay_cmd(
    file: Annotated[Path, typer.Argument(help="JSONL ({text, label?, id?, source?, entity?}), CSV (text[,label]) or "
                                              "plain text (one text a line); .gz too.")],
    config: ConfigOpt = None,
    topic: TopicOpt = None,
    bootstrap: BootstrapOpt = None,
    rate: RateOpt = 100.0,
    loop: Annotated[bool, typer.Option(help="Start again at the end of the file (stop with --count/--duration/Ctrl-C).")] = False,
    count: CountOpt = None,
    duration: DurationOpt = None,
    create_topics: CreateTopicsOpt = False,
) -> None:
    """Replay a file of texts (e.g. a labelled corpus) onto a topic at a steady rate, once or looping."""
    from pipeline.textfile import read_rows
    from producers.replay import records

    s = settings(config, kafka={"bootstrap_servers": bootstrap})
    rows = read_rows(file)  # the whole file is checked before anything is sent
    recs = records(rows, loop=loop, stem=file.name.split(".")[0])
    send("replay", s, topic or s.topics.input, recs, rate=rate, count=count, duration=duration,
         create=create_topics or s.topics.create)


def produce_cmd(
    config: ConfigOpt = None,
    topic: TopicOpt = None,
    bootstrap: BootstrapOpt = None,
    rate: RateOpt = 100.0,
    count: CountOpt = None,
    duration: DurationOpt = None,
    profile: Annotated[Profile, typer.Option(help="Kind of synthetic text.")] = Profile.mixed,
    duplicate_ratio: Annotated[float, typer.Option(help="Share of events repeating an earlier text.", callback=share)] = 0.0,
    poisson: Annotated[bool, typer.Option(help="Poisson arrivals (else constant spacing).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
    create_topics: CreateTopicsOpt = False,
) -> None:
    """Feed a topic with synthetic customer-service and news events at a steady rate."""
    from pipeline.errors import UsageError

    if count is None and duration is None:
        raise UsageError("give --count or --duration (or both)", where="produce", hint="e.g. --count 1000 --rate 200")
    from pipeline.events import encode_input
    from producers.synthetic import Generator

    s = settings(config, kafka={"bootstrap_servers": bootstrap})
    gen = Generator(profile.value, seed=seed, duplicate_ratio=duplicate_ratio)
    recs = ((ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity, label=ev.label))
            for ev in gen)
    send("produce", s, topic or s.topics.input, recs, rate=rate, count=count, duration=duration,
         create=create_topics or s.topics.create, poisson=poisson, seed=seed, progress=True)


async def registry_records(s: Settings, topic: str, recs):
    """Register the input schema under the topic's subject, then encode each JSON input event with it."""
    import orjson

    from pipeline import logs
    from pipeline.registry import RegistryEncoder, input_record, input_schema

    class _Count:
        def inc(self, n: int = 1) -> None:
            pass

    f = s.format
    logs.configure(s.log.level, s.log.format)  # lifecycle lines to stderr: stdout is the JSON report
    enc = RegistryEncoder(f.input, f, kind="input", log=logs.get("streamlabel.produce"), waits=_Count(),
                          schema=input_schema(f))
    await enc.start(topic, give_up_s=3 * f.registry_timeout_s)
    return ((key, enc.encode(input_record(orjson.loads(value), f))) for key, value in recs)


def send(where: str, s: Settings, topic: str, recs: Iterable[tuple[bytes | None, bytes]], *, rate: float,
         count: int | None, duration: float | None, create: bool, poisson: bool = True, seed: int = 0,
         progress: bool = False) -> None:
    """Check the topic, send at the rate until done or stopped, print the JSON report; errors are one line."""
    from rich.console import Console

    from pipeline.errors import StreamlabelError

    console = Console(stderr=True, highlight=False, soft_wrap=True)

    async def go(stop):
        from pipeline.kafka import KafkaError

        from pipeline.cli.common import kafka_error, require_topics, start_client
        from producers.rate import producer_for_load, send_at_rate

        await require_topics(s, {"target": topic}, where=where, create=create)
        records = recs
        if s.format.input != "json":  # Avro / Protobuf / JSON Schema under the registry's id, as the workers read it
            records = await registry_records(s, topic, recs)
        p = producer_for_load(s)
        await start_client(s, p, where)
        try:
            return await send_at_rate(
                p, topic, records, rate=rate, count=count, duration_s=duration, poisson=poisson, seed=seed, stop=stop,
                on_progress=(lambda r: console.print(f"sent {r.sent}  {r.sent / r.seconds:7.1f}/s of "
                                                     f"{r.offered_rate:.0f}/s")) if progress else None)
        except KafkaError as exc:
            raise kafka_error(s, exc, where) from None
        finally:
            await p.stop()

    rep, sig = run_async(go, drain_s=s.worker.drain_timeout_s)
    if rep is not None:
        for w in rep.warnings:
            console.print(f"[yellow]{w}[/]")
        out = {"topic": topic, "sent": rep.sent, "acked": rep.acked, "failed": rep.failed,
               "seconds": round(rep.seconds, 2), "offered_rate": rate, "achieved_rate": round(rep.achieved_rate, 1),
               "warnings": rep.warnings}
        if sig is not None:
            import signal

            out["interrupted"] = signal.Signals(sig).name
        emit_json(out)
        if rep.failed and sig is None:
            raise StreamlabelError(f"{rep.failed} of {rep.sent} records were not acknowledged (first: {rep.first_error})",
                                   where=where, hint="see the broker's log; check the topic's ACLs and max.message.bytes")
    if sig is not None:
        raise Interrupted(sig)

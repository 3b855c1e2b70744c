"""``streamlabel``: the one composition root. Commands import what they need lazily, so ``--help`` is instant."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import StreamlabelError, UsageError

app = typer.Typer(help="Label live text streams in milliseconds.", no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]}, pretty_exceptions_enable=False)
model_app = typer.Typer(help="Build, evaluate and inspect model artifacts.", no_args_is_help=True)
app.add_typer(model_app, name="model")


class VariantName(str, Enum):
    fp32 = "fp32"
    int8 = "int8"
    fp16 = "fp16"


def _emit_json(data) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# ---------------------------------------------------------------------------------------------- model
@model_app.command("build")
def model_build(
    out: Annotated[Path, typer.Option("--out", help="Artifact root; the build lands in OUT/NAME/VERSION.")] = Path("models"),
    preset: Annotated[Optional[str], typer.Option(help="tiny | sentiment-minilm | moderation-minilm")] = None,
    from_dir: Annotated[Optional[Path], typer.Option("--from", help="A fine-tuned Hugging Face classifier directory.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Label names in the head's output order, comma-separated.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Artifact name (default: preset or directory name).")] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="Labelled JSONL/CSV for quality figures and the gate.")] = None,
    max_drop: Annotated[float, typer.Option(help="Refuse a variant whose accuracy is this many points below FP32.")] = 1.0,
    max_length: Annotated[Optional[int], typer.Option(help="Token cap (default: preset's or the tokenizer's).")] = None,
    variants: Annotated[str, typer.Option(help="Variants to build, comma-separated.")] = "fp32,int8,fp16",
    bench: Annotated[bool, typer.Option(help="Measure FP32/INT8 throughput at batch 1 and 32.")] = True,
    break_variant: Annotated[Optional[VariantName], typer.Option(help="Testing aid: damage this variant to see the gate refuse it.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")] = False,
) -> None:
    """Turn a preset or a Hugging Face classifier into a validated, versioned ONNX artifact."""
    from pipeline.model.build import Reporter, build

    label_list = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    rep = Reporter(quiet=False)
    res = build(out=out, preset=preset, from_dir=from_dir, labels=label_list, name=name, eval_file=eval_file,
                max_drop=max_drop, max_length=max_length, variants=[v.strip() for v in variants.split(",") if v.strip()],
                bench=bench, break_variant=break_variant.value if break_variant else None, reporter=rep)
    if json_out:
        from pipeline.model.build import summary_dict

        _emit_json(summary_dict(res.manifest))
    else:
        _print_manifest(res.path, res.manifest)
        rep.say(f"[bold green]built {res.manifest.model_id}[/] → {res.path} in {res.seconds:.1f} s")


@model_app.command("eval")
def model_eval(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (name dir = newest version).")],
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL ({text,label}) or CSV (text,label).")],
    variant: Annotated[Optional[VariantName], typer.Option(help="Variant (default: the one meant for this machine).")] = None,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda | tensorrt")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Texts per inference call.")] = 64,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Accuracy, macro-F1 and per-class recall of an artifact on a labelled file."""
    import numpy as np

    from pipeline.engine import OnnxEngine
    from pipeline.model import data as D

    examples = D.read_labelled(data)
    engine = OnnxEngine(artifact, variant=variant.value if variant else None, provider=provider, warmup=False)
    y = D.label_indices(examples, engine.labels, str(data))
    texts = [e.text for e in examples]
    pred = np.concatenate([engine.logits(texts[i:i + batch_size]).argmax(1) for i in range(0, len(texts), batch_size)])
    q = D.quality(y, pred, engine.labels)
    result = {**q, "variant": engine.variant, "model": engine.model_id, "provider": engine.providers[0]}
    if json_out:
        _emit_json(result)
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{engine.model_id} [{engine.variant}] on {data} (n={q['n']})")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("accuracy", f"{q['accuracy']:.4f}")
        t.add_row("macro-F1", f"{q['macro_f1']:.4f}")
        for k, v in q["per_class_recall"].items():
            t.add_row(f"recall[{k}]", f"{v:.4f}")
        Console().print(t)
    engine.close()


@model_app.command("info")
def model_info(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (name dir = newest version).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's sha256.")] = True,
) -> None:
    """Show an artifact's manifest readably (and verify its files)."""
    from pipeline.model.manifest import load_manifest

    root, m = load_manifest(artifact, verify=verify)
    if json_out:
        from pipeline.model.build import summary_dict

        _emit_json(summary_dict(m))
    else:
        _print_manifest(root, m)


def _print_manifest(root: Path, m) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{m.model_id}[/]  {root}")
    c.print(f"  task {m.task}; labels {', '.join(m.labels)}; max length {m.max_length}; inputs {', '.join(m.inputs)}")
    c.print(f"  base: {m.base_model}")
    if m.training.get("data"):
        c.print(f"  trained on: {', '.join(m.training['data'])}  [dim]{m.training.get('licence', '')}[/]")
    if m.gate.get("eval"):
        c.print(f"  quality gate: max drop {m.gate['max_drop_points']} points vs fp32 on {m.gate['eval']}: "
                f"{'passed' if m.gate.get('passed') else 'REFUSED ' + ', '.join(m.gate.get('refused', []))}")
    t = Table()
    for col in ("variant", "for", "MB", "|Δlogit|", "agr/torch", "agr/fp32", "acc", "F1", "b1/s", "b32/s"):
        t.add_column(col, justify="right" if col not in ("variant", "provider") else "left")
    for v in m.variants.values():
        p, q, tp = v.parity or {}, v.quality or {}, v.throughput or {}
        t.add_row(v.name, v.provider.replace("ExecutionProvider", ""), f"{v.bytes / 1e6:.1f}",
                  _f(p.get("max_abs_logit_diff_vs_torch"), 4), _f(p.get("agreement_vs_torch"), 3),
                  _f(p.get("agreement_vs_fp32"), 3), _f(q.get("accuracy"), 4), _f(q.get("macro_f1"), 4),
                  _f(tp.get("batch_1_msgs_per_s"), 0), _f(tp.get("batch_32_msgs_per_s"), 0))
    c.print(t)
    for v in m.variants.values():
        if v.note:
            c.print(f"  [yellow]{v.name}[/]: {v.note}")


def _f(x, nd: int) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


# ---------------------------------------------------------------------------------------------- run
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (STREAMLABEL_* env vars win).")]


def _settings(config: Optional[Path], **overrides):
    from pipeline.config import load_settings

    s = load_settings(config)
    clean = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in overrides.items()}
    clean = {k: v for k, v in clean.items() if v}
    return s.replace(**clean) if clean else s


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    workers: Annotated[int, typer.Option(help="Worker processes in one consumer group.")] = 1,
    bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (overrides config).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Artifact directory (overrides config).")] = None,
    input_topic: Annotated[Optional[str], typer.Option("--input", help="Input topic.")] = None,
    output_topic: Annotated[Optional[str], typer.Option("--output", help="Label topic.")] = None,
    dlq_topic: Annotated[Optional[str], typer.Option("--dlq", help="Dead-letter topic.")] = None,
    group: Annotated[Optional[str], typer.Option(help="Consumer group id.")] = None,
) -> None:
    """Run classify workers: Kafka in → labels out, until SIGTERM/SIGINT (then drain and commit)."""
    from consumers.runner import run_workers
    from pipeline import logs

    s = _settings(config, kafka={"bootstrap_servers": bootstrap, "group_id": group},
                  model={"path": str(model) if model else None},
                  topics={"input": input_topic, "output": output_topic, "dlq": dlq_topic})
    logs.configure(s.log.level, s.log.format)
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    raise typer.Exit(run_workers(s, workers))


@app.command("demo")
def demo_cmd(
    config: ConfigOpt = None,
    events: Annotated[Optional[int], typer.Option(help="Stop after this many events (default: run until Ctrl-C).")] = None,
    rate: Annotated[float, typer.Option(help="Offered events per second (open loop).")] = 100.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final figures as JSON on stdout.")] = False,
    model: Annotated[Path, typer.Option(help="Artifact directory; built from --preset when missing.")] = Path("models/sentiment-minilm"),
    preset: Annotated[str, typer.Option(help="Preset to build when the model is missing.")] = "sentiment-minilm",
    bootstrap: Annotated[Optional[str], typer.Option(help="Use this broker instead of starting a local one.")] = None,
    redis_url: Annotated[Optional[str], typer.Option("--redis", help="Use this Redis instead of starting redis-server.")] = None,
    bad_ratio: Annotated[float, typer.Option(help="Share of deliberately malformed events (they go to the DLQ).")] = 0.005,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
) -> None:
    """Everything on this machine: local Kafka + Redis, the sentiment model, a worker, a synthetic feed, live figures."""
    import asyncio

    from pipeline import logs
    from pipeline.cli_demo import demo

    s = _settings(config)
    logs.configure("warning", "console")
    if events is None:
        events = 10**12
    result = asyncio.run(demo(settings=s, events=events, rate=rate, as_json=json_out, model=model, preset=preset,
                              bootstrap=bootstrap, redis_url=redis_url, bad_ratio=bad_ratio, seed=seed))
    if json_out:
        keys = ("produced", "labelled", "dlq", "lost", "p50_ms", "p99_ms", "goodput")
        _emit_json({**{k: result[k] for k in keys}, **{k: v for k, v in result.items() if k not in keys}})
    else:
        from rich.console import Console

        Console().print(result)
    if result["lost"]:
        raise typer.Exit(1)


@app.command("replay")
def replay_cmd(
    file: Annotated[Path, typer.Argument(help="JSONL ({text, label?}), CSV (text[,label]) or plain text; .gz too.")],
    topic: Annotated[str, typer.Option(help="Topic to write to.")] = "text-events",
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap servers.")] = "127.0.0.1:9092",
    rate: Annotated[float, typer.Option(help="Events per second (open loop).")] = 100.0,
    loop: Annotated[bool, typer.Option(help="Start again at the end of the file (stop with --count/--duration/Ctrl-C).")] = False,
    count: Annotated[Optional[int], typer.Option(help="Stop after this many events.")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Replay a file of texts (e.g. a labelled corpus) onto a topic at a steady rate, once or looping."""
    import asyncio

    from producers.rate import producer_for_load, send_at_rate
    from producers.replay import records
    from producers.topics import ensure_topics

    recs = records(file, loop=loop)

    async def go():
        await ensure_topics(bootstrap, [topic])
        p = producer_for_load(bootstrap)
        await p.start()
        try:
            return await send_at_rate(p, topic, recs, rate=rate, count=count, duration_s=duration)
        finally:
            await p.stop()

    rep = asyncio.run(go())
    _emit_json({"topic": topic, "sent": rep.sent, "acked": rep.acked, "failed": rep.failed,
                "seconds": round(rep.seconds, 2), "offered_rate": rate, "achieved_rate": round(rep.achieved_rate, 1),
                "warnings": rep.warnings})


@app.command("produce")
def produce_cmd(
    topic: Annotated[str, typer.Option(help="Topic to write to.")] = "text-events",
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap servers.")] = "127.0.0.1:9092",
    rate: Annotated[float, typer.Option(help="Events per second (open loop).")] = 100.0,
    count: Annotated[Optional[int], typer.Option(help="Stop after this many events.")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    profile: Annotated[str, typer.Option(help="support | news | mixed")] = "mixed",
    duplicate_ratio: Annotated[float, typer.Option(help="Share of events repeating an earlier text.")] = 0.0,
    poisson: Annotated[bool, typer.Option(help="Poisson arrivals (else constant spacing).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
) -> None:
    """Feed a topic with synthetic customer-service and news events at a steady rate."""
    import asyncio

    from pipeline.cli_demo import produce_cmd as run

    if count is None and duration is None:
        raise UsageError("give --count or --duration (or both)", hint="e.g. --count 1000 --rate 200")
    if profile not in ("support", "news", "mixed"):
        raise UsageError(f"unknown profile '{profile}'", hint="use support, news or mixed")
    _emit_json(asyncio.run(run(bootstrap=bootstrap, topic=topic, rate=rate, count=count, duration=duration,
                               profile=profile, duplicate_ratio=duplicate_ratio, seed=seed, poisson=poisson)))


@app.command("bench")
def bench_cmd(
    model: Annotated[Path, typer.Option(help="Artifact directory (built from the sentiment preset if missing).")] = Path("models/sentiment-minilm"),
    quick: Annotated[bool, typer.Option(help="A run of a few minutes (shorter steps, fewer rates).")] = False,
    rate: Annotated[Optional[float], typer.Option(help="One step at this offered rate instead of the ladder.")] = None,
    slo_ms: Annotated[float, typer.Option(help="Latency objective: p99 must stay within this.")] = 250.0,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the JSON report here.")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Write PLOTS.png and PLOTS.html (default: next to --json).")] = None,
    naive: Annotated[bool, typer.Option(help="Also measure the naive transformers.pipeline consumer (needs the train extra).")] = True,
    duplicates: Annotated[bool, typer.Option(help="Also measure a stream with 50% duplicate texts.")] = True,
    fp32: Annotated[bool, typer.Option(help="Also measure the FP32 engine for the INT8/FP32 ratio.")] = True,
    step_seconds: Annotated[Optional[float], typer.Option(help="Seconds of load per step.")] = None,
    max_batch: Annotated[int, typer.Option(help="Batch size for the engine and the workers.")] = 64,
    bootstrap: Annotated[Optional[str], typer.Option(help="Use this broker instead of starting a local one.")] = None,
    delivery: Annotated[str, typer.Option(help="at_least_once | exactly_once (workers and the label reader).")] = "at_least_once",
    compare_eos: Annotated[bool, typer.Option(help="Also run the ladder in exactly-once mode (its cost, same run).")] = False,
) -> None:
    """Open-loop load test: raw engine vs pipeline vs naive consumer, latency ladder, knee, JSON and plots."""
    import asyncio

    from pipeline.cli_bench import bench

    if delivery not in ("at_least_once", "exactly_once"):
        raise UsageError(f"unknown delivery '{delivery}'", hint="use at_least_once or exactly_once")
    if plots is None and json_file is not None:
        plots = json_file.with_suffix("")
    for f in (json_file, plots):
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(bench(artifact=model, bootstrap=bootstrap, quick=quick, rate=rate, slo_ms=slo_ms,
                               json_path=json_file, plot_prefix=plots, naive=naive, duplicates=duplicates,
                               step_seconds=step_seconds, max_batch=max_batch, fp32=fp32, delivery=delivery,
                               compare_eos=compare_eos))
    if json_file is not None:
        import orjson

        json_file.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    summary = {k: v for k, v in report.items() if not k.endswith("steps")}
    _emit_json(summary)


alerts_app = typer.Typer(help="The alerting feed: windowed rules on the label stream.", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("run")
def alerts_run(
    config: ConfigOpt = None,
    bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (overrides config).")] = None,
) -> None:
    """Evaluate the alerting.rules tables of the config on the label topic; publish alerts until SIGTERM."""
    import asyncio

    from consumers.alerting import serve_alerting
    from pipeline import logs

    s = _settings(config, kafka={"bootstrap_servers": bootstrap})
    logs.configure(s.log.level, s.log.format)
    raise typer.Exit(asyncio.run(serve_alerting(s)))


@alerts_app.command("tail")
def alerts_tail(
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap servers.")] = "127.0.0.1:9092",
    topic: Annotated[str, typer.Option(help="Alert topic.")] = "alerts",
    from_beginning: Annotated[bool, typer.Option(help="Show past alerts too.")] = True,
    count: Annotated[Optional[int], typer.Option(help="Stop after this many alerts.")] = None,
) -> None:
    """A readable live view of the alert topic."""
    import asyncio

    import orjson
    from aiokafka import AIOKafkaConsumer
    from rich.console import Console

    console = Console()
    colour = {"critical": "bold red", "warning": "yellow", "info": "cyan"}

    async def tail() -> None:
        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed",
                             auto_offset_reset="earliest" if from_beginning else "latest")
        await c.start()
        n = 0
        try:
            async for r in c:
                a = orjson.loads(r.value)
                import datetime as dt

                when = dt.datetime.fromtimestamp(a["last_event_at"] / 1000).strftime("%H:%M:%S")
                mark = "FIRING " if a["status"] == "firing" else "resolved"
                style = colour.get(a["severity"], "") if a["status"] == "firing" else "green"
                console.print(f"[{style}]{mark}[/] {when} {a['rule']} {a['key']}={a['entity']} value "
                              f"{a['value']:.2f} (threshold {a['threshold']}) window {a['window_s']:.0f}s "
                              f"samples {', '.join(a['sample_ids'][:3])}", highlight=False)
                n += 1
                if count is not None and n >= count:
                    break
        finally:
            await c.stop()

    asyncio.run(tail())


# ---------------------------------------------------------------------------------------------- entry
def main(argv: list[str] | None = None) -> int:  # noqa: C901
    """Console entry point: user errors become one line and an exit code, never a traceback."""
    import click

    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=argv, prog_name="streamlabel", standalone_mode=False)
        return 0
    except StreamlabelError as exc:
        _error(exc.render())
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        _error("interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file or port the user named: say which, no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _error(f"{where}{exc.strerror or exc}")
        return 2


def _error(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(msg)}")


if __name__ == "__main__":
    sys.exit(main())

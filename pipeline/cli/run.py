"""``streamlabel run``: classify workers in one consumer group until SIGTERM/SIGINT (the runner drains and commits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ConfigOpt, CreateTopicsOpt, positive, settings


def run_cmd(
    config: ConfigOpt = None,
    workers: Annotated[int, typer.Option(help="Worker processes in one consumer group.", callback=positive)] = 1,
    bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (overrides config).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Artifact directory (overrides config).")] = None,
    input_topic: Annotated[Optional[str], typer.Option("--input", help="Input topic.")] = None,
    output_topic: Annotated[Optional[str], typer.Option("--output", help="Label topic.")] = None,
    dlq_topic: Annotated[Optional[str], typer.Option("--dlq", help="Dead-letter topic.")] = None,
    group: Annotated[Optional[str], typer.Option(help="Consumer group id.")] = None,
    create_topics: CreateTopicsOpt = False,
) -> None:
    """Run workers (classify or generate, as the artifact says): Kafka in → labels or texts out, until SIGTERM/SIGINT (then drain and commit)."""
    from consumers.runner import run_workers
    from pipeline import logs

    s = settings(config, kafka={"bootstrap_servers": bootstrap, "group_id": group},
                 model={"path": str(model) if model else None},
                 topics={"input": input_topic, "output": output_topic, "dlq": dlq_topic,
                         "create": True if create_topics else None})
    logs.configure(s.log.level, s.log.format)
    raise typer.Exit(run_workers(s, workers))

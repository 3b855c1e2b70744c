"""Replay a file onto a topic at a given rate, once or looping: JSONL ({"text", "label"?, "id"?, …}),
CSV (a ``text`` column, optional ``label``), or plain text (one text a line); ``.gz`` works for all."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Iterator

import orjson

from pipeline.errors import UsageError
from pipeline.model.data import open_text
from pipeline.events import encode_input


def rows(path: str | Path) -> list[dict]:
    """The file's events as dicts with at least ``text``; errors name the line and the fix."""
    p = Path(path)
    if not p.is_file():
        raise UsageError("file not found", where=str(p), hint="pass a JSONL, CSV or plain-text file")
    name = p.name.removesuffix(".gz")
    out: list[dict] = []
    try:
        with open_text(p) as fh:
            if name.endswith(".csv"):
                reader = csv.DictReader(fh)
                if "text" not in (reader.fieldnames or []):
                    raise UsageError(f"CSV header is {reader.fieldnames}; it needs a 'text' column", where=str(p))
                out = [{k: v for k, v in r.items() if k in ("text", "label", "id", "source", "entity") and v}
                       for r in reader if (r.get("text") or "").strip()]
            elif name.endswith(".jsonl") or name.endswith(".json"):
                for n, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        d = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        raise UsageError("line is not valid JSON", where=f"{p}:{n}",
                                         hint='each line must be an object with "text"') from None
                    if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                        raise UsageError('line has no "text" string', where=f"{p}:{n}")
                    out.append(d)
            else:
                out = [{"text": line.rstrip("\n")} for line in fh if line.strip()]
    except UnicodeDecodeError:
        raise UsageError("file is not UTF-8 text", where=str(p), hint="re-encode it as UTF-8") from None
    if not out:
        raise UsageError("file holds no texts", where=str(p))
    return out


def records(path: str | Path, *, loop: bool = False, source: str = "replay") -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) pairs in the wire format; ids are ``<file>-<n>`` (with the pass number when looping)."""
    data = rows(path)
    stem = Path(path).name.split(".")[0]
    passes = itertools.count() if loop else range(1)
    for k in passes:
        for i, d in enumerate(data):
            ev_id = f"{stem}-{i}" if k == 0 else f"{stem}-{i}-p{k}"
            entity = d.get("entity")
            yield ((str(entity).encode() if entity else None),
                   encode_input(d["text"], id=ev_id, source=d.get("source", source), entity=entity,
                                label=d.get("label")))

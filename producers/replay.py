"""Replay a file's texts onto a topic, once or looping, as wire-format records (``streamlabel replay``).

Reading is ``pipeline.textfile`` (JSONL, CSV, plain text, ``.gz``): the whole file is read and checked first.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.events import encode_input
from pipeline.textfile import TextRow, read_rows


def records(source: str | Path | Sequence[TextRow], *, loop: bool = False, stem: str | None = None,
            default_source: str = "replay") -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) pairs in the wire format; ids are ``<stem>-<n>`` (with the pass number when looping).

    ``source`` is a file (read at once, so its errors come before anything is sent) or rows already read;
    the key is the row's entity, so one entity's events stay in one partition.
    """
    if isinstance(source, (str, Path)):
        stem = stem or Path(source).name.split(".")[0]
        rows: Sequence[TextRow] = read_rows(source)
    else:
        rows = source
    stem = stem or "replay"
    passes = itertools.count() if loop else range(1)
    for k in passes:
        for i, r in enumerate(rows):
            ev_id = f"{stem}-{i}" if k == 0 else f"{stem}-{i}-p{k}"
            yield ((r.entity.encode() if r.entity else None),
                   encode_input(r.text, id=ev_id, source=r.source or default_source, entity=r.entity, label=r.label))

"""The one reader of text files: JSONL, CSV or plain text, each optionally gzipped.

Used by training and evaluation (``pipeline/model/data.py``, labels required) and by ``streamlabel replay``
(labels optional). The format follows the name without ``.gz``: ``.csv`` is CSV with a ``text`` column
(and ``label``, ``id``, ``source``, ``entity`` when present), ``.jsonl`` / ``.ndjson`` / ``.json`` is one JSON
object a line, anything else is one text a line (blank lines skipped), unless its first non-blank line is a
JSON object, then it is read as JSONL. Every problem is one ``UsageError`` naming the file (and the line).
The whole file is read before anything is sent or trained, so a bad line or a truncated ``.gz`` stops a
command before it has done anything.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson

from pipeline.errors import UsageError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_FIELDS = ("id", "source", "entity")


@dataclass(frozen=True)
class TextRow:
    """One text of a file, with what the file says about it."""

    text: str
    label: str | None = None
    id: str | None = None
    source: str | None = None
    entity: str | None = None
    line: int = 0  # where it starts in the file (1-based), for messages


def open_text(path: Path) -> io.TextIOBase:
    """A UTF-8 text file, gunzipped on the fly when it ends in .gz."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def file_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``text``, from the name without ``.gz`` (and a look at the first line for ``text``)."""
    name = path.name.removesuffix(".gz").lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def read_rows(path: str | Path, *, require_label: bool = False) -> list[TextRow]:
    """Every text of the file; with ``require_label`` every row must name a label (training, evaluation)."""
    p = Path(path)
    usage = 'a JSONL file of {"text": "...", "label": "..."}, or a CSV with text,label columns' if require_label \
        else "a JSONL, CSV or plain-text file"
    if not p.exists():
        raise UsageError("file not found", where=str(p), hint=f"pass {usage}")
    if not p.is_file():
        raise UsageError("not a file", where=str(p), hint=f"pass {usage}")
    fmt = file_format(p)
    try:
        with open_text(p) as fh:
            if fmt == "text":
                first = _peek_nonblank(fh)
                fh.seek(0)
                if first.lstrip().startswith("{"):
                    fmt = "jsonl"
            if fmt == "csv":
                rows = _csv(fh, p, require_label)
            elif fmt == "jsonl":
                rows = _jsonl(fh, p, require_label)
            else:
                if require_label:
                    raise UsageError("plain text has no labels", where=str(p), hint=f"pass {usage}")
                rows = [TextRow(text=line.rstrip("\r\n"), line=n) for n, line in enumerate(fh, start=1) if line.strip()]
    except UnicodeDecodeError:
        raise UsageError("file is not UTF-8 text", where=str(p), hint="re-encode it as UTF-8") from None
    except EOFError:
        raise UsageError("the gzip file is truncated (it ends before its end-of-stream marker)", where=str(p),
                         hint="copy or download it again, or re-compress the original") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        why = str(exc).split(" (")[0].rstrip(".")
        raise UsageError(f"not a valid gzip file: {why[:1].lower()}{why[1:]}", where=str(p),
                         hint="copy or download it again, or drop the .gz suffix if it is not compressed") from None
    except csv.Error as exc:
        raise UsageError(f"not valid CSV ({exc})", where=str(p), hint="quote fields that hold commas or newlines") from None
    except OSError as exc:
        raise UsageError(f"cannot read the file ({exc.strerror or exc})", where=str(p)) from None
    if not rows:
        raise UsageError("file holds no examples" if require_label else "file holds no texts", where=str(p),
                         hint="it needs at least one text,label row" if require_label else f"pass {usage}")
    return rows


def _peek_nonblank(fh: io.TextIOBase) -> str:
    for line in fh:
        if line.strip():
            return line
    return ""


def _csv(fh, p: Path, require_label: bool) -> list[TextRow]:
    reader = csv.DictReader(fh)
    cols = reader.fieldnames or []
    if "text" not in cols or (require_label and "label" not in cols):
        need = "'text' and 'label' columns" if require_label else "a 'text' column"
        raise UsageError(f"CSV header is {cols}; it needs {need}", where=str(p),
                         hint="rename the columns to text,label" if require_label else "name the text column 'text'")
    out = []
    line = reader.line_num + 1
    for row in reader:
        out.append(_row(row, p, line, require_label, jsonl=False))
        line = reader.line_num + 1
    return out


def _jsonl(fh, p: Path, require_label: bool) -> list[TextRow]:
    shape = '{"text": "...", "label": "..."}' if require_label else '{"text": "..."}'
    out = []
    for n, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise UsageError("line is not valid JSON", where=f"{p}:{n}", hint=f"each line must be {shape}") from None
        if not isinstance(d, dict):
            raise UsageError("line is not a JSON object", where=f"{p}:{n}", hint=f"each line must be {shape}")
        out.append(_row(d, p, n, require_label, jsonl=True))
    return out


def _row(d: dict, p: Path, n: int, require_label: bool, *, jsonl: bool) -> TextRow:
    text, label = d.get("text"), d.get("label")
    if not isinstance(text, str) or not text.strip():
        raise UsageError("missing or empty 'text'", where=f"{p}:{n}",
                         hint='every line needs a non-empty "text" string' if jsonl else "every row needs a non-empty text")
    label = None if label is None or str(label).strip() == "" else str(label).strip()
    if require_label and label is None:
        raise UsageError("missing 'label'", where=f"{p}:{n}", hint="every row needs a label name")
    extra = {k: str(d[k]) for k in _FIELDS if d.get(k) not in (None, "")}
    return TextRow(text=text, label=label, line=n, **extra)

"""Labelled text files (JSONL / CSV, optionally gzipped), reproducible splits, and quality metrics."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import orjson

from pipeline.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def open_text(path: Path) -> io.TextIOBase:
    """A text file, gunzipped on the fly when it ends in .gz."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def read_labelled(path: str | Path, *, require_label: bool = True) -> list[Example]:
    """Read ``{"text":…,"label":…}`` JSONL or a CSV with ``text,label`` columns; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise UsageError("file not found", where=str(p), hint="pass a JSONL or CSV file with text and label")
    fmt = "csv" if p.name.removesuffix(".gz").endswith(".csv") else "jsonl"
    out: list[Example] = []
    try:
        with open_text(p) as fh:
            if fmt == "csv":
                reader = csv.DictReader(fh)
                cols = reader.fieldnames or []
                if "text" not in cols or (require_label and "label" not in cols):
                    raise UsageError(
                        f"CSV header is {cols}, it needs 'text' and 'label' columns",
                        where=str(p),
                        hint="rename the columns to text,label",
                    )
                for lineno, row in enumerate(reader, start=2):
                    out.append(_example(row.get("text"), row.get("label"), p, lineno, require_label))
            else:
                for lineno, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        raise UsageError(
                            "line is not valid JSON",
                            where=f"{p}:{lineno}",
                            hint='each line must be {"text": "...", "label": "..."}',
                        ) from None
                    if not isinstance(row, dict):
                        raise UsageError("line is not a JSON object", where=f"{p}:{lineno}",
                                         hint='each line must be {"text": "...", "label": "..."}')
                    out.append(_example(row.get("text"), row.get("label"), p, lineno, require_label))
    except UnicodeDecodeError:
        raise UsageError("file is not UTF-8 text", where=str(p), hint="re-encode it as UTF-8") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UsageError(f"cannot read file ({exc})", where=str(p)) from None
    if not out:
        raise UsageError("file holds no examples", where=str(p), hint="it needs at least one text,label row")
    return out


def _example(text: object, label: object, p: Path, lineno: int, require_label: bool) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise UsageError("missing or empty 'text'", where=f"{p}:{lineno}", hint="every row needs a non-empty text")
    if require_label and (label is None or str(label).strip() == ""):
        raise UsageError("missing 'label'", where=f"{p}:{lineno}", hint="every row needs a label name")
    return Example(text=text, label="" if label is None else str(label).strip())


def split_of(text: str, buckets: int = 10) -> int:
    """A stable bucket for a text (hash of the lower-cased text), so splits never depend on file order."""
    return int.from_bytes(hashlib.sha1(text.lower().encode("utf-8")).digest()[:4], "big") % buckets


def train_val_test(examples: Sequence[Example]) -> tuple[list[Example], list[Example], list[Example]]:
    """80/10/10 split by text hash: bucket 0 is test, bucket 1 validation, the rest train."""
    train, val, test = [], [], []
    for ex in examples:
        b = split_of(ex.text)
        (test if b == 0 else val if b == 1 else train).append(ex)
    return train, val, test


def label_indices(examples: Iterable[Example], labels: Sequence[str], where: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    lowered = {name.lower(): i for i, name in enumerate(labels)}
    out = []
    for ex in examples:
        i = index.get(ex.label, lowered.get(ex.label.lower()))
        if i is None:
            raise UsageError(
                f"unknown label '{ex.label}'; the model's labels are {list(labels)}",
                where=where,
                hint="rename that label in the file to one of the model's labels",
            )
        out.append(i)
    return np.asarray(out, dtype=np.int64)


def quality(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (over labels present in y_true or y_pred) and per-class recall."""
    n = int(len(y_true))
    acc = float((y_true == y_pred).mean()) if n else 0.0
    f1s, recall = [], {}
    for i, name in enumerate(labels):
        tp = int(((y_pred == i) & (y_true == i)).sum())
        fp = int(((y_pred == i) & (y_true != i)).sum())
        fn = int(((y_pred != i) & (y_true == i)).sum())
        if tp + fn:
            recall[name] = round(tp / (tp + fn), 4)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "n": n,
        "accuracy": round(acc, 4),
        "macro_f1": round(float(np.mean(f1s)) if f1s else 0.0, 4),
        "per_class_recall": recall,
    }

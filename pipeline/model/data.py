"""Labelled examples (read by ``pipeline.textfile``), reproducible splits, and quality metrics."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import UsageError
from pipeline.textfile import read_rows

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def read_labelled(path: str | Path) -> list[Example]:
    """Labelled texts of a JSONL / CSV file (``pipeline.textfile``, labels required); errors name the line."""
    return [Example(text=r.text, label=r.label or "") for r in read_rows(path, require_label=True)]


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

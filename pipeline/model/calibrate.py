"""``streamlabel model calibrate-cascade``: the threshold of a two-stage cascade, on a preset's validation split."""

from __future__ import annotations

from pathlib import Path

from pipeline.cascade import calibrate
from pipeline.engine import OnnxEngine
from pipeline.errors import UsageError


def calibrate_on_preset(first_path: Path, second_path: Path, preset: str | None, target: float) -> dict:
    """The smallest threshold at which the cascade agrees with the second stage on ``target`` of the validation
    split (of ``preset``, or of the preset the second stage was built from), with its figures."""
    from pipeline.model import presets as P

    first = OnnxEngine(first_path, provider="cpu", warmup=False)
    second = OnnxEngine(second_path, provider="cpu", warmup=False)
    found = P.labelled_split([preset, second.manifest.training.get("preset"),
                              first.manifest.training.get("teacher_preset")], "validation", first.labels)
    if found is None:
        raise UsageError("no labelled validation split: the second stage was not built from a preset",
                         hint="pass --data-preset NAME")
    name, val, y = found
    texts = [e.text for e in val]
    res = calibrate(first, second, texts, y, target)
    res.update({"first": first.model_id, "second": second.model_id, "data": f"{name} validation split"})
    first.close()
    second.close()
    return res

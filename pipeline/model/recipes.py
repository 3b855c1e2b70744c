"""Which build a classifier preset or directory takes: the plain build (export → quantize → gates), or, for a
preset that names a teacher, distillation from the teacher's latest artifact (which then goes through the plain
build). The one entry ``model build`` and the demo use; ``build`` and ``distil`` do not know of each other's
callers."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UsageError
from pipeline.model import presets as P
from pipeline.model import require_train
from pipeline.model.build import BuildResult, Reporter, build
from pipeline.model.distil import build_distilled_preset


def build_classifier(*, out: Path, preset: str | None = None, from_dir: Path | None = None, name: str | None = None,
                     bench: bool = True, reporter: Reporter | None = None, prune_heads: float | None = None,
                     break_variant: str | None = None, **options) -> BuildResult:
    """Build a classifier artifact into ``out``; ``options`` are ``build``'s (labels, variants, gates…)."""
    if preset and P.get(preset).teacher:  # a distilled preset: the teacher's artifact taught to a student
        if from_dir is not None or prune_heads is not None or break_variant:
            raise UsageError(f"preset {preset} is distilled from {P.get(preset).teacher}; it takes no --from, "
                             "--prune-heads or --break-variant")
        require_train("model build")
        return build_distilled_preset(P.get(preset), out=out, name=name, bench=bench, reporter=reporter or Reporter())
    return build(out=out, preset=preset, from_dir=from_dir, name=name, bench=bench, reporter=reporter,
                 prune_heads=prune_heads, break_variant=break_variant, **options)

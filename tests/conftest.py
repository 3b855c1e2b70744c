"""Shared fixtures: the tiny model artifacts (built once per session). Service fixtures live in tests/services.py.

Without the train extra (torch, transformers: ``make test-serve``), the tiny artifacts are the committed copies
in ``tests/fixtures/models`` and the tests marked ``train`` are skipped.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["tests.services"]

HAVE_TRAIN = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "onnx"))
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"


def pytest_collection_modifyitems(config, items):
    if HAVE_TRAIN:
        return
    skip = pytest.mark.skip(reason="builds or trains models: needs the train extra (torch), not installed here")
    for item in items:
        if "train" in item.keywords:
            item.add_marker(skip)


def _committed(models_root: Path, name: str) -> Path:
    dest = models_root / name / "1"
    if not dest.exists():
        shutil.copytree(FIXTURES / name / "1", dest)
    return dest


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_artifact(models_root) -> Path:
    """A tiny random-init BERT artifact (fp32, int8, fp16), built with the real build path in seconds."""
    if not HAVE_TRAIN:
        return _committed(models_root, "tiny")
    from pipeline.model.build import Reporter, build

    res = build(out=models_root, preset="tiny", bench=False, reporter=Reporter(quiet=True))
    assert (res.path / "manifest.json").is_file() and set(res.manifest.variants) == {"fp32", "int8", "fp16"}
    return res.path


@pytest.fixture()
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    """A private copy a test may damage."""
    dest = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_artifact, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_generator(models_root) -> Path:
    """A tiny random-init Llama generator artifact (fp32, int8), built with the real build path in seconds."""
    if not HAVE_TRAIN:
        return _committed(models_root, "tiny-generator")
    from pipeline.model.build import Reporter
    from pipeline.model.generative import build_generator

    res = build_generator(out=models_root, preset="tiny-generator", variants=("fp32", "int8"), bench=False,
                          reporter=Reporter(quiet=True))
    assert res.manifest.task == "text-generation" and set(res.manifest.variants) == {"fp32", "int8"}
    return res.path

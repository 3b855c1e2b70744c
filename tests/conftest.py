"""Shared fixtures: the tiny model artifact (built once per session). Service fixtures live in tests/services.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["tests.services"]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_artifact(models_root) -> Path:
    """A tiny random-init BERT artifact (fp32, int8, fp16), built with the real build path in seconds."""
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
    from pipeline.model.build import Reporter
    from pipeline.model.generative import build_generator

    res = build_generator(out=models_root, preset="tiny-generator", variants=("fp32", "int8"), bench=False,
                          reporter=Reporter(quiet=True))
    assert res.manifest.task == "text-generation" and set(res.manifest.variants) == {"fp32", "int8"}
    return res.path

"""Fixtures of the integration tests (the services are in tests/services.py)."""

from __future__ import annotations

import pytest

from pipeline.engine import OnnxEngine


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    """The tiny classifier on CPU, shared by a module's workers."""
    eng = OnnxEngine(tiny_artifact, provider="cpu")
    yield eng
    eng.close()

"""The committed test models (``tests/fixtures/models``, what ``make test-serve`` runs on without torch) are still
what the build makes today. If a recipe changes, rebuild them: ``make fixtures``."""

from __future__ import annotations

import pytest

from pipeline.engine import OnnxEngine
from pipeline.manifest import load_manifest
from tests.conftest import FIXTURES, HAVE_TRAIN

pytestmark = [pytest.mark.train,
              pytest.mark.skipif(not HAVE_TRAIN, reason="compares with a fresh build: needs the train extra")]

TEXTS = ["profit warning sends shares lower", "dividend raised again", "the meeting is on tuesday",
         "worst airline ever, lost my bag", "ok"]


def _graph(path):
    import onnx

    g = onnx.load(str(path)).graph
    return [n.op_type for n in g.node], sorted((i.name, tuple(i.dims)) for i in g.initializer)


def test_the_committed_tiny_classifier_is_what_the_build_makes(tiny_artifact):
    """The same graphs (ops, weight names and shapes) and manifest. Not the same numbers: the WordPiece trainer
    breaks ties between equally frequent pieces in no fixed order, so each build's vocabulary differs a little."""
    import json

    committed = FIXTURES / "tiny" / "1"
    _, fresh_m = load_manifest(tiny_artifact)
    _, old_m = load_manifest(committed)  # checksums verified
    assert (old_m.labels, old_m.inputs, old_m.max_length) == (fresh_m.labels, fresh_m.inputs, fresh_m.max_length)
    assert set(old_m.variants) == set(fresh_m.variants) and old_m.gate["fusions"] == fresh_m.gate["fusions"]
    for v in old_m.variants:
        assert _graph(committed / old_m.variants[v].file) == _graph(tiny_artifact / fresh_m.variants[v].file), \
            f"the {v} graph changed: rebuild the fixtures with make fixtures"
    tok = [json.loads((root / "tokenizer.json").read_text()) for root in (committed, tiny_artifact)]
    assert [t["model"]["type"] for t in tok] == ["WordPiece"] * 2
    assert len(tok[0]["model"]["vocab"]) == len(tok[1]["model"]["vocab"])
    assert tok[0]["normalizer"] == tok[1]["normalizer"] and tok[0]["post_processor"] == tok[1]["post_processor"]
    eng = OnnxEngine(committed, variant="int8", provider="cpu", warmup=False)
    assert [p.label in old_m.labels for p in eng.predict_sync(TEXTS)] == [True] * len(TEXTS)
    eng.close()


def test_the_committed_tiny_generator_is_what_the_build_makes(tiny_generator):
    from pipeline.generation import GenerativeModel

    committed = FIXTURES / "tiny-generator" / "1"
    _, fresh_m = load_manifest(tiny_generator)
    _, old_m = load_manifest(committed)
    assert old_m.tokenizer_sha256 == fresh_m.tokenizer_sha256, "rebuild the fixtures: make fixtures"
    assert old_m.gate["reference_tokens"] == fresh_m.gate["reference_tokens"]
    a = GenerativeModel(tiny_generator, variant="fp32", provider="cpu")
    b = GenerativeModel(committed, variant="fp32", provider="cpu")
    prompts = [list(p) for p in old_m.gate["reference_tokens"][:4]]
    assert b.greedy(prompts, 8) == a.greedy(prompts, 8)

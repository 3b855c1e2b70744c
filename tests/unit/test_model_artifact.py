"""The artifact: manifest figures, checksum verification, version resolution, engine on the artifact."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import orjson
import pytest

from pipeline.engine import OnnxEngine
from pipeline.errors import ModelError
from pipeline.manifest import load_manifest, resolve_artifact_dir


def test_manifest_records_variants_checksums_and_parity(tiny_artifact):
    root, m = load_manifest(tiny_artifact)
    assert m.name == "tiny" and m.version >= 1 and m.model_id == f"tiny@{m.version}"
    assert m.labels == ("negative", "neutral", "positive")
    assert set(m.variants) == {"fp32", "int8", "fp16"}
    assert m.variants["fp32"].provider == "CPUExecutionProvider"
    assert m.variants["int8"].provider == "CPUExecutionProvider"
    assert m.variants["fp16"].provider == "CUDAExecutionProvider"
    fp32 = m.variants["fp32"].parity
    assert fp32["n"] > 100
    assert fp32["max_abs_logit_diff_vs_torch"] < 1e-3
    assert fp32["agreement_vs_torch"] == 1.0
    assert m.variants["int8"].parity["agreement_vs_fp32"] >= 0.9
    for v in m.variants.values():
        assert len(v.sha256) == 64 and (root / v.file).stat().st_size == v.bytes
    assert m.gate["fusions"], "the optimizer should have fused attention/layernorm"


def test_name_directory_resolves_to_newest_version(artifact_copy):
    name_dir = artifact_copy.parent
    (name_dir / "7").mkdir()
    assert resolve_artifact_dir(name_dir) == artifact_copy  # "7" has no manifest: not a version
    import shutil

    shutil.copytree(artifact_copy, name_dir / "12")
    assert resolve_artifact_dir(name_dir).name == "12"


def test_corrupt_file_is_named(artifact_copy):
    with open(artifact_copy / "model.int8.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ModelError, match=r"model\.int8\.onnx' is corrupt"):
        load_manifest(artifact_copy)
    # verifying only another variant still works: the engine checks what it loads
    load_manifest(artifact_copy, variants=("fp32",))


def test_missing_file_and_bad_manifest(artifact_copy):
    (artifact_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json' named in the manifest is missing"):
        load_manifest(artifact_copy)
    (artifact_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_manifest(artifact_copy)
    (artifact_copy / "manifest.json").write_bytes(orjson.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="incomplete"):
        load_manifest(artifact_copy)


def test_engine_pads_to_its_own_longest_and_matches_batched_logits(tiny_artifact):
    eng = OnnxEngine(tiny_artifact, variant="fp32", provider="cpu")
    try:
        texts2 = ["short", "a somewhat longer sentence about quarterly earnings and guidance"]
        enc = eng.encode(texts2)
        toks = eng.tokenize(texts2)
        assert [t.n for t in toks] == [len(eng.tokenizer.encode(t).ids) for t in texts2]  # exact counts
        assert enc.arrays["input_ids"].shape[1] == eng.width(int(enc.lengths.max())) == int(enc.lengths.max())
        assert eng.pad_multiple == 1 and 1 <= eng.call_overhead_tokens <= 512
        texts = ["profits fell sharply", "shares rose after the upgrade", "the meeting is on tuesday"]
        batched = eng.logits(texts)
        single = np.concatenate([eng.logits([t]) for t in texts])
        assert np.abs(batched - single).max() < 1e-4  # padding must not change the answer
        preds = eng.predict_sync(texts)
        assert [p.label for p in preds] == [eng.labels[i] for i in batched.argmax(1)]
        assert all(abs(sum(p.scores.values()) - 1.0) < 1e-4 and p.model == eng.model_id for p in preds)
    finally:
        eng.close()


async def test_engine_runs_off_the_event_loop(tiny_artifact):
    eng = OnnxEngine(tiny_artifact, provider="cpu")
    seen = []
    orig = eng.predict_sync

    def spy(texts):
        seen.append(threading.current_thread().name)
        return orig(texts)

    eng.predict_sync = spy  # type: ignore[method-assign]
    try:
        out = await asyncio.wait_for(eng.predict(["hello", "world"]), 10)
        assert len(out) == 2 and eng.variant == "int8"  # CPU picks the int8 variant by default
        assert seen and seen[0].startswith("onnx") and seen[0] != threading.current_thread().name
    finally:
        eng.close()


def test_unknown_variant_and_provider(tiny_artifact):
    with pytest.raises(ModelError, match="cuda"):
        OnnxEngine(tiny_artifact, provider="cuda", warmup=False)
    _, m = load_manifest(tiny_artifact)
    with pytest.raises(ModelError, match="no 'int4' variant"):
        m.variant("int4")


async def test_engine_cpu_is_counted_on_the_engine_threads(tiny_artifact):
    from pipeline.runtime import thread_cpu_seconds

    eng = OnnxEngine(tiny_artifact, variant="fp32", provider="cpu")
    try:
        toks = eng.tokenize(["a sentence of a dozen or so words about quarterly earnings " * 4] * 64)
        before = thread_cpu_seconds(eng.thread_ids)
        main0 = time.thread_time()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            await eng.infer(toks)
        engine_s = thread_cpu_seconds(eng.thread_ids) - before
        assert engine_s >= 0.2, f"the engine's threads did the work ({engine_s:.2f} s CPU)"
        assert time.thread_time() - main0 < engine_s, "the event loop thread only waited"
    finally:
        eng.close()

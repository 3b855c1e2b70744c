"""The probe (a frozen encoder and a head over the mean of its layers): it learns, saves, loads back as one
classifier module, and exports to ONNX with the same logits — on the tiny random BERT, in seconds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model import presets as P

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")


def test_probe_trains_saves_loads_and_exports_like_any_classifier(tmp_path):
    from pipeline.model import export as X
    from pipeline.model.probe import is_probe, train_probe
    from pipeline.model.structure import load_classifier

    pre = P.get("tiny")
    P.build_tiny_hf(tmp_path / "base", pre)
    train, val, _ = pre.examples()
    train, val = train[:600], val[:200]
    figures = train_probe(tmp_path / "base", tmp_path / "probe", pre.labels, train, val, layers=(1, 2), hidden=16,
                          max_length=32, epochs=60)
    assert is_probe(tmp_path / "probe") and figures["train_examples"] == 600
    assert figures["history"][-1]["val_accuracy"] is not None
    model = load_classifier(tmp_path / "probe")
    assert model.config.architectures == ["ProbeForSequenceClassification"]
    assert model.config.id2label == dict(enumerate(pre.labels))
    base = load_classifier(tmp_path / "base").base_model.state_dict()
    frozen = model.encoder.state_dict()
    assert all(torch.equal(base[k], frozen[k]) for k in frozen if k in base), "the encoder was not trained"

    clf = X.load_hf_classifier(tmp_path / "probe")
    texts = [e.text for e in val[:40]]
    ref = X.torch_logits(clf, texts, 32)
    onnx = tmp_path / "probe.onnx"
    X.export_onnx(clf, onnx)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    enc = clf.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
    got = sess.run(None, {k: enc[k].astype(np.int64) for k in names})[0]
    assert np.abs(got - ref).max() < 1e-3, "the ONNX graph computes the probe's logits"
    # The head learned something: it beats the majority class on its own training data.
    y = np.array([pre.labels.index(e.label) for e in train[:200]])
    pred = X.torch_logits(clf, [e.text for e in train[:200]], 32).argmax(1)
    assert (pred == y).mean() > np.bincount(y).max() / len(y)

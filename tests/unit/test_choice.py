"""A generator served as a classifier of any label set: only label sequences can come out, and the scores are
the constrained distribution (each label's summed token log-probabilities, renormalized over the labels)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.events import Prediction
from pipeline.generation import GenerativeModel
from pipeline.generation.choice import ChoiceClassifier
from pipeline.tasks import open_task

TEXTS = ["My card was charged twice for one coffee.", "Thanks, the new branch staff were great!",
         "Shares of ACME fell 12% after the earnings call.", "ok"]


@pytest.fixture(scope="module")
def model(tiny_generator):
    m = GenerativeModel(tiny_generator, variant="fp32", provider="cpu")
    yield m
    m.close()


def brute_force(model: GenerativeModel, clf: ChoiceClassifier, text: str) -> np.ndarray:
    """Each label's log-probability token by token from a full prefill of prompt + label (no trie, no prefix)."""
    prompt = model.encode(model.render(clf.system, text))
    total = []
    for seq in clf.seqs:
        lp, ids = 0.0, list(prompt)
        for t in seq:
            last, _ = model.prefill(ids)
            x = last.astype(np.float64)
            lp += (x - x.max() - np.log(np.exp(x - x.max()).sum()))[t]
            ids.append(t)
        total.append(lp)
    p = np.exp(np.array(total) - max(total))
    return p / p.sum()


@pytest.mark.parametrize("labels", [("negative", "neutral", "positive"),
                                    ("spam", "spam or abuse", "fine"),  # one label a prefix of another
                                    ("billing", "billing dispute", "bill")])
def test_scores_are_the_constrained_distribution_down_the_trie(model, labels):
    clf = ChoiceClassifier(model, labels, "Classify the message.", calibrate=False)
    assert any(len(s) > 1 for s in clf.seqs), "multi-token labels: the trie is walked"
    for text in TEXTS:
        got = clf.scores(clf.tokenize([text])[0].ids)
        np.testing.assert_allclose(got, brute_force(model, clf, text), atol=1e-5)
        assert abs(got.sum() - 1) < 1e-9


def test_only_labels_come_out_whatever_the_text(model):
    clf = ChoiceClassifier(model, ["yes", "no"])
    rng = np.random.default_rng(0)
    noise = ["".join(chr(c) for c in rng.integers(33, 1200, size=int(n))) for n in rng.integers(1, 60, size=25)]
    out = clf.predict_sync(noise + TEXTS)
    assert all(isinstance(p, Prediction) and p.label in ("yes", "no") for p in out)
    assert all(set(p.scores) == {"yes", "no"} and abs(sum(p.scores.values()) - 1) < 1e-5 for p in out)
    assert all(p.model == f"{model.model_id}:choice" for p in out)


def test_bad_label_sets_are_refused(model):
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="two or more distinct"):
        ChoiceClassifier(model, ["only"])
    with pytest.raises(UsageError, match="two or more distinct"):
        ChoiceClassifier(model, ["a", "a"])


async def test_it_is_served_as_a_classifier_behind_the_batcher(model):
    clf = ChoiceClassifier(model, ["negative", "neutral", "positive"])
    task = open_task(Settings(), clf)
    assert task.kind == "classify"
    task.scheduler.start()
    try:
        got = await task.scheduler.submit_many(TEXTS)
        assert [p.label for p in got.results] == [p.label for p in clf.predict_sync(TEXTS)]
    finally:
        await task.scheduler.close()


def test_calibration_divides_out_the_content_free_distribution(model):
    raw = ChoiceClassifier(model, ["negative", "neutral", "positive"], calibrate=False)
    cal = ChoiceClassifier(model, ["negative", "neutral", "positive"])
    free = np.mean([raw.scores(raw.tokenize([t])[0].ids) for t in ("N/A", "", "[MASK]")], axis=0)
    for text in TEXTS:
        ids = raw.tokenize([text])[0].ids
        want = raw.scores(ids) / free
        np.testing.assert_allclose(cal.scores(ids), want / want.sum(), atol=1e-9)

"""Structured head pruning: what is removed, that the pruned model computes the same function as the masked
one, that a pruned build loads and passes the manifest's parity check, and the errors users can make."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.engine import OnnxEngine
from pipeline.model import presets as P
from pipeline.model import prune
from tests.unit.test_model_cli import run_cli

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")


def test_choose_heads_removes_the_least_important_across_layers_and_keeps_one_per_layer():
    imp = np.array([[0.9, 0.1, 0.5, 0.05],
                    [0.01, 0.02, 0.03, 0.04]])
    keep = prune.choose_heads(imp, 0.5)  # 4 of 8 heads go
    # global order: (1,0) (1,1) (1,2) (0,3) (1,3) (0,1) …; layer 1 keeps its last head
    assert keep == {0: [0, 1, 2], 1: [3]}
    assert sum(map(len, prune.choose_heads(imp, 0.99).values())) == 2  # never below one head per layer
    with pytest.raises(Exception, match="between 0 and 1"):
        prune.choose_heads(imp, 1.0)


@pytest.fixture()
def tiny_hf(tmp_path):
    """The tiny random BERT with a head scaled up, so that differences between heads show in the logits."""
    P.build_tiny_hf(tmp_path / "hf", P.get("tiny"), seed=3)
    m = prune.load_classifier(tmp_path / "hf")
    with torch.no_grad():
        m.classifier.weight.mul_(1000.0)
    m.save_pretrained(str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_a_pruned_model_computes_what_the_masked_model_computes(tiny_hf, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    texts = ["shares fell sharply after the warning", "record quarter for the bank", "flat"]
    enc = tok(texts, padding=True, return_tensors="pt")
    keep = {0: [1], 1: [0]}

    masked = prune.load_classifier(tiny_hf, attn_implementation="eager").eval()
    hooks = []
    for li, layer in enumerate(masked.base_model.encoder.layer):
        size = layer.attention.self.attention_head_size
        gate = torch.zeros(2)
        gate[keep[li]] = 1.0
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda m, a, g=gate.repeat_interleave(size): (a[0] * g,) + tuple(a[1:])))
    with torch.no_grad():
        want = masked(**enc).logits.numpy()
    for h in hooks:
        h.remove()

    pruned = prune.load_classifier(tiny_hf, attn_implementation="eager").eval()
    prune.prune(pruned, keep)
    assert prune.head_count(pruned) == [1, 1]
    assert pruned.base_model.encoder.layer[0].attention.self.query.weight.shape == (16, 32)
    prune.save(pruned, tok, tmp_path / "pruned", keep)
    reloaded = prune.load_classifier(tmp_path / "pruned", attn_implementation="eager").eval()
    with torch.no_grad():
        got = pruned(**enc).logits.numpy()
        again = reloaded(**enc).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(again, want, rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        full = prune.load_classifier(tiny_hf).eval()(**enc).logits.numpy()
    assert np.abs(full - want).max() > 0.05  # the removed heads did matter: the check above is not vacuous


def test_a_head_pruned_build_loads_and_keeps_the_parity_check(tmp_path):
    r = run_cli("model", "build", "--preset", "tiny", "--prune-heads", "0.5", "--variants", "fp32,int8",
                "--out", str(tmp_path), "--no-bench", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    hp = m["training"]["head_pruning"]
    assert m["name"] == "tiny-heads2" and hp["heads_before"] == 4 and hp["heads_after"] == 2
    assert hp["heads_per_layer"] == [1, 1] and hp["recovery"]["epochs"] == 1
    assert m["gate"]["passed"] and m["gate"]["fusions"].get("Attention") == 2  # fused despite the odd widths
    assert m["variants"]["fp32"]["parity"]["max_abs_logit_diff_vs_torch"] < 1e-3
    assert m["variants"]["int8"]["parity"]["agreement_vs_fp32"] >= 0.95
    import onnx

    root = tmp_path / "tiny-heads2" / "1"
    heads = [a.i for n in onnx.load(str(root / "model.fp32.onnx")).graph.node if n.op_type == "Attention"
             for a in n.attribute if a.name == "num_heads"]
    assert heads == [1, 1]
    for variant in ("fp32", "int8"):
        eng = OnnxEngine(root, variant=variant, provider="cpu", warmup=False)  # verifies checksums, loads, runs
        preds = eng.predict_sync(["profit warning sends shares lower", "dividend raised"])
        eng.close()
        assert [p.label in ("negative", "neutral", "positive") for p in preds] == [True, True]


@pytest.mark.parametrize("args, says", [
    (["--prune-heads", "1.5", "--preset", "tiny"], "between 0 and 1"),
    (["--prune-heads", "0.5", "--preset", "tiny-generator"], "not to generators"),
])
def test_prune_heads_user_errors(tmp_path, args, says):
    r = run_cli("model", "build", "--out", str(tmp_path), "--no-bench", *args)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_prune_heads_from_a_directory_needs_a_preset(tiny_hf, tmp_path):
    r = run_cli("model", "build", "--from", str(tiny_hf), "--prune-heads", "0.5", "--out", str(tmp_path), "--no-bench")
    assert r.returncode == 2 and "--prune-heads needs --preset" in r.stderr and "Traceback" not in r.stderr


def test_a_distilled_preset_needs_its_teacher_then_records_its_lineage(tmp_path):
    r = run_cli("model", "build", "--preset", "tiny-student", "--out", str(tmp_path), "--no-bench")
    assert r.returncode == 2 and "distilled from tiny, which is not built" in r.stderr
    assert f"streamlabel model build --preset tiny --out {tmp_path}" in r.stderr and "Traceback" not in r.stderr
    assert run_cli("model", "build", "--preset", "tiny", "--out", str(tmp_path), "--no-bench").returncode == 0
    r = run_cli("model", "build", "--preset", "tiny-student", "--out", str(tmp_path), "--no-bench", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    t = m["training"]
    assert m["name"] == "tiny-student" and t["preset"] == "tiny-student" and t["teacher"] == "tiny@1"
    assert t["student"] == "tiny-l1" and t["pruning"]["kept_layers"] == [0] and t["teacher_preset"] == "tiny"
    assert t["distillation"]["unlabelled_texts"] == 100 and m["gate"]["passed"]


def test_model_presets_lists_every_recipe_with_its_kind(capsys):
    from pipeline.cli import main

    assert main(["model", "presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(P.PRESETS) <= set(rows) and {"reply-smollm2", "tiny-generator"} <= set(rows)
    assert rows["sentiment-finance-minilm-l3"]["kind"] == "distilled from sentiment-finance-minilm (minilm-l3)"
    assert rows["reply-smollm2"]["kind"] == "generator" and all(r["licence"] for r in rows.values())

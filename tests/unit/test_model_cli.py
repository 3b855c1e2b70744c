"""`streamlabel model …` from the user's side: figures printed, errors one line with exit code 2/3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.cli import main
from pipeline.engine import OnnxEngine
from pipeline.manifest import load_manifest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)


def write_jsonl(path: Path, rows) -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    return path


@pytest.fixture(scope="module")
def self_labelled(tiny_artifact, tmp_path_factory) -> Path:
    """Texts labelled with the FP32 model's own answers: FP32 accuracy is 1.0 by construction."""
    texts = [f"{w} results for quarter {i} were {a}" for i, (w, a) in enumerate(
        [(w, a) for w in ("weak", "strong", "flat", "record", "mixed") for a in ("bad", "good", "fine", "poor", "great", "ok")])]
    eng = OnnxEngine(tiny_artifact, variant="fp32", provider="cpu", warmup=False)
    labels = [p.label for p in eng.predict_sync(texts)]
    eng.close()
    return write_jsonl(tmp_path_factory.mktemp("eval") / "self.jsonl", [{"text": t, "label": l} for t, l in zip(texts, labels)])


def test_eval_json_shape(tiny_artifact, self_labelled, capsys):
    assert main(["model", "eval", str(tiny_artifact), "--data", str(self_labelled), "--variant", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 30 and out["accuracy"] == 1.0 and out["macro_f1"] > 0 and out["variant"] == "fp32"
    assert set(out["per_class_recall"]) <= {"negative", "neutral", "positive"}


def test_eval_accepts_csv_and_label_case(tiny_artifact, self_labelled, tmp_path, capsys):
    rows = [orjson.loads(l) for l in self_labelled.read_text().splitlines()]
    csv = tmp_path / "e.csv"
    csv.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"].upper()}\n' for r in rows))
    assert main(["model", "eval", str(tiny_artifact), "--data", str(csv), "--variant", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0


@pytest.mark.parametrize("content, expect", [
    ("", "holds no examples"),
    ('{"text": "fine", "label": "positive"}\n{oops\n', ":2: line is not valid JSON"),
    ('{"text": "fine", "label": "ecstatic"}\n', "unknown label 'ecstatic'"),
    ('{"label": "positive"}\n', "missing or empty 'text'"),
])
def test_eval_bad_files_are_one_line_errors(tiny_artifact, tmp_path, content, expect):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    r = run_cli("model", "eval", str(tiny_artifact), "--data", str(f))
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert str(f) in r.stderr or "bad.jsonl" in r.stderr


@pytest.mark.train
def test_build_bad_sources_are_one_line_errors(tmp_path):
    not_clf = tmp_path / "encoder"
    not_clf.mkdir()
    (not_clf / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    cases = [
        (["--from", str(tmp_path / "nope")], "does not exist"),
        (["--from", str(tmp_path)], "no config.json"),
        (["--from", str(not_clf)], "not a sequence classifier"),
        (["--preset", "gigantic"], "unknown preset 'gigantic'"),
        ([], "exactly one of --preset"),
    ]
    for args, expect in cases:
        r = run_cli("model", "build", "--out", str(tmp_path / "out"), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert expect in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.train
def test_build_from_hf_dir_with_wrong_label_count(tmp_path):
    from pipeline.model.presets import PRESETS, build_tiny_hf

    hf = tmp_path / "hf"
    build_tiny_hf(hf, PRESETS["tiny"])
    r = run_cli("model", "build", "--from", str(hf), "--labels", "a,b", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "--labels names 2 labels but the model's head has 3 outputs" in r.stderr


@pytest.mark.train
def test_build_from_hf_dir_and_gate_refuses_broken_variant(tmp_path, self_labelled):
    from pipeline.model.presets import PRESETS, build_tiny_hf

    hf = tmp_path / "my-clf"
    build_tiny_hf(hf, PRESETS["tiny"])
    out = tmp_path / "out"
    ok = run_cli("model", "build", "--from", str(hf), "--out", str(out), "--eval", str(self_labelled),
                 "--variants", "fp32,int8", "--no-bench", "--json")
    assert ok.returncode == 0, ok.stderr
    m = json.loads(ok.stdout)
    assert m["name"] == "my-clf" and m["version"] == 1 and m["gate"]["passed"] is True
    assert m["variants"]["fp32"]["quality"]["accuracy"] == 1.0

    bad = run_cli("model", "build", "--from", str(hf), "--out", str(out), "--eval", str(self_labelled),
                  "--variants", "fp32,int8", "--no-bench", "--break-variant", "int8")
    assert bad.returncode == 3, bad.stderr
    assert "quality gate refused int8" in bad.stderr and "Traceback" not in bad.stderr
    versions = sorted(p.name for p in (out / "my-clf").iterdir())
    assert "2" not in versions, "a refused build must not be published"
    rejected = [p for p in (out / "my-clf").iterdir() if p.name.startswith("rejected-")]
    assert len(rejected) == 1
    _, rm = load_manifest(rejected[0])
    assert rm.gate["refused"] == ["int8"]
    assert rm.variants["int8"].quality["drop_points_vs_fp32"] > 1.0


def test_info_prints_manifest_and_rejects_corruption(artifact_copy):
    r = run_cli("model", "info", str(artifact_copy))
    assert r.returncode == 0 and "tiny@" in r.stdout and "int8" in r.stdout
    with open(artifact_copy / "model.fp32.onnx", "ab") as f:
        f.write(b"junk")
    r = run_cli("model", "info", str(artifact_copy))
    assert r.returncode == 2 and "model.fp32.onnx' is corrupt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.train
def test_build_from_a_causal_lm_directory_makes_a_generator(tmp_path):
    """`--from` a Hugging Face causal LM (here a tiny local Llama) builds a generator artifact, gate included."""
    from pipeline.model.generative import build_tiny_llama

    hf = tmp_path / "my-llm"
    build_tiny_llama(hf)
    out = tmp_path / "out"
    r = run_cli("model", "build", "--from", str(hf), "--out", str(out), "--variants", "fp32", "--no-bench", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["name"] == "my-llm" and m["task"] == "text-generation"
    assert m["variants"]["fp32"]["quality"]["exact_match_16"] == 1.0, "ONNX FP32 decodes what PyTorch FP32 decodes"
    assert "{user}" in m["generation"]["prompt_format"] and m["generation"]["default_cpu_variant"] == "fp32"
    info = run_cli("model", "info", str(out / "my-llm"))
    assert info.returncode == 0 and "generation gate" in info.stdout and "exact@16" in info.stdout


def test_generator_build_errors_are_one_line(tmp_path):
    r = run_cli("model", "build", "--preset", "tiny-generator", "--variants", "int3", "--out", str(tmp_path))
    assert r.returncode == 2 and "unknown generator variant 'int3'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.train
def test_parity_gate_acts_without_a_labelled_set(tmp_path):
    """No --eval: a variant whose labels disagree with FP32's is still refused (it used to be published, exit 0)."""
    r = run_cli("model", "build", "--preset", "tiny", "--out", str(tmp_path), "--variants", "fp32,int8", "--no-bench",
                "--break-variant", "int8")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "parity gate refused int8" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.name.isdigit()], "nothing published"
    _, rm = load_manifest(next((tmp_path / "tiny").glob("rejected-*")))
    assert rm.gate["parity_refused"]["int8"]["agreement"] < 0.95 and rm.gate["eval"] is None


def test_unvalidated_variants_are_never_chosen_automatically(artifact_copy):
    from pipeline.engine import choose
    from pipeline.errors import ModelError

    path = artifact_copy / "manifest.json"
    doc = json.loads(path.read_text())
    assert all(v["validated"] for v in doc["variants"].values()), "the build validated every variant it could run"
    doc["variants"]["int8"]["validated"] = False
    path.write_text(json.dumps(doc))
    _, m = load_manifest(artifact_copy)
    assert choose(m, None, "cpu")[0] == "fp32", "int8 was not validated: the next validated variant"
    assert choose(m, "int8", "cpu")[0] == "int8", "asked for by name, it runs"
    doc["variants"]["fp32"]["validated"] = False
    path.write_text(json.dumps(doc))
    _, m = load_manifest(artifact_copy)
    with pytest.raises(ModelError) as exc:
        choose(m, None, "cpu")
    assert "no validated variant" in str(exc.value) and "--variant" in exc.value.hint


@pytest.mark.train
def test_distillation_lowers_the_students_kl_to_the_teacher(tmp_path):
    """A layer-dropped student, distilled from a teacher's soft labels, ends far closer to the teacher."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline.model import presets as P
    from pipeline.model.build import Reporter, build

    # A teacher with decided opinions: the tiny BERT with its head scaled up (random-init logits are near-uniform).
    hf = tmp_path / "teacher-hf"
    P.build_tiny_hf(hf, P.get("tiny"), seed=0)
    t = AutoModelForSequenceClassification.from_pretrained(str(hf))
    with torch.no_grad():
        t.classifier.weight.mul_(400.0)
    t.save_pretrained(str(hf))
    teacher = build(out=tmp_path / "t", from_dir=hf, name="teacher", variants=("fp32", "int8"), bench=False,
                    reporter=Reporter(quiet=True), max_logit_diff=100.0).path
    _, val, _ = P.get("tiny").examples()
    fixed = [e.text for e in val[:300]]
    eng = OnnxEngine(teacher, variant="fp32", provider="cpu", warmup=False)
    t_logits = eng.logits(fixed)
    eng.close()

    def kl(logits) -> float:
        return float(torch.nn.functional.kl_div(torch.log_softmax(torch.as_tensor(logits), -1),
                                                torch.log_softmax(torch.as_tensor(t_logits), -1),
                                                log_target=True, reduction="batchmean"))

    from pipeline.model.distil import kl_to_teacher, make_student

    base = tmp_path / "base"
    P.build_tiny_hf(base, P.get("tiny"), seed=1)
    make_student(base, (0,), eng.labels, tmp_path / "init")
    before = kl_to_teacher(tmp_path / "init", fixed, t_logits)
    r = run_cli("model", "distil", "--teacher", str(teacher), "--data-preset", "tiny", "--student", "tiny-l1",
                "--out", str(tmp_path / "out"), "--max-examples", "2000", "--unlabelled", "300", "--epochs", "3", "--lr", "3e-3",
                "--temperature", "1", "--alpha", "1", "--no-bench", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["training"]["teacher"] == "teacher@1" and m["training"]["pruning"]["kept_layers"] == [0]
    assert m["training"]["distillation"]["unlabelled_texts"] == 300 and m["gate"]["passed"]
    assert set(m["variants"]) == {"fp32", "int8"} and m["variants"]["int8"]["quality"] is not None
    student = OnnxEngine(tmp_path / "out" / m["name"], variant="fp32", provider="cpu", warmup=False)
    after = kl(student.logits(fixed))
    student.close()
    assert before > 0.1 and after < before / 2, f"KL to the teacher {before:.4f} → {after:.4f}"

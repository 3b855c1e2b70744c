"""The naive baseline of the load test: the consumer most people write first.

A plain aiokafka loop that calls a ``transformers`` text-classification pipeline (PyTorch FP32) on one
message at a time and waits for each label's ack before the next (auto-commit, no batching, no cache).
Same architecture as the served model (MiniLM-L6 + a 3-label head), so the comparison is of serving, not
of models. Its clients come from ``pipeline.kafka`` with aiokafka's plain defaults restored, so only the
connection settings are shared. Needs the train extra. ``streamlabel bench`` starts it as

    python -m producers.bench.naive BOOTSTRAP INPUT OUTPUT DLQ GROUP
"""

from __future__ import annotations

import asyncio
import os
import sys

import orjson


def make_classifier():
    """``transformers.pipeline`` text classification on MiniLM-L6 + a 3-label head, PyTorch FP32 on CPU."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    from pipeline.model.presets import minilm_dir

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    d = str(minilm_dir())
    return pipeline("text-classification", model=AutoModelForSequenceClassification.from_pretrained(d, num_labels=3),
                    tokenizer=AutoTokenizer.from_pretrained(d), device=-1)


async def main(bootstrap: str, topic_in: str, topic_out: str, group: str) -> None:
    from pipeline import kafka as K

    clf = make_classifier()
    # aiokafka's defaults, as a first consumer would have them: auto-commit, read_uncommitted, plain acks=all.
    consumer = K.consumer(bootstrap, topic_in, group_id=group, enable_auto_commit=True,
                          isolation_level="read_uncommitted", auto_offset_reset="earliest")
    producer = K.producer(bootstrap, enable_idempotence=False, compression_type=None, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        async for msg in consumer:
            doc = orjson.loads(msg.value)
            res = clf(doc["text"], truncation=True)[0]
            out = {"id": doc.get("id"), "label": res["label"], "score": res["score"]}
            await producer.send_and_wait(topic_out, orjson.dumps(out), key=msg.key)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    b, i, o, _dlq, g = sys.argv[1:6]
    asyncio.run(main(b, i, o, g))

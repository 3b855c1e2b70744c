"""Check a generator variant where it runs (e.g. fp16 on a GPU machine, which has no Kafka and maybe no torch):
the generation gate against the PyTorch FP32 tokens stored in the manifest at build time, then the
scheduler's closed-loop capacity at several decode batch sizes (32 new tokens per answer, every answer the
same length). Prints JSON.

    python -m producers.bench.generator_check models/reply-smollm2 --variant fp16 --provider cuda --rows 32,64,256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from pipeline.generation import GenerationScheduler, GenerativeModel, template_from
from pipeline.model.generative import gate_figures, gate_prompt_ids


async def capacity(m: GenerativeModel, texts: list[str], rows: int, max_new: int = 32, *, template: str = "reply",
                   prefill_tokens: int = 512, max_tokens: int = 8192) -> dict:
    """Closed loop, no Kafka: ``2 × rows`` distinct prompts through the scheduler at once (after 8 to warm up);
    answers/s, tokens/s, the mean decode step and the median TTFT. Every answer is ``max_new`` tokens long."""
    s = GenerationScheduler(m, max_batch=rows, max_new_tokens=max_new, ignore_eos=True, prefill_tokens=prefill_tokens,
                            max_tokens=max_tokens)
    tpl = template_from(template)
    s.add_prefix(m.prefix_of(tpl.render("")[0]))
    s.start()
    try:
        prompts = [m.render(*tpl.render(t)) for t in texts]
        await s.generate(prompts[:8])  # warm-up
        rest = prompts[8:]
        if len(rest) >= 2 * rows:
            batch = rest[: 2 * rows]
        else:  # more prompts than texts: numbered copies, so none is answered by coalescing
            batch = [p + f" (#{i})" for i, p in enumerate((rest * (1 + 2 * rows // len(rest)))[: 2 * rows])]
        t = time.perf_counter()
        res = await s.generate(batch)
        dt = time.perf_counter() - t
        ttft = sorted(r.timings.ttft for r in res)
        return {"rows": rows, "answers_per_s": round(len(res) / dt, 2),
                "tokens_per_s": round(sum(r.tokens for r in res) / dt, 1), "decode_steps": s.batches,
                "decode_step_ms": round(s.call_seconds * 1000, 2), "ttft_p50_ms": round(ttft[len(ttft) // 2] * 1000, 1)}
    finally:
        await s.close()


async def burst(m: GenerativeModel, texts: list[str], n: int, *, rows: int, max_new: int = 32, template: str = "reply",
                prefill_tokens: int = 512, max_tokens: int = 8192, **kw) -> dict:
    """``n`` distinct prompts arriving together at an idle scheduler (after 8 to warm up): time to first token
    p50/p99 (from arrival) and the time until every prompt had its first token."""
    s = GenerationScheduler(m, max_batch=rows, max_new_tokens=max_new, ignore_eos=True, prefill_tokens=prefill_tokens,
                            max_tokens=max_tokens, **kw)
    tpl = template_from(template)
    s.add_prefix(m.prefix_of(tpl.render("")[0]))
    s.start()
    try:
        prompts = [m.render(*tpl.render(t)) for t in texts]
        await s.generate(prompts[:8])
        batch = [p + f" (#{i})" for i, p in enumerate((prompts * (1 + n // len(prompts)))[:n])]
        t = time.perf_counter()
        res = await s.generate(batch)
        dt = time.perf_counter() - t
        ttft = sorted(r.timings.ttft for r in res)
        pct = lambda q: round(ttft[min(len(ttft) - 1, int(q * len(ttft)))] * 1000, 1)  # noqa: E731
        return {"burst": n, "rows": rows, "prefill_tokens": prefill_tokens, "ttft_p50_ms": pct(0.5),
                "ttft_p99_ms": pct(0.99), "ttft_max_ms": round(ttft[-1] * 1000, 1), "seconds": round(dt, 2),
                "tokens_per_s": round(sum(r.tokens for r in res) / dt, 1)}
    finally:
        await s.close()


def texts(n: int = 256) -> list[str]:
    from producers.synthetic import Generator

    return [ev.text for _, ev in zip(range(n), Generator("mixed", seed=3))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--variant")
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--rows", default="32,64,128,256")
    ap.add_argument("--burst", type=int, default=0, help="also: TTFT when this many prompts arrive together")
    ap.add_argument("--burst-rows", type=int, default=0, help="decode rows for --burst (default: the burst)")
    ap.add_argument("--burst-only", action="store_true", help="only the burst (no gate, no capacity)")
    ap.add_argument("--prefill-tokens", default="",
                    help="the burst's prefill budget per step (generate.prefill_tokens), comma-separated for several "
                         "bursts in one run (default: 512 on CPU, 4096 on a GPU)")
    a = ap.parse_args()
    m = GenerativeModel(a.artifact, variant=a.variant, provider=a.provider)
    report: dict = {"model": m.model_id, "variant": m.variant, "provider": m.session.get_providers()[0]}
    if a.burst:
        rows = a.burst_rows or a.burst
        cpu = m.providers[0] == "CPUExecutionProvider"
        budgets = [int(x) for x in a.prefill_tokens.split(",") if x.strip()] or [512 if cpu else 4096]
        bursts = [asyncio.run(burst(m, texts(), a.burst, rows=rows, prefill_tokens=b,
                                    max_tokens=8192 if cpu else rows * 1024)) for b in budgets]
        report["burst"] = bursts[0]
        if len(bursts) > 1:
            report["bursts"] = bursts
        if a.burst_only:
            print(json.dumps(report, indent=2))
            return
    ref = m.manifest.gate.get("reference_tokens")
    if ref:
        hyp = m.greedy(gate_prompt_ids(m), 16)
        report["gate"] = gate_figures(ref, hyp)
        report["samples"] = [m.decode_text(h) for h in hyp[:5]]
    # GPU-sized admission: a whole burst prefilled at once, a KV budget of 1,024 positions per row.
    report["capacity"] = [asyncio.run(capacity(m, texts(), int(r), prefill_tokens=4096, max_tokens=int(r) * 1024))
                          for r in a.rows.split(",")]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

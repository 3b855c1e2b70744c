"""Stress the exactly-once broker-kill scenario: run it N times and report duplicates per run.

    make stress-eos N=30          # or: python -m tests.faults.stress_eos --runs 30

Each run is a fresh pytest process running ``test_broker_kill9_and_restart[exactly_once]`` (its own broker,
killed with SIGKILL mid-stream and restarted on the same data). The scenario appends its report to a JSON-lines
file; this prints one line per run (lost, duplicates, recovery) and a summary. Not part of ``make test``: 30 runs
take about 25 minutes on 2 cores. Exit code 1 if any run lost or duplicated a record or failed otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEST = "tests/faults/test_faults.py::test_broker_kill9_and_restart[exactly_once]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", help="write every run's report here (JSON lines)")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    out = Path(args.json) if args.json else Path(tempfile.mkstemp(prefix="stress-eos-", suffix=".jsonl")[1])
    out.write_text("")
    t0 = time.monotonic()
    rows = []
    for i in range(1, args.runs + 1):
        before = len(out.read_text().splitlines())
        started = time.monotonic()
        env = {**os.environ, "STREAMLABEL_FAULT_REPORT": str(out)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", TEST],
                              cwd=root, env=env, capture_output=True, text=True)
        lines = out.read_text().splitlines()[before:]
        rep = json.loads(lines[-1]) if lines else None
        took = time.monotonic() - started
        if rep is None:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            rows.append({"run": i, "ok": False, "duplicated": None, "lost": None, "error": " | ".join(tail)})
            print(f"run {i:3d}/{args.runs}: no report (pytest exit {proc.returncode}): {rows[-1]['error'][:300]}",
                  flush=True)
            continue
        ok = proc.returncode == 0 and rep["duplicated"] == 0 and rep["lost"] == 0
        rows.append({"run": i, "ok": ok, "duplicated": rep["duplicated"], "lost": rep["lost"],
                     "recovery_s": rep["recovery_s"], "seconds": round(took, 1)})
        print(f"run {i:3d}/{args.runs}: duplicates {rep['duplicated']} lost {rep['lost']} "
              f"order {rep['order_violations']} recovery {rep['recovery_s']} s ({took:.0f} s)"
              + ("" if proc.returncode == 0 else f"  pytest exit {proc.returncode}"), flush=True)
    wall = time.monotonic() - t0
    clean = sum(1 for r in rows if r["ok"])
    dups = [r["duplicated"] for r in rows if r["duplicated"]]
    print(f"\nexactly-once broker kill -9: duplicates 0 in {sum(1 for r in rows if r['duplicated'] == 0)} of "
          f"{len(rows)} runs; clean (no loss, no duplicate, test passed) {clean} of {len(rows)}; "
          f"duplicates per failing run {dups or '-'}; wall time {wall / 60:.1f} min; reports in {out}")
    return 0 if clean == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Write requirements-serve.lock: the pins of requirements.lock that serving needs (the dependency closure of
pyproject's [project] dependencies, read from the installed venv's metadata). No torch, no CUDA wheels: the
CPU image installs only this. Run by `make lock`."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def main() -> int:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line:
            n, v = line.strip().split("==", 1)
            pins[norm(n)] = v
    stack = []
    for d in deps:  # "aiokafka[lz4,zstd]>=0.11": the name, with the extras it asks for
        m = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", d)
        stack.append((norm(m.group(1)), set((m.group(3) or "").split(",")) - {""}))
    seen: set[str] = set()
    while stack:
        name, extras = stack.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional extra nobody installed
        seen.add(name)
        for req in dist.requires or []:
            marker = req.split(";", 1)[1] if ";" in req else ""
            if "extra ==" in marker and not any(f'extra == "{e}"' in marker for e in extras):
                continue
            if any(x in marker for x in ('python_version < "3.11"', 'sys_platform == "win32"',
                                         'platform_system == "Windows"')):
                continue
            stack.append((norm(re.split(r"[ ;<>=!~\[(]", req.strip())[0]), set()))
    lines = [f"{n}=={pins[n]}" for n in sorted(seen) if n in pins]
    (ROOT / "requirements-serve.lock").write_text(
        "# Serving only (streamlabel run, demo, replay, produce, top with a built model): no torch, no CUDA wheels.\n"
        "# Written by `make lock` (deploy/serve_lock.py) from requirements.lock.\n" + "\n".join(lines) + "\n")
    print(f"requirements-serve.lock: {len(lines)} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

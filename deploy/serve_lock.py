"""Write the torch-free locks, each the dependency closure (read from the installed venv's metadata) of some of
pyproject's dependency lists, pinned as in requirements.lock. Run by `make lock`.

* ``requirements-serve.lock``: [project] dependencies: what serving needs; the CPU image installs only this.
* ``requirements-serve-test.lock``: those + the ``test`` and ``bench`` extras: ``make test-serve`` runs the
  test suite's serving part in a venv without torch or any CUDA wheel.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def closure(deps: list[str], pins: dict[str, str]) -> list[str]:
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
    return [f"{n}=={pins[n]}" for n in sorted(seen) if n in pins]


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line:
            n, v = line.strip().split("==", 1)
            pins[norm(n)] = v
    extras = project["optional-dependencies"]
    for name, deps, what in (
        ("requirements-serve.lock", project["dependencies"],
         "Serving only (streamlabel run, demo, replay, produce, top with a built model)"),
        ("requirements-serve-test.lock", project["dependencies"] + extras["test"] + extras["bench"],
         "Serving + the test and bench extras: `make test-serve`, the serving tests without torch"),
    ):
        lines = closure(deps, pins)
        bad = [ln for ln in lines if ln.split("==")[0] in ("torch", "triton") or ln.startswith("nvidia-")]
        if bad:
            print(f"{name}: {bad} would pull torch / CUDA wheels; not written", file=sys.stderr)
            return 1
        (ROOT / name).write_text(f"# {what}: no torch, no CUDA wheels.\n"
                                 "# Written by `make lock` (deploy/serve_lock.py) from requirements.lock.\n"
                                 + "\n".join(lines) + "\n")
        print(f"{name}: {len(lines)} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

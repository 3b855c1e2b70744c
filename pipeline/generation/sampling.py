"""Choosing the next token (greedy or seeded sampling) and deciding when a sequence is finished."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def prompt_seed(prompt: str) -> int:
    """A sampling seed from the prompt that every process computes alike (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "big")


def rng_for(sampling: Sampling, prompt: str) -> np.random.Generator | None:
    """Each prompt's own generator: the same prompt draws the same tokens in every process and restart."""
    return np.random.default_rng([sampling.seed, prompt_seed(prompt)]) if sampling.do_sample else None


def pick(logits: np.ndarray, rngs: Sequence[np.random.Generator | None], sampling: Sampling) -> list[int]:
    """The next token of each row: argmax, or a draw from the temperature / top-p distribution."""
    if not sampling.do_sample:
        return logits.argmax(axis=1).tolist()
    out = []
    temp = max(1e-4, sampling.temperature)
    for row, rng in zip(logits.astype(np.float64), rngs):
        z = row / temp
        p = np.exp(z - z.max())
        p /= p.sum()
        if sampling.top_p < 1.0:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            cut = order[: int(np.searchsorted(cum, sampling.top_p)) + 1]
            q = np.zeros_like(p)
            q[cut] = p[cut]
            p = q / q.sum()
        out.append(int(rng.choice(len(p), p=p)))
    return out


class StopCheck:
    """When a sequence ends, and why: ``stop`` (an end-of-sequence token, or a stop string in the decoded text,
    which is cut there), ``length`` (``max_new`` tokens) or ``deadline`` (it keeps what it has)."""

    def __init__(self, eos: frozenset[int], stop: Sequence[str], max_new: int,
                 decode: Callable[[Sequence[int]], str]) -> None:
        self.eos = eos
        self.stop = tuple(s for s in stop if s)
        self.max_new = max_new
        self.decode = decode

    def __call__(self, out: Sequence[int], now: float, deadline: float) -> tuple[str | None, int | None]:
        """(finish reason or None while it goes on, where to cut the text for a stop string)."""
        if out[-1] in self.eos:
            return "stop", None
        if self.stop:
            text = self.decode(out)
            hits = [text.find(x) for x in self.stop if x in text]
            if hits:
                return "stop", min(hits)
        if len(out) >= self.max_new:
            return "length", None
        if now >= deadline:
            return "deadline", None
        return None, None

"""Seeded synthetic text streams: customer-service messages and financial news headlines.

Each event carries its ground-truth sentiment (the generator picks it before writing the text), an entity
(a product or a ticker), and a realistic length spread. ``duplicate_ratio`` re-sends earlier texts
(retweets, copy-pasted complaints); ``burst`` makes one entity turn negative for a while.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

TICKERS = ["ACME", "GLOBX", "INITECH", "UMBRL", "HOOLI", "STARK", "WAYNE", "TYRELL", "SOYL", "VANDL",
           "NAKATOMI", "CYBRD", "MASSIVE", "OSCORP", "GRINGOTT"]
PRODUCTS = ["checkout", "mobile app", "delivery", "refund", "subscription", "login", "invoice", "support chat",
            "order #{n}", "card payment", "account settings", "shipping label"]

NEWS = {
    "positive": [
        "{t} shares jump after earnings beat estimates",
        "{t} raises full-year guidance on strong demand",
        "{t} upgraded to buy at {bank}, price target lifted to ${p}",
        "{t} posts record quarterly revenue of ${p} million",
        "{t} wins multi-year contract worth ${p} million",
        "Analysts cheer {t} margin expansion as costs fall",
        "{t} stock rallies {pct}% on upbeat outlook",
    ],
    "negative": [
        "{t} shares slump after profit warning",
        "{t} cuts guidance as demand weakens",
        "{t} downgraded to sell at {bank} on weak outlook",
        "{t} misses revenue estimates, stock falls {pct}%",
        "{t} faces regulatory probe over accounting practices",
        "{t} announces layoffs of {p} staff amid losses",
        "{t} plunges after CEO resigns unexpectedly",
    ],
    "neutral": [
        "{t} to report quarterly results on Thursday",
        "{t} schedules annual shareholder meeting for May",
        "{t} appoints new chief financial officer",
        "{t} completes previously announced share buyback",
        "{t} files quarterly report with regulators",
        "{t} to present at {bank} technology conference",
    ],
}
SUPPORT = {
    "positive": [
        "Thanks so much, the {x} issue is fixed and everything works now!",
        "Great service today, your agent sorted my {x} in minutes.",
        "Love the new {x}, really smooth experience.",
        "Refund received, thank you for the quick help.",
    ],
    "negative": [
        "My {x} has been broken for three days and nobody answers. This is unacceptable.",
        "Worst experience ever, the {x} failed again and I was charged twice.",
        "I am really frustrated, still waiting on my {x} after two weeks.",
        "Your {x} keeps crashing, I want to cancel my account.",
        "Terrible support, I was disconnected from the chat twice about my {x}.",
    ],
    "neutral": [
        "How do I update the {x} on my account?",
        "Can you tell me when the {x} will be available?",
        "I changed my address, does that affect my {x}?",
        "What are your opening hours for {x} questions?",
    ],
}
BANKS = ["Goldman", "Morgan Stanley", "JPMorgan", "Barclays", "UBS", "Citi", "Jefferies"]
TAILS = ["", "", "", " Details to follow.", " More in our live coverage.", " Shares moved in pre-market trading.",
         " The company declined to comment further on the matter.",
         " Investors will watch the next quarter closely, according to people familiar with the matter."]


@dataclass(frozen=True)
class Synthetic:
    id: str
    text: str
    source: str
    entity: str
    label: str  # ground truth sentiment


class Generator:
    """``profile``: support | news | mixed. ``mix``: share of negative/neutral/positive."""

    def __init__(self, profile: str = "mixed", *, seed: int = 0, duplicate_ratio: float = 0.0,
                 mix: tuple[float, float, float] = (0.3, 0.45, 0.25), id_prefix: str = "syn") -> None:
        if profile not in ("support", "news", "mixed"):
            raise ValueError(f"unknown profile {profile!r}: support, news or mixed")
        if not 0.0 <= duplicate_ratio < 1.0:
            raise ValueError("duplicate_ratio must be in [0, 1)")
        self.profile = profile
        self.rng = random.Random(seed)
        self.duplicate_ratio = duplicate_ratio
        self.mix = mix
        self.prefix = id_prefix
        self._n = 0
        self._recent: list[Synthetic] = []
        self.burst_entity: str | None = None
        self.burst_negative = 0.0

    def burst(self, entity: str | None, negative_share: float = 0.9) -> None:
        """While set, events about ``entity`` (support or news) are mostly negative."""
        self.burst_entity = entity
        self.burst_negative = negative_share

    def _label(self, entity: str) -> str:
        if self.burst_entity == entity and self.rng.random() < self.burst_negative:
            return "negative"
        return self.rng.choices(("negative", "neutral", "positive"), weights=self.mix)[0]

    def __iter__(self) -> Iterator[Synthetic]:
        return self

    def __next__(self) -> Synthetic:
        self._n += 1
        ev_id = f"{self.prefix}-{self._n}"
        if self._recent and self.rng.random() < self.duplicate_ratio:
            old = self.rng.choice(self._recent)
            return Synthetic(ev_id, old.text, old.source, old.entity, old.label)
        source = self.profile if self.profile != "mixed" else self.rng.choice(("support", "news"))
        r = self.rng
        if source == "news":
            entity = self.burst_entity if self.burst_entity and r.random() < 0.3 else r.choice(TICKERS)
            label = self._label(entity)
            text = r.choice(NEWS[label]).format(t=entity if r.random() < 0.5 else f"${entity}", bank=r.choice(BANKS),
                                                p=r.randint(2, 900), pct=r.randint(2, 25)) + r.choice(TAILS)
        else:
            entity = self.burst_entity if self.burst_entity and r.random() < 0.3 else f"customer-{r.randint(1, 500)}"
            label = self._label(entity)
            x = r.choice(PRODUCTS).format(n=r.randint(10000, 99999))
            text = r.choice(SUPPORT[label]).format(x=x)
            if r.random() < 0.3:
                text += " " + r.choice(SUPPORT[label]).format(x=r.choice(PRODUCTS).format(n=r.randint(10000, 99999)))
        ev = Synthetic(ev_id, text, source, entity, label)
        if self.duplicate_ratio:
            self._recent.append(ev)
            if len(self._recent) > 2000:
                self._recent = self._recent[-1000:]
        return ev

"""Windowed alert rules over the label stream (no Kafka here: ``consumers/alerting.py`` feeds it).

Rules (``[[alerting.rules]]`` in the TOML config):

- ``share``: the share of ``labels`` among one key's events over the last ``window_s`` seconds of event time
  is ≥ ``threshold``, with at least ``min_events`` events (e.g. news on a ticker turns negative);
- ``jump``: that share minus the key's own baseline share (the ``baseline_windows`` windows before) is
  ≥ ``threshold`` (a sudden change against its own normal);
- ``single``: one event with a label in ``labels`` whose score is ≥ ``threshold`` (an abusive message);
- ``count``: at least ``threshold`` events (of ``labels``, or of any label) for a key within the window.

``key`` groups events: ``entity`` (default) or ``source``. Time is event time (``produced_at``); events
older than the newest seen minus ``lateness_s`` are dropped and counted. An incident fires one alert, then
stays open while its condition holds; it resolves (one resolve event) once the condition has been false
for a whole window; a new incident for the same rule and key waits ``cooldown_s`` after a resolve.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from pipeline.errors import ConfigError

KINDS = ("share", "jump", "single", "count")
SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    labels: tuple[str, ...] = ()
    threshold: float = 0.5
    window_s: float = 300.0
    min_events: int = 5
    key: str = "entity"
    baseline_windows: int = 6
    cooldown_s: float = 600.0
    severity: str = "warning"
    sources: tuple[str, ...] = ()  # only events from these sources (empty: all)

    def matches(self, ev: Mapping[str, Any]) -> bool:
        return not self.sources or ev.get("source") in self.sources


def parse_rules(raw: Any, where: str = "config") -> tuple[Rule, ...]:
    """Rules from the TOML ``[[alerting.rules]]`` tables; errors name ``alerting.rules[i].key``."""
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ConfigError("'alerting.rules' must be a list of tables ([[alerting.rules]])", where=where)
    names = set()
    out = []
    fields = Rule.__dataclass_fields__
    for i, r in enumerate(raw):
        at = f"alerting.rules[{i}]"
        if not isinstance(r, Mapping):
            raise ConfigError(f"'{at}' must be a table", where=where)
        unknown = set(r) - set(fields)
        if unknown:
            raise ConfigError(f"unknown key '{at}.{sorted(unknown)[0]}'", where=where,
                              hint=f"rule keys are: {', '.join(fields)}")
        if "name" not in r or "kind" not in r:
            raise ConfigError(f"'{at}' needs a name and a kind", where=where)
        kw = dict(r)
        for k in ("labels", "sources"):
            if k in kw:
                v = kw[k]
                kw[k] = (v,) if isinstance(v, str) else tuple(v)
        try:
            rule = Rule(**kw)
        except TypeError as exc:
            raise ConfigError(f"'{at}': {exc}", where=where) from None
        if rule.kind not in KINDS:
            raise ConfigError(f"'{at}.kind' is {rule.kind!r}; allowed: {', '.join(KINDS)}", where=where)
        if rule.key not in ("entity", "source"):
            raise ConfigError(f"'{at}.key' must be entity or source", where=where)
        if rule.severity not in SEVERITIES:
            raise ConfigError(f"'{at}.severity' must be one of {', '.join(SEVERITIES)}", where=where)
        if rule.kind in ("share", "jump", "single") and not rule.labels:
            raise ConfigError(f"'{at}.labels' is needed for a {rule.kind} rule", where=where)
        if rule.window_s <= 0 or rule.min_events < 1:
            raise ConfigError(f"'{at}': window_s must be > 0 and min_events ≥ 1", where=where)
        if rule.name in names:
            raise ConfigError(f"'{at}.name' {rule.name!r} is used twice", where=where)
        names.add(rule.name)
        out.append(rule)
    return tuple(out)


@dataclass
class Incident:
    started_at: int  # event time (ms) of the first event of the window that fired
    alert_id: str
    samples: list[str]
    value: float
    last_true: int  # event time (ms) the condition last held
    first_event: int
    last_event: int


@dataclass
class KeyState:
    events: deque = field(default_factory=deque)  # (ts_ms, id, matched: bool), sorted by ts
    incident: Incident | None = None
    resolved_at: int | None = None


def _finite(v) -> bool:
    return type(v) in (int, float) and v == v and abs(v) != float("inf")


def alert_event(rule: Rule, key: str, status: str, inc: Incident, now_ms: int) -> dict:
    """The alert topic's value (schema: docs/wire-format.md)."""
    return {
        "alert_id": inc.alert_id, "status": status, "rule": rule.name, "kind": rule.kind, "key": rule.key,
        "entity": key, "severity": rule.severity, "value": round(inc.value, 4), "threshold": rule.threshold,
        "window_s": rule.window_s, "labels": list(rule.labels), "sample_ids": inc.samples[:5],
        "first_event_at": inc.first_event, "last_event_at": inc.last_event, "at": now_ms,
    }


class AlertEngine:
    """State for the keys of one input partition. ``observe`` then ``advance``; both return alert events."""

    def __init__(self, rules: Iterable[Rule], lateness_s: float = 30.0) -> None:
        self.rules = tuple(rules)
        self.lateness_ms = int(lateness_s * 1000)
        self.state: dict[tuple[str, str], KeyState] = {}
        self.watermark = 0  # newest event time seen (ms)
        self.late = 0
        self.invalid = 0  # events whose fields are not what a label event holds (skipped)

    # -- input ---------------------------------------------------------------------------------------
    def observe(self, ev: Mapping[str, Any]) -> list[dict]:
        """One label event. Its fields are untrusted (the label topic may have other producers): one that is
        not a label event's (a time that is not epoch ms, a score that is not a number) is skipped, counted."""
        ts, score = ev.get("produced_at") or 0, ev.get("score", 0.0)
        if not (_finite(ts) and 0 <= ts < 1e14 and _finite(score)):
            self.invalid += 1
            return []
        ts = int(ts)
        if ts < self.watermark - self.lateness_ms:
            self.late += 1
            return []
        self.watermark = max(self.watermark, ts)
        out: list[dict] = []
        for rule in self.rules:
            if not rule.matches(ev):
                continue
            key = ev.get(rule.key)
            if not key:
                continue
            st = self.state.setdefault((rule.name, str(key)), KeyState())
            matched = ev.get("label") in rule.labels if rule.labels else True
            if rule.kind == "single":
                matched = matched and score >= rule.threshold
            item = (ts, str(ev.get("id")), matched)
            if not st.events or st.events[-1][0] <= ts:
                st.events.append(item)
            else:  # out of order within the lateness bound: keep the window sorted by event time
                lst = list(st.events)
                bisect.insort(lst, item, key=lambda x: x[0])
                st.events = deque(lst)
            out += self._evaluate(rule, str(key), st, ts)
        return out

    def advance(self) -> list[dict]:
        """Re-evaluate open incidents at the watermark (keys that went quiet resolve here)."""
        out: list[dict] = []
        by_name = {r.name: r for r in self.rules}
        for (name, key), st in list(self.state.items()):
            rule = by_name.get(name)
            if rule is None:
                continue
            if st.incident is not None:
                out += self._evaluate(rule, key, st, self.watermark)
            self._evict(rule, st, self.watermark)
            if not st.events and st.incident is None and (
                    st.resolved_at is None or self.watermark - st.resolved_at > rule.cooldown_s * 1000):
                del self.state[(name, key)]  # forget idle keys: memory stays bounded by active keys
        return out

    # -- evaluation ----------------------------------------------------------------------------------
    def _horizon(self, rule: Rule) -> int:
        return int(rule.window_s * 1000) * ((rule.baseline_windows + 1) if rule.kind == "jump" else 1)

    def _evict(self, rule: Rule, st: KeyState, now: int) -> None:
        cutoff = now - self._horizon(rule) - self.lateness_ms
        while st.events and st.events[0][0] < cutoff:
            st.events.popleft()

    def _measure(self, rule: Rule, st: KeyState, now: int) -> tuple[bool, float, list[str], int, int]:
        w = int(rule.window_s * 1000)
        cur = [e for e in st.events if now - w < e[0] <= now]
        n = len(cur)
        hits = [e for e in cur if e[2]]
        first = cur[0][0] if cur else now
        last = cur[-1][0] if cur else now
        samples = [e[1] for e in hits][-5:]
        if rule.kind == "single":
            return bool(hits), float(len(hits)), samples, first, last
        if rule.kind == "count":
            k = len(hits)
            return k >= rule.threshold, float(k), samples, first, last
        share = len(hits) / n if n else 0.0
        if rule.kind == "share":
            return n >= rule.min_events and share >= rule.threshold, share, samples, first, last
        base = [e for e in st.events if now - w * (rule.baseline_windows + 1) < e[0] <= now - w]
        if len(base) < rule.min_events:
            return False, 0.0, samples, first, last  # no baseline yet: a jump needs a normal to jump from
        jump = share - sum(1 for e in base if e[2]) / len(base)
        return n >= rule.min_events and jump >= rule.threshold, jump, samples, first, last

    def _evaluate(self, rule: Rule, key: str, st: KeyState, now: int) -> list[dict]:
        self._evict(rule, st, now)
        ok, value, samples, first, last = self._measure(rule, st, now)
        inc = st.incident
        if ok:
            if inc is None:
                if st.resolved_at is not None and now - st.resolved_at < rule.cooldown_s * 1000:
                    return []
                start = next((e[0] for e in st.events if e[2]), first)
                inc = st.incident = Incident(started_at=start, alert_id=f"{rule.name}:{key}:{start}",
                                             samples=samples, value=value, last_true=now, first_event=first,
                                             last_event=last)
                return [alert_event(rule, key, "firing", inc, now)]
            inc.last_true, inc.value, inc.last_event = now, max(inc.value, value), last
            inc.samples = (inc.samples + [s for s in samples if s not in inc.samples])[-5:]
            return []
        if inc is not None and now - inc.last_true >= rule.window_s * 1000:
            st.incident = None
            st.resolved_at = now
            return [alert_event(rule, key, "resolved", inc, now)]
        return []

    # -- persistence ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "watermark": self.watermark, "late": self.late,
            "keys": [{"rule": r, "key": k, "events": [list(e) for e in st.events], "resolved_at": st.resolved_at,
                      "incident": asdict(st.incident) if st.incident else None}
                     for (r, k), st in self.state.items()],
        }

    def restore(self, snap: Mapping[str, Any]) -> None:
        """State saved by ``snapshot``; raises ``ValueError`` (and keeps the engine empty) if it is not that."""
        try:
            watermark, late = int(snap.get("watermark", 0)), int(snap.get("late", 0))
            state = {}
            for item in snap.get("keys", []):
                inc = item.get("incident")
                st = KeyState(events=deque((int(t), str(i), bool(m)) for t, i, m in item["events"]),
                              resolved_at=None if item.get("resolved_at") is None else int(item["resolved_at"]),
                              incident=Incident(**inc) if inc else None)
                state[(str(item["rule"]), str(item["key"]))] = st
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"not an alerting state snapshot: {type(exc).__name__}: {str(exc)[:120]}") from None
        self.watermark, self.late, self.state = watermark, late, state

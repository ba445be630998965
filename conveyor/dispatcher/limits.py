"""Rate and concurrency limits, per key, across the whole cluster. Pure: time comes in as `now`.

A task names keys (`options(limits=["stripe"])`); the dispatcher declares what each key allows
(`--limit 'stripe=100/s,burst=20'`, `--limit 'db=concurrency:4'`, or `set_limit` at run time). A job
under limit keys waits in the dispatcher, never in a worker; it starts only when every one of its keys
allows it, and only into a free slot (never prefetched), so that assignment is start:

- a **rate** key (GCRA: one "theoretical arrival time" per key, equivalent to a token bucket) lets at
  most `burst + rate * t` attempts start in any window of length t. Its next allowed instant is
  computed, never polled. Buckets start empty (no burst saved across a restart), so the bound holds
  across a `kill -9` of the dispatcher too;
- a **concurrency** key lets at most N attempts run at once; a slot comes back when the attempt ends
  (outcome, hand-back, cancel, or its worker declared lost).

`rate_limit="10/s"` on a task is the key `fn:<module:qualname>` with that rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([smhd])\s*$")
EPSILON_S = 1e-9  # a timer set for the next allowed instant wakes at it, give or take a rounding
KEY_RE = re.compile(r"^[A-Za-z0-9_.:\-/{}]{1,200}$")


@dataclass(frozen=True, slots=True)
class Rule:
    """What a key allows: a rate (starts per second, and a burst) or a concurrency (running at once)."""

    rate_per_s: float | None = None
    burst: int = 1
    concurrency: int | None = None

    def __str__(self) -> str:
        if self.concurrency is not None:
            return f"concurrency:{self.concurrency}"
        assert self.rate_per_s is not None
        per = f"{self.rate_per_s:g}/s" if self.rate_per_s >= 1 else f"{self.rate_per_s * 60:g}/m"
        return per if self.burst == 1 else f"{per},burst={self.burst}"


def parse_rule(text: str) -> Rule:
    """'100/s', '100/s,burst=20', '10/m', '5/10s', 'concurrency:4' -> Rule; ValueError, readably."""
    spec = text.strip().lower()
    if spec.startswith("concurrency:"):
        n = spec.split(":", 1)[1].strip()
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"bad limit {text!r}: concurrency must be a whole number of at least 1")
        return Rule(concurrency=int(n))
    rate, _, rest = spec.partition(",")
    m = _RATE.match(rate)
    if m is None:
        raise ValueError(f"bad limit {text!r}: use e.g. '100/s', '10/m,burst=5' or 'concurrency:4'")
    count, every, unit = float(m.group(1)), m.group(2), m.group(3)
    seconds = (float(every) if every else 1.0) * _UNITS[unit]
    if count <= 0 or seconds <= 0:
        raise ValueError(f"bad limit {text!r}: the rate must be positive")
    burst = 1
    if rest:
        key, _, value = rest.partition("=")
        if key.strip() != "burst" or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad limit {text!r}: after the rate only 'burst=N' (N >= 1) may follow")
        burst = int(value)
    return Rule(rate_per_s=count / seconds, burst=burst)


def parse_declaration(text: str) -> tuple[str, Rule]:
    """'stripe=100/s,burst=20' -> ('stripe', Rule)."""
    key, sep, rule = text.partition("=")
    key = key.strip()
    if not sep or not KEY_RE.match(key):
        raise ValueError(f"bad limit {text!r}: use KEY=RULE, e.g. 'stripe=100/s,burst=20' or 'db=concurrency:4'")
    return key, parse_rule(rule)


@dataclass(slots=True)
class KeyState:
    rule: Rule
    tat: float = 0.0  # GCRA: when the bucket is full again; a start is allowed while now >= tat - tolerance
    running: int = 0  # attempts started under this key and not ended (both kinds count them)
    waiting: int = 0  # jobs waiting for this key (limited)
    starts: int = 0  # attempts started under this key, ever (a metric)

    @property
    def interval(self) -> float:
        assert self.rule.rate_per_s is not None
        return 1.0 / self.rule.rate_per_s

    @property
    def tolerance(self) -> float:
        return (self.rule.burst - 1) * self.interval


class Limits:
    def __init__(self) -> None:
        self.keys: dict[str, KeyState] = {}

    def declare(self, key: str, rule: Rule, now: float) -> None:
        """Set a key's rule (new, or changed at run time: a rate change keeps its spacing, never bursts)."""
        state = self.keys.get(key)
        if state is None:
            state = self.keys[key] = KeyState(rule)
            if rule.rate_per_s is not None:
                state.tat = now + state.tolerance + state.interval  # empty: the first start one interval away
            return
        old_rate = state.rule.rate_per_s
        state.rule = rule
        if rule.rate_per_s is not None and old_rate is None:
            state.tat = now + state.tolerance + state.interval

    def remove(self, key: str) -> bool:
        """Forget a key's rule; jobs that name it wait until it is declared again."""
        return self.keys.pop(key, None) is not None

    def known(self, key: str) -> bool:
        return key in self.keys

    def allows(self, keys: tuple[str, ...], now: float) -> bool:
        for key in keys:
            state = self.keys.get(key)
            if state is None:
                return False
            rule = state.rule
            if rule.concurrency is not None:
                if state.running >= rule.concurrency:
                    return False
            elif now + EPSILON_S < state.tat - state.tolerance:
                return False
        return True

    def next_allowed(self, keys: tuple[str, ...], now: float) -> float | None:
        """When these keys will next allow a start as far as time goes (None: only when a running attempt
        ends, or never: a key with no rule, or one at its concurrency)."""
        at = now
        for key in keys:
            state = self.keys.get(key)
            if state is None:
                return None
            if state.rule.concurrency is not None:
                if state.running >= state.rule.concurrency:
                    return None
            else:
                at = max(at, state.tat - state.tolerance)
        return at

    def start(self, keys: tuple[str, ...], now: float) -> None:
        """An attempt under these keys starts now (the caller checked `allows`)."""
        for key in keys:
            state = self.keys[key]
            state.running += 1
            state.starts += 1
            if state.rule.rate_per_s is not None:
                state.tat = max(state.tat, now) + state.interval

    def adopt(self, keys: tuple[str, ...]) -> None:
        """An attempt already running (a worker that reconnected still runs it) counts toward concurrency."""
        for key in keys:
            state = self.keys.get(key)
            if state is not None:
                state.running += 1

    def end(self, keys: tuple[str, ...]) -> None:
        """An attempt under these keys ended (or its worker was lost): concurrency comes back."""
        for key in keys:
            state = self.keys.get(key)
            if state is not None and state.running > 0:
                state.running -= 1

    def view(self, now: float) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for key, state in sorted(self.keys.items()):
            rule = state.rule
            entry: dict[str, object] = {
                "key": key, "rule": str(rule), "running": state.running, "waiting": state.waiting,
                "starts": state.starts,
            }
            if rule.rate_per_s is not None:
                # Tokens available now, in [0, burst]: how many could start at once right now.
                free = (now - (state.tat - state.tolerance)) / state.interval + 1
                entry["tokens"] = round(max(0.0, min(float(rule.burst), free)), 3) if math.isfinite(free) else 0.0
            out.append(entry)
        return out

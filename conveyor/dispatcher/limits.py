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

A **template** key, `tenant:{tenant_id}`, is declared like any other; the client fills its fields from each
call's arguments and names the filled-in key (`tenant:7`). Each such key gets the template's rule on its own
(its own bucket, its own running count), created on first use as if declared with the template, and dropped
once idle (nothing running, nothing waiting, its bucket full again), so memory follows the live keys. A key
declared by name wins over a template that matches it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from conveyor.protocol.limitkeys import KEY_RE, is_template, template_fields, template_pattern

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([smhd])\s*$")
EPSILON_S = 1e-9  # a timer set for the next allowed instant wakes at it, give or take a rounding
SWEEP_MIN = 256  # filled-in keys held before the first sweep for idle ones (then twice the live count)
VIEW_KEYS_MAX = 100  # filled-in keys listed per template by `conveyor limits` (the count is always given)


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
    check_key(key)
    return key, parse_rule(rule)


def check_key(key: str) -> None:
    """ValueError unless `key` is a key or a well-formed template (`tenant:{tenant_id}`)."""
    if not KEY_RE.match(key):
        raise ValueError(f"bad limit key {key!r}: letters, digits and _ . : - / {{ }}, at most 200")
    if is_template(key):
        template_fields(key)


@dataclass(slots=True)
class KeyState:
    rule: Rule
    tat: float = 0.0  # GCRA: when the bucket is full again; a start is allowed while now >= tat - tolerance
    running: int = 0  # attempts started under this key and not ended (both kinds count them)
    waiting: int = 0  # jobs waiting for this key (limited)
    starts: int = 0  # attempts started under this key, ever (a metric)
    template: str | None = None  # the template this key was filled in from (dropped when idle), if any

    @property
    def interval(self) -> float:
        assert self.rule.rate_per_s is not None
        return 1.0 / self.rule.rate_per_s

    @property
    def tolerance(self) -> float:
        return (self.rule.burst - 1) * self.interval


@dataclass(slots=True)
class Template:
    rule: Rule
    pattern: re.Pattern[str]
    literal: int  # characters outside its fields: the most specific of several matching templates wins
    declared_at: float  # its filled-in keys start as if declared then (empty then, refilled since)
    keys: set[str] = field(default_factory=set)  # its live filled-in keys
    starts: int = 0  # attempts started under any of its keys, ever (a metric)


class Limits:
    def __init__(self) -> None:
        self.keys: dict[str, KeyState] = {}
        self.templates: dict[str, Template] = {}
        self._filled = 0  # keys in self.keys filled in from a template
        self._sweep_at = SWEEP_MIN

    def declare(self, key: str, rule: Rule, now: float) -> None:
        """Set a key's rule (new, or changed at run time: a rate change keeps its spacing, never bursts)."""
        if is_template(key):
            self._declare_template(key, rule, now)
            return
        self._declare(key, rule, now, by_name=True)

    def _declare_template(self, key: str, rule: Rule, now: float) -> None:
        t = self.templates.get(key)
        if t is None:
            pattern = template_pattern(key)
            literal = len(key) - sum(len(n) + 2 for n in template_fields(key))
            self.templates[key] = Template(rule, pattern, literal, now)
            return
        if rule.rate_per_s is not None and t.rule.rate_per_s is None:
            t.declared_at = now
        t.rule = rule
        for k in t.keys:
            self._declare(k, rule, now)

    def _declare(self, key: str, rule: Rule, now: float, *, by_name: bool = False) -> None:
        state = self.keys.get(key)
        if by_name and state is not None and state.template is not None:  # declared by name now: kept
            self.templates[state.template].keys.discard(key)
            self._filled -= 1
            state.template = None
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
        t = self.templates.pop(key, None)
        if t is not None:
            for k in t.keys:
                del self.keys[k]
            self._filled -= len(t.keys)
            return True
        state = self.keys.get(key)
        if state is None or state.template is not None:
            return False  # a filled-in key goes with its template
        del self.keys[key]
        return True

    def known(self, key: str) -> bool:
        """Whether a job may name this key: declared, or filled in from a declared template."""
        return key in self.keys or (not is_template(key) and self._template_for(key) is not None)

    def _template_for(self, key: str) -> str | None:
        best: tuple[int, str] | None = None
        for name, t in self.templates.items():
            if t.pattern.match(key) and (best is None or (t.literal, name) > best):
                best = (t.literal, name)
        return None if best is None else best[1]

    def state(self, key: str, now: float) -> KeyState | None:
        """The key's state; a key filled in from a template gets its own on first use (None: no rule)."""
        state = self.keys.get(key)
        if state is not None or not self.templates or is_template(key):
            return state
        name = self._template_for(key)
        if name is None:
            return None
        if self._filled >= self._sweep_at:
            self.sweep(now)
            self._sweep_at = max(SWEEP_MIN, 2 * self._filled)  # amortised: each sweep frees or doubles
        t = self.templates[name]
        state = self.keys[key] = KeyState(t.rule, template=name)
        if t.rule.rate_per_s is not None:
            state.tat = max(now, t.declared_at + state.tolerance + state.interval)
        t.keys.add(key)
        self._filled += 1
        return state

    def sweep(self, now: float) -> int:
        """Drop filled-in keys that are idle: nothing running or waiting, and (a rate) the bucket full again,
        so that one made afresh later is the same or stricter. Returns how many were dropped."""
        idle = [k for k, s in self.keys.items() if s.template is not None and s.running == 0 and s.waiting == 0
                and (s.rule.rate_per_s is None or s.tat <= now)]
        for k in idle:
            state = self.keys.pop(k)
            assert state.template is not None
            self.templates[state.template].keys.discard(k)
        self._filled -= len(idle)
        return len(idle)

    def allows(self, keys: tuple[str, ...], now: float) -> bool:
        for key in keys:
            state = self.state(key, now)
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
            state = self.state(key, now)
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
            state = self.state(key, now)
            assert state is not None  # allows() said so
            state.running += 1
            state.starts += 1
            if state.template is not None:
                self.templates[state.template].starts += 1
            if state.rule.rate_per_s is not None:
                state.tat = max(state.tat, now) + state.interval

    def adopt(self, keys: tuple[str, ...], now: float) -> None:
        """An attempt already running (a worker that reconnected still runs it) counts toward concurrency."""
        for key in keys:
            state = self.state(key, now)
            if state is not None:
                state.running += 1

    def end(self, keys: tuple[str, ...]) -> None:
        """An attempt under these keys ended (or its worker was lost): concurrency comes back."""
        for key in keys:
            state = self.keys.get(key)
            if state is not None and state.running > 0:
                state.running -= 1

    def view(self, now: float) -> list[dict[str, object]]:
        """Every key declared by name and every template, each template followed by its live filled-in keys
        (at most VIEW_KEYS_MAX of them; `keys` says how many there are)."""
        self.sweep(now)
        out: list[dict[str, object]] = []
        for key in sorted({k for k, s in self.keys.items() if s.template is None} | set(self.templates)):
            t = self.templates.get(key)
            if t is None:
                out.append(self._entry(key, self.keys[key], now))
                continue
            states = [self.keys[k] for k in t.keys]
            out.append({
                "key": key, "rule": str(t.rule), "template": True, "keys": len(states),
                "running": sum(s.running for s in states), "waiting": sum(s.waiting for s in states),
                "starts": t.starts,
            })
            for k in sorted(t.keys)[:VIEW_KEYS_MAX]:
                entry = self._entry(k, self.keys[k], now)
                entry["template"] = key
                out.append(entry)
        return out

    @staticmethod
    def _entry(key: str, state: KeyState, now: float) -> dict[str, object]:
        rule = state.rule
        entry: dict[str, object] = {
            "key": key, "rule": str(rule), "running": state.running, "waiting": state.waiting,
            "starts": state.starts,
        }
        if rule.rate_per_s is not None:
            # Tokens available now, in [0, burst]: how many could start at once right now.
            free = (now - (state.tat - state.tolerance)) / state.interval + 1
            entry["tokens"] = round(max(0.0, min(float(rule.burst), free)), 3) if math.isfinite(free) else 0.0
        return entry

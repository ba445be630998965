"""Schedules: cron and intervals that fire exactly once per slot. Pure: wall time comes in as `now`.

The dispatcher owns its journal and there is one dispatcher per journal, so it is the one scheduler by
construction: no beat process, no election. Each schedule keeps the **last slot** it fired; firing slot T
creates the job `sched:NAME:<T in UTC>` and advances the last slot in the same journal commit, and job
ids are unique, so a slot never has two jobs however often the dispatcher is killed.

- **Slots** come from wall time: a cron expression in an IANA zone (cronsim: Debian cron's rules, so a
  fixed-time slot in a skipped hour fires once, soon after the jump, and once in a repeated hour;
  five fields, or six with seconds first; `@hourly`-style names), or `every` seconds anchored to the
  Unix epoch plus `offset`. A slot at or before the last one never fires again (a wall clock stepped
  back); a clock that jumps forward is downtime.
- **Missed slots** (downtime, a pause, a forward jump) follow `misfire`: `skip` (none), `once` (only the
  latest: the default), `all` (oldest first, at most `max_catchup`); slots older than `catchup_window`
  never run. Skipped slots are counted.
- **Overlap** with the schedule's previous job still unfinished: `skip` (the default; counted), `queue_one`
  (one slot waits for it to end), `allow`, `cancel_previous`.
- **Jitter**: the job is due `jitter * h(name, slot)` after its slot (stable across restarts); its id
  keeps the nominal slot.
- **Edits never surprise**: an upsert keeps the last slot, so the next slot is the new spec's first after
  max(now, last slot); a new schedule starts from now.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

NICKNAMES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
MISFIRE = ("skip", "once", "all")
OVERLAP = ("skip", "queue_one", "allow", "cancel_previous")
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
ON_TIME_S = 10.0  # a slot fired later than this after it was due, or after its successor came, is missed
MAX_SLOTS_PER_TURN = 10_000  # slots of one schedule looked at in one evaluation, at most


@dataclass(frozen=True, slots=True)
class Spec:
    """What a schedule runs and when; the call and options are opaque bytes (the client encoded them)."""

    name: str
    cron: str | None = None
    every_s: float | None = None
    offset_s: float = 0.0
    tz: str = "UTC"
    misfire: str = "once"
    catchup_window_s: float = 86400.0
    max_catchup: int = 100
    overlap: str = "skip"
    jitter_s: float = 0.0
    pause_on_failure: bool = False

    def check(self) -> None:
        """ValueError, readably, for a spec that cannot work."""
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad schedule name {self.name!r}: letters, digits, '.', '_', '-' (at most 100)")
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("a schedule needs exactly one of cron or every")
        if self.every_s is not None and not (self.every_s >= 1.0 and math.isfinite(self.every_s)):
            raise ValueError("every must be at least 1 second")
        if not math.isfinite(self.offset_s) or self.offset_s < 0:
            raise ValueError("offset must be 0 or more seconds")
        zone(self.tz)
        if self.cron is not None:
            try:
                CronSim(expression(self.cron), datetime.now(zone(self.tz)))
            except CronSimError as exc:
                raise ValueError(f"bad cron expression {self.cron!r}: {exc}") from None
        if self.misfire not in MISFIRE:
            raise ValueError(f"misfire must be one of {', '.join(MISFIRE)}")
        if self.overlap not in OVERLAP:
            raise ValueError(f"overlap must be one of {', '.join(OVERLAP)}")
        if not 0 <= self.jitter_s < 86400 or not self.catchup_window_s > 0 or not 0 < self.max_catchup <= 100_000:
            raise ValueError("jitter must be in [0, 1 day), catchup_window positive, max_catchup in [1, 100000]")


@dataclass(slots=True)
class State:
    """What a schedule has done (journaled with it)."""

    last_slot: float  # the last slot fired, or skipped past (Unix time)
    paused: bool = False
    paused_until: float | None = None
    skipped: int = 0
    fired: int = 0
    manual: int = 0  # triggers so far (their ids: sched:NAME:manual:N)
    last_job: str | None = None
    last_outcome: str | None = None
    queued_slot: float | None = None  # overlap=queue_one: the slot waiting for the previous job
    extra: dict[str, Any] = field(default_factory=dict)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)") from None


def expression(cron: str) -> str:
    return NICKNAMES.get(cron.strip().lower(), cron)


def iter_slots(spec: Spec, after: float) -> Iterator[float]:
    """The slots strictly after `after` (Unix times), lazily: a cron expression is walked only as far as
    asked (a fire looks at two or three slots, not a batch: 10,000 schedules fire every minute)."""
    if spec.every_s is not None:
        k = math.floor((after - spec.offset_s) / spec.every_s) + 1
        for i in itertools.count():
            yield k * spec.every_s + spec.offset_s + i * spec.every_s
    assert spec.cron is not None
    # An expression with no more slots (a date that never comes again) ends the iteration.
    for t in CronSim(expression(spec.cron), datetime.fromtimestamp(after, zone(spec.tz))):
        yield t.timestamp()


def slots_after(spec: Spec, after: float, count: int) -> list[float]:
    """The next `count` slots strictly after `after` (Unix times)."""
    return list(itertools.islice(iter_slots(spec, after), count))


def slots_between(spec: Spec, after: float, until: float, cap: int = MAX_SLOTS_PER_TURN) -> list[float]:
    """Slots in (after, until], at most cap (the latest ones, if there are more)."""
    if spec.every_s is not None:  # counted, not walked: only the latest cap are made (the same values)
        every, offset = spec.every_s, spec.offset_s
        k = math.floor((after - offset) / every) + 1
        n = count_between(spec, after, until)
        return [k * every + offset + i * every for i in range(max(0, n - cap), n)]
    out: deque[float] = deque(maxlen=cap)
    for t in iter_slots(spec, after):
        if t > until:
            break
        out.append(t)
    return list(out)


def job_id(name: str, slot: float) -> str:
    """The id of slot `slot`'s job: sched:NAME:<slot in UTC, ISO-8601>."""
    stamp = datetime.fromtimestamp(slot, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"sched:{name}:{stamp}"


def jitter(spec: Spec, slot: float) -> float:
    """A stable offset in [0, jitter) from (name, slot): the same after a restart."""
    if not spec.jitter_s:
        return 0.0
    digest = hashlib.blake2b(f"{spec.name}|{slot!r}".encode(), digest_size=8).digest()
    return spec.jitter_s * (int.from_bytes(digest, "big") / 2**64)


@dataclass(slots=True)
class Plan:
    """What one evaluation of a schedule decided."""

    fire: list[float]  # slots to fire now, oldest first
    skipped: int  # slots skipped (misfire policy, catch-up window)
    last_slot: float  # the schedule's new last slot


def count_between(spec: Spec, after: float, until: float, cap: int = 100_000) -> int:
    """How many slots in (after, until] (exact for intervals; for cron, counted up to cap)."""
    if until <= after:
        return 0
    if spec.every_s is not None:
        first = math.floor((after - spec.offset_s) / spec.every_s) + 1
        last = math.floor((until - spec.offset_s) / spec.every_s)
        return max(0, last - first + 1)
    n = 0
    for t in iter_slots(spec, after):
        if t > until or n >= cap:
            break
        n += 1
    return n


def plan(spec: Spec, state: State, now: float) -> Plan:
    """The slots due by `now` and what the misfire policy makes of them (overlap is applied by the caller)."""
    if state.paused and (state.paused_until is None or now < state.paused_until):
        return Plan([], 0, state.last_slot)
    # Slots older than the catch-up window never run: count them, enumerate only the window.
    horizon = max(state.last_slot, now - spec.catchup_window_s)
    skipped = count_between(spec, state.last_slot, horizon)
    window = slots_between(spec, horizon, now)
    if not window:
        return Plan([], skipped, max(state.last_slot, horizon) if skipped else state.last_slot)
    last = window[-1]
    # Only the latest slot can be on time: any other one's successor has come too (so it was missed).
    on_time = [last] if now - last <= ON_TIME_S else []
    missed = window[:-1] if on_time else window
    if not missed:
        fire = on_time
    elif spec.misfire == "skip":
        fire, skipped = on_time, skipped + len(missed)
    elif spec.misfire == "once":
        fire = [window[-1]]  # only the latest missed (or on-time) slot
        skipped += len(window) - 1
    else:
        fire = window[-spec.max_catchup:]
        skipped += len(window) - len(fire)
    return Plan(fire, skipped, last)


def next_fire(spec: Spec, state: State) -> float | None:
    """When this schedule next needs the loop (its next slot, or a pause's end), as Unix time."""
    if state.paused:
        return state.paused_until
    nxt = slots_after(spec, state.last_slot, 1)
    return nxt[0] if nxt else None


# --- the dispatcher's schedules ---------------------------------------------------------------------------


@dataclass(slots=True)
class Fire:
    """Create this job now: slot `slot` of schedule `name`, due at `due` (slot + jitter)."""

    name: str
    slot: float
    job_id: str
    due: float


@dataclass(slots=True)
class Entry:
    spec: Spec
    state: State
    call: list[bytes]  # the task's call frames, as the client encoded them
    options: bytes  # its TaskOptions (wire form)
    generation: int = 0  # heap entries of older generations are stale
    origin: str = "api"  # "file": declared in the dispatcher's --schedules file (which owns it)


class Schedules:
    """Every schedule of the dispatcher, one heap of next fire times (wall), no timer per schedule.

    The loop calls `due(now)` when `next_wake()` comes (and once per turn is cheap: a heap peek); it
    creates the jobs of the Fire list and cancels `cancel` ids, then journals `take_dirty()` with them.
    `unfinished(job_id)` tells the overlap policy whether a schedule's previous job still runs."""

    def __init__(self, unfinished: Any):
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, str, int]] = []
        self._unfinished = unfinished
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self.cancel: list[str] = []  # jobs to cancel (overlap=cancel_previous), taken by the loop

    # --- changes -----------------------------------------------------------------------------------

    def upsert(self, spec: Spec, call: list[bytes], options: bytes, now: float, origin: str = "api") -> Entry:
        """Create or change a schedule. A change keeps its last slot: it never fires at once."""
        spec.check()
        old = self.entries.get(spec.name)
        state = old.state if old is not None else State(last_slot=now)
        entry = Entry(spec, state, call, options, old.generation + 1 if old is not None else 0, origin)
        self.entries[spec.name] = entry
        self._deleted.discard(spec.name)
        self._changed(entry)
        return entry

    def restore(self, entry: Entry) -> None:
        self.entries[entry.spec.name] = entry
        self._push(entry)

    def delete(self, name: str) -> bool:
        entry = self.entries.pop(name, None)
        if entry is None:
            return False
        self._dirty.discard(name)
        self._deleted.add(name)
        return True

    def pause(self, name: str, until: float | None = None) -> Entry:
        entry = self._get(name)
        entry.state.paused, entry.state.paused_until = True, until
        self._changed(entry)
        return entry

    def resume(self, name: str) -> Entry:
        """Resume; the slots missed while paused follow the misfire policy."""
        entry = self._get(name)
        entry.state.paused, entry.state.paused_until = False, None
        self._changed(entry)
        return entry

    def trigger(self, name: str, now: float) -> Fire:
        """One extra run now, with its own id (sched:NAME:manual:N); the slots are untouched."""
        entry = self._get(name)
        entry.state.manual += 1
        self._changed(entry)
        return Fire(name, now, f"sched:{name}:manual:{entry.state.manual}", now)

    def backfill(self, name: str, start: float, end: float, now: float) -> list[Fire]:
        """The slots in [start, end] (at most max_catchup, oldest first), through the overlap policy."""
        entry = self._get(name)
        slots = slots_between(entry.spec, start - 1e-6, min(end, now), cap=entry.spec.max_catchup)
        fires = self._through_overlap(entry, slots)
        self._changed(entry)
        return fires

    # --- time ------------------------------------------------------------------------------------------

    def next_wake(self) -> float | None:
        while self._heap:
            at, name, generation = self._heap[0]
            entry = self.entries.get(name)
            if entry is not None and entry.generation == generation:
                return at
            heapq.heappop(self._heap)
        return None

    def due(self, now: float) -> list[Fire]:
        """The jobs to create for every schedule whose time has come."""
        fires: list[Fire] = []
        while self._heap and self._heap[0][0] <= now:
            _, name, generation = heapq.heappop(self._heap)
            entry = self.entries.get(name)
            if entry is None or entry.generation != generation:
                continue
            state = entry.state
            if state.paused and state.paused_until is not None and now >= state.paused_until:
                state.paused, state.paused_until = False, None  # the pause ran out: resume (misfire applies)
            decided = plan(entry.spec, state, now)
            state.skipped += decided.skipped
            state.last_slot = max(state.last_slot, decided.last_slot)
            fires += self._through_overlap(entry, decided.fire)
            self._changed(entry)
        return fires

    def job_ended(self, job_id: str, outcome: str) -> list[Fire]:
        """A job ended: its schedule notes the outcome, may pause, and fires a slot queued behind it."""
        name = _schedule_of(job_id)
        entry = self.entries.get(name) if name is not None else None
        if entry is None:
            return []
        state = entry.state
        if state.last_job == job_id:
            state.last_outcome = outcome
        if outcome == "failed" and entry.spec.pause_on_failure:
            state.paused, state.paused_until = True, None
        fires: list[Fire] = []
        if state.queued_slot is not None and not state.paused and state.last_job == job_id:
            slot, state.queued_slot = state.queued_slot, None
            fires = self._fire(entry, slot)
        self._changed(entry)
        return fires

    # --- journal --------------------------------------------------------------------------------------

    def take_dirty(self) -> tuple[list[Entry], list[str]]:
        """Schedules changed since the last call, and names deleted (the journal writes them)."""
        changed = [self.entries[n] for n in self._dirty if n in self.entries]
        deleted = list(self._deleted)
        self._dirty, self._deleted = set(), set()
        return changed, deleted

    # --- views ----------------------------------------------------------------------------------------

    def view(self, name: str, now: float) -> dict[str, Any]:
        entry = self._get(name)
        spec, state = entry.spec, entry.state
        nxt = next_fire(spec, state)
        return {
            "name": name, "cron": spec.cron, "every_s": spec.every_s, "offset_s": spec.offset_s, "tz": spec.tz,
            "misfire": spec.misfire, "overlap": spec.overlap, "jitter_s": spec.jitter_s,
            "catchup_window_s": spec.catchup_window_s, "max_catchup": spec.max_catchup,
            "pause_on_failure": spec.pause_on_failure, "paused": state.paused, "paused_until": state.paused_until,
            "next_run": nxt, "last_slot": state.last_slot, "last_job": state.last_job,
            "last_outcome": state.last_outcome, "fired": state.fired, "skipped": state.skipped,
            "explain": _explain(spec), "origin": entry.origin,
        }

    def preview(self, name: str, count: int, now: float) -> list[float]:
        entry = self._get(name)
        return slots_after(entry.spec, max(now, entry.state.last_slot), max(1, min(count, 1000)))

    # --- internals ------------------------------------------------------------------------------------

    def _get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"no schedule {name!r}")
        return entry

    def _changed(self, entry: Entry) -> None:
        entry.generation += 1
        self._dirty.add(entry.spec.name)
        self._push(entry)

    def _push(self, entry: Entry) -> None:
        at = next_fire(entry.spec, entry.state)
        if at is not None:
            heapq.heappush(self._heap, (at, entry.spec.name, entry.generation))

    def _through_overlap(self, entry: Entry, slots: list[float]) -> list[Fire]:
        fires: list[Fire] = []
        for slot in slots:
            previous = entry.state.last_job
            # A slot fired earlier in this batch (a catch-up, a backfill) has no job yet, but will not have
            # finished by the time the next one starts: it counts as running, so the policy holds (no storm).
            busy = previous is not None and (any(f.job_id == previous for f in fires) or self._unfinished(previous))
            overlap = entry.spec.overlap
            if busy and overlap == "skip":
                entry.state.skipped += 1
                continue
            if busy and overlap == "queue_one":
                if entry.state.queued_slot is not None:
                    entry.state.skipped += 1  # only one waits; the one it replaces is skipped
                entry.state.queued_slot = slot
                continue
            if busy and overlap == "cancel_previous" and previous is not None:
                self.cancel.append(previous)
            fires += self._fire(entry, slot)
        return fires

    def _fire(self, entry: Entry, slot: float) -> list[Fire]:
        job = job_id(entry.spec.name, slot)
        entry.state.last_job = job
        entry.state.last_outcome = None
        entry.state.fired += 1
        return [Fire(entry.spec.name, slot, job, slot + jitter(entry.spec, slot))]


def encode_entry(entry: Entry) -> bytes:
    """A schedule as the journal keeps it."""
    return msgspec.msgpack.encode({"spec": entry.spec, "state": entry.state, "call": entry.call,
                                   "options": entry.options, "origin": entry.origin})


class _Stored(msgspec.Struct):
    spec: Spec
    state: State
    call: list[bytes]
    options: bytes
    origin: str = "api"


def decode_entry(blob: bytes) -> Entry:
    """The inverse of encode_entry; ValueError if it cannot be read."""
    try:
        stored = msgspec.msgpack.decode(blob, type=_Stored)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"unreadable schedule: {exc}") from None
    return Entry(stored.spec, stored.state, stored.call, stored.options, origin=stored.origin)


def _schedule_of(job_id: str) -> str | None:
    """The schedule a job id belongs to (sched:NAME:...), or None."""
    if not job_id.startswith("sched:"):
        return None
    return job_id.split(":", 2)[1]


def _explain(spec: Spec) -> str:
    if spec.every_s is not None:
        offset = f", offset {spec.offset_s:g} s" if spec.offset_s else ""
        return f"every {spec.every_s:g} s from the Unix epoch{offset}"
    assert spec.cron is not None
    try:
        text = str(CronSim(expression(spec.cron), datetime.now(zone(spec.tz))).explain())
    except Exception:  # explain() does not know every expression
        text = spec.cron
    return f"{text} ({spec.tz})"

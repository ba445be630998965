"""map and starmap: items in, results out in input order, streamed, with a bounded number in flight.

One MapRun holds a map's jobs in flight, in input order; Client.map drives it by blocking on the first
job's future, AsyncClient.map by awaiting it. A job carries one item or a chunk of items.

Automatic chunks (chunksize=None, the default): ChunkPlanner sizes each new job so that it runs for about
TARGET_CHUNK_S (5 ms) on a worker slot, from what it measures:

    per-item time  <=  slots / rate
        slots: the concurrency of the workers able to run the map's tasks (STATUS, refreshed every 2 s)
        rate:  items of this map completed per second, over the last RATE_WINDOW_S (50 ms)

Each slot spends at least per-item time on an item, so slots / rate bounds it from above (more so
when other work shares the slots, or the input or the consumer is slow): a chunk of TARGET_CHUNK_S *
rate / slots items never runs longer than the target, and the estimate tightens as chunks grow and the
rate rises. A job that reports its run time (a `duration` in JOB_DONE info, where the dispatcher passes
it on) gives the per-item time itself. So tiny tasks travel a thousand to a chunk (MAX_CHUNK_ITEMS),
while a task of 5 ms or more gets a job of its own, and slow work still spreads over every slot with
per-item retries, results, cancellation and progress. The first jobs, before anything is measured,
carry one item each.

A failed chunk does not hide which item failed: its items run again one job each, in order, so the
results before the failing item come out and its own exception is raised at its position (the items
before it may thus run twice; execution is at-least-once anyway).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from conveyor.client.future import JobFuture
from conveyor.protocol import failures as perr
from conveyor.protocol.payload import encode_call, encode_chunk, encode_plain_chunk

TARGET_CHUNK_S = 0.005  # an automatic chunk should run for about this long on a worker slot
MAX_CHUNK_ITEMS = 1024  # items per automatic chunk at most
MAX_CHUNK_BYTES = 1 << 20  # an automatic chunk's encoded call stays about this small
WINDOW_ITEMS = 65536  # items in flight at most (memory), unless `window` says otherwise
RATE_WINDOW_S = 0.02  # completion rate over this long (at least TARGET_CHUNK_S: see ChunkPlanner.rate)
SLOTS_REFRESH_S = 2.0  # how old the slot count may be
SLOTS_WAIT_S = 1.0  # how long a map's start waits for the slot count at most
# Failures a single item may not share with the rest of its chunk: its items then run one by one.
SPLIT_KINDS = frozenset({perr.EXCEPTION, perr.TIMEOUT, perr.CRASHED, perr.LOST})

# One item's positional arguments (map has no keyword arguments). Kept per in-flight chunk to split a failed
# one: a tuple of plain values, which the garbage collector stops tracking, where an (args, {}) pair it never
# would: 65,536 of those in flight made every full collection scan them (a third more CPU per item).
Args = tuple[Any, ...]


def slots_for(status: dict[str, Any], mode: str | None, tags: frozenset[str]) -> int:
    """The concurrency of the registered workers that can run a task of this mode and these tags."""
    total = 0
    for w in status.get("workers", ()):
        if w.get("draining") or (mode is not None and w.get("mode") != mode):
            continue
        if not tags <= set(w.get("tags", ())):
            continue
        total += int(w.get("concurrency", 0))
    return total


class ChunkPlanner:
    """How many items the next job of an automatic map carries. No I/O: times and observations come in."""

    def __init__(self, now: float):
        self.started = now
        self.slots: int | None = None  # unknown until STATUS answers
        # Completions arrive on the client's I/O thread (done-callbacks): appended here, a thread-safe
        # deque, and taken in by the map's own thread.
        self._inbox: deque[tuple[float, int, float | None]] = deque()
        self._done: deque[tuple[float, int]] = deque()  # (completion time, items) within RATE_WINDOW_S
        self._done_items = 0
        self._per_item_s: float | None = None  # from reported durations, when there are any
        self._bytes_per_item: float | None = None

    def completed(self, n_items: int, now: float, duration_s: float | None = None) -> None:
        """A job of n_items finished (it may say how long it ran). Safe from any thread."""
        self._inbox.append((now, n_items, duration_s))

    def encoded(self, n_items: int, n_bytes: int) -> None:
        """A job of n_items took n_bytes on the wire."""
        if n_items > 0:
            self._bytes_per_item = n_bytes / n_items

    def rate(self, now: float) -> float:
        """Items completed per second lately (0 before any completed)."""
        inbox, done = self._inbox, self._done
        while inbox:
            at, n, duration_s = inbox.popleft()
            done.append((at, n))
            self._done_items += n
            if duration_s is not None and 0 <= duration_s < float("inf") and n > 0:
                old = self._per_item_s
                self._per_item_s = duration_s / n if old is None else old + 0.3 * (duration_s / n - old)
        while done and done[0][0] < now - RATE_WINDOW_S:
            self._done_items -= done.popleft()[1]
        span = min(RATE_WINDOW_S, now - self.started)
        return self._done_items / span if span > 0 else 0.0

    def size(self, now: float) -> int:
        rate = self.rate(now)
        if self._per_item_s is not None:
            bound = TARGET_CHUNK_S / self._per_item_s if self._per_item_s > 0 else float(MAX_CHUNK_ITEMS)
        elif self.slots:
            bound = TARGET_CHUNK_S * rate / self.slots
        else:
            return 1
        n = max(1, min(MAX_CHUNK_ITEMS, int(bound)))
        if self._bytes_per_item:
            n = max(1, min(n, int(MAX_CHUNK_BYTES / self._bytes_per_item)))
        return n

    def max_jobs(self) -> int:
        """Jobs in flight at most: enough to keep every slot busy (and prefetched), no more."""
        return 2 * self.slots + 8 if self.slots else 8


class _Job:
    """One job of a map: its future, how many items it carries, and, for a chunk, their arguments (a failed
    chunk is split into one job per item)."""

    __slots__ = ("calls", "chunked", "future", "n")

    def __init__(self, future: JobFuture, n: int, chunked: bool, calls: list[Args] | None):
        self.future = future
        self.n = n
        self.chunked = chunked
        self.calls = calls


class MapRun:
    """The jobs of one map in flight, in input order. fill() submits, take() gives the first job's results.

    `submit(frames)` submits one job; `ask_slots()` starts a STATUS request (a future of the slot
    count) or returns None when there is nobody to ask."""

    def __init__(
        self,
        submit: Callable[[list[Any]], JobFuture],
        name: str,
        blob: bytes | None,
        calls: Iterator[Args],
        chunksize: int | None,
        window: int | None,
        ask_slots: Callable[[], Future[int] | None],
        submit_dependant: Callable[[Args], JobFuture | None] | None = None,
        every_item_dependant: bool = False,
    ):
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        if window is not None and window < 1:
            raise ValueError("window must be at least 1")
        self._submit = submit
        self._name = name
        self._blob = blob
        self._calls = calls
        self._chunksize = chunksize
        self._window = window
        self._ask_slots = ask_slots
        # An item whose arguments hold futures (or a view with `after`) is a job with parents: it goes
        # alone, through the client's dependency path (deps.py), which returns its future; None otherwise.
        self._submit_dependant = submit_dependant or (lambda args: None)
        self._scan = submit_dependant is not None  # look for futures (one quick pass lets plain chunks by)
        self._every = every_item_dependant  # a view with `after`: every item is a dependant
        self.in_flight: deque[_Job] = deque()
        self._items = 0  # items in flight
        self._exhausted = False
        now = time.monotonic()
        self._planner = ChunkPlanner(now) if chunksize is None else None
        self._slots_future: Future[int] | None = None
        self._slots_at = -SLOTS_REFRESH_S

    def fill(self) -> None:
        """Submit jobs until the window is full or the items run out."""
        planner = self._planner
        if planner is not None:
            self._refresh_slots()
        while not self._exhausted:
            if planner is None:
                limit_jobs = self._window or max(8, WINDOW_ITEMS // (self._chunksize or 1))
                if len(self.in_flight) >= limit_jobs:
                    return
                n = self._chunksize or 1
            else:
                if len(self.in_flight) >= (self._window or planner.max_jobs()):
                    return
                room = WINDOW_ITEMS - self._items
                if room <= 0:
                    return
                n = min(planner.size(time.monotonic()), room)
            if n == 1 and (planner is not None or self._chunksize == 1):
                call = next(self._calls, None)
                if call is None:
                    self._exhausted = True
                    return
                future = self._submit_dependant(call) if self._scan else None
                if future is None:
                    future = self._submit(encode_call(self._name, self._blob, call, {}))
                self._track(future, 1, False, None)
            else:
                chunk = list(itertools.islice(self._calls, n))
                if not chunk:
                    self._exhausted = True
                    return
                # Plain values (the usual) encode at once; only a chunk that is not plain can hold a future.
                frames = None if self._every else encode_plain_chunk(self._name, self._blob, chunk)
                if frames is None and self._scan:
                    alone = [self._submit_dependant(a) for a in chunk]
                    if any(f is not None for f in alone):  # items with parents: every item of this chunk alone
                        for a, f in zip(chunk, alone, strict=True):
                            self._track(f or self._submit(encode_call(self._name, self._blob, a, {})), 1, False,
                                        None)
                        continue
                if frames is None:
                    frames = encode_chunk(self._name, self._blob, [(a, {}) for a in chunk])
                self._add(frames, len(chunk), True, chunk if len(chunk) > 1 else None)

    def _add(self, frames: list[Any], n: int, chunked: bool, calls: list[Args] | None) -> None:
        future = self._submit(frames)
        if chunked and self._planner is not None:
            self._planner.encoded(n, sum(memoryview(f).nbytes for f in frames))
        self._track(future, n, chunked, calls)

    def _track(self, future: JobFuture, n: int, chunked: bool, calls: list[Args] | None) -> None:
        planner = self._planner
        if planner is not None:

            def completed(f: Future[Any], n: int = n) -> None:
                planner.completed(n, time.monotonic(), _duration(f))

            future.add_done_callback(completed)
        self.in_flight.append(_Job(future, n, chunked, calls))
        self._items += n

    def _refresh_slots(self) -> None:
        planner = self._planner
        assert planner is not None
        asked = self._slots_future
        if asked is not None and asked.done():
            self._slots_future = None
            try:
                planner.slots = asked.result()
            except Exception:  # no answer: keep what we had
                pass
        now = time.monotonic()
        if self._slots_future is None and now - self._slots_at >= SLOTS_REFRESH_S:
            self._slots_at = now
            self._slots_future = self._ask_slots()

    def awaiting_slots(self) -> Future[int] | None:
        """The slot count on its way, if filling stopped for want of it (a map's first jobs): wait for it
        (SLOTS_WAIT_S at most), then fill() again, so that slow tasks on many slots all start at once."""
        planner = self._planner
        if planner is None or planner.slots is not None or self._exhausted or self._window is not None:
            return None
        asked = self._slots_future
        return asked if asked is not None and not asked.done() else None

    def head(self) -> JobFuture:
        """The future of the first job in flight (while there is one)."""
        return self.in_flight[0].future

    def take(self) -> list[Any] | None:
        """The first job's results, once its future is done (a list, in input order), or None if it was a
        chunk that failed and was split into one job per item (then wait for the new first job).

        Raises the job's exception (for a split item: its own, at its position)."""
        job = self.in_flight[0]
        future = job.future
        exc = future.exception(0)
        if exc is not None:
            if job.calls is not None and _kind(future) in SPLIT_KINDS:
                self.in_flight.popleft()
                alone = [_Job(self._submit(encode_call(self._name, self._blob, call, {})), 1, False, None)
                         for call in job.calls]
                self.in_flight.extendleft(reversed(alone))
                return None
            raise exc
        self.in_flight.popleft()
        self._items -= job.n
        return future.result() if job.chunked else [future.result()]

    def jobs(self) -> list[JobFuture]:
        return [job.future for job in self.in_flight]


def _duration(future: Future[Any]) -> float | None:
    info = getattr(future, "info", None)
    value = info.get("duration") if isinstance(info, dict) else None
    return value if isinstance(value, int | float) else None


def _kind(future: JobFuture) -> str | None:
    error = future.info.get("error")
    return error.get("kind") if isinstance(error, dict) else None

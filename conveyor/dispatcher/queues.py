"""Jobs waiting for a worker, per queue class, best first. Pure, no I/O (part of the Scheduler).

A queue class is what a job requires of its worker: (mode or None, tags). Within a class, jobs wait in
a heap ordered by their **sort key** and then their **order**:

- the sort key is `-priority` (higher priority first), or with aging `-(priority - ready_since / S)`:
  a job gains one priority point per S seconds of waiting, and nothing is ever re-sorted (one static
  key per job, fixed when it becomes ready);
- the order is the job's sequence number (acceptance order, or for a delayed job the order in which it
  became due), so equal keys keep FIFO; a job handed back goes in front of its equals.

Entries are removed lazily: a job that leaves a queue other than by being popped (cancelled, adopted
by a worker that reports it still runs, retried later) leaves its entry behind, skipped when it comes
to the top. Counts are exact. A class whose count reaches 0 goes away (per-job tags would otherwise grow
memory, and the cost of every assignment, forever); it comes back with its next job.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

from conveyor.dispatcher.model import ClassKey, Job

Entry = tuple[float, int, Job]  # (sort key, order, job)


class ClassQueue:
    """One class's heap of entries."""

    __slots__ = ("entries", "state")

    def __init__(self, state: str):
        self.entries: list[Entry] = []
        self.state = state  # the state a job in this queue is in (queued, or limited)

    def push(self, key: float, order: int, job: Job) -> None:
        heapq.heappush(self.entries, (key, order, job))

    def head(self) -> Entry | None:
        """The best entry whose job still waits here (stale ones are dropped on the way)."""
        entries = self.entries
        while entries:
            job = entries[0][2]
            if job.state == self.state and job.retry_at is None:
                return entries[0]
            heapq.heappop(entries)
        return None

    def pop(self) -> Job:
        return heapq.heappop(self.entries)[2]

    def __iter__(self) -> Iterator[Job]:
        return (entry[2] for entry in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class Counts(dict[Any, int]):
    """Counts by key; a key not present counts 0 (reading it adds nothing)."""

    def __missing__(self, key: Any) -> int:
        return 0


class Queues:
    """The classes of one kind of waiting (ready to run, or waiting on limit keys), with exact counts."""

    def __init__(self, state: str):
        self.state = state
        self.by_class: dict[Any, ClassQueue] = {}
        self.counts: Counts = Counts()  # waiting jobs per class (absent: 0)
        self.total = 0

    def push(self, cls: Any, key: float, order: int, job: Job) -> bool:
        """Add a job; True if its class is new (the caller tells the workers that serve it)."""
        q = self.by_class.get(cls)
        new = q is None
        if q is None:
            q = self.by_class[cls] = ClassQueue(self.state)
        q.push(key, order, job)
        self.counts[cls] += 1
        self.total += 1
        return new

    def taken(self, cls: Any) -> bool:
        """A job of cls left by being popped or otherwise; True if the class is now gone (count 0)."""
        self.counts[cls] -= 1
        self.total -= 1
        if not self.counts[cls]:
            del self.by_class[cls]
            del self.counts[cls]
            return True
        return False


def sort_key(job: Job, aging_s: float | None, ready_since: float) -> float:
    """Lower first: higher priority, and with aging, longer waiting (see the module docstring)."""
    priority = job.opts.priority
    if aging_s:
        return -(priority - ready_since / aging_s)
    return float(-priority)


ReadyClass = ClassKey
LimitedClass = tuple[ClassKey, tuple[str, ...]]  # (the class, the limit keys)

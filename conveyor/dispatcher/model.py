"""The dispatcher's records: job states, jobs, workers, and the actions the scheduler emits (a job's
options are the protocol's TaskOptions: conveyor/protocol/commands.py).

Plain data with no behaviour beyond validation; `scheduler.py` holds the rules that move them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from conveyor.dispatcher.graph import Node
from conveyor.protocol.commands import TaskOptions

WAITING = "waiting"  # waits for its parents to finish (graph.py)
SCHEDULED = "scheduled"  # not due yet (eta, countdown): waits in the dispatcher, on a timer
LIMITED = "limited"  # waits for its limit keys to allow a start (limits.py)
QUEUED = "queued"  # could be assigned now: waits for a worker with room
RUNNING = "running"  # assigned to a worker (prefetched ones too)
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
EXPIRED = "expired"  # not started by its expiry time
FINISHED_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
WAITING_STATES = frozenset({WAITING, SCHEDULED, LIMITED, QUEUED})  # accepted, not started

ClassKey = tuple[str | None, frozenset[str]]  # (mode or None, required tags)
MAX_BACKOFF = 300.0


_NO_INFO: dict[str, Any] = {}
_NO_FRAMES: list[Any] = []
NO_HISTORY: list[dict[str, Any]] = []  # shared by every job that never ran: replaced, never appended to


class Job:
    __slots__ = (
        "attempt",
        "delivered",
        "due",
        "expires",
        "failures",
        "finished_at",
        "frames",
        "history",
        "id",
        "infra_failures",
        "node",
        "opts",
        "owner",
        "result_frames",
        "result_info",
        "retry_at",
        "seq",
        "state",
        "submitted_at",
        "unacked",
        "watchers",
        "worker",
    )

    def __init__(self, job_id: str, opts: TaskOptions, frames: list[Any], owner: bytes | None, seq: int, now: float):
        self.id = job_id
        self.opts = opts
        self.frames: list[Any] | None = frames
        self.owner = owner
        self.seq = seq
        self.state = QUEUED
        self.attempt = 0
        self.worker: bytes | None = None
        self.history: list[dict[str, Any]] = NO_HISTORY
        self.due: float | None = None  # not before this (monotonic), while scheduled
        self.expires: float | None = None  # expired if not started by this (monotonic)
        self.node: Node | None = None  # its parents and dependants, if it has any (graph.py)
        self.failures = 0
        self.infra_failures = 0
        self.submitted_at = now
        self.finished_at: float | None = None
        self.retry_at: float | None = None
        # Shared empty values until the job finishes (then replaced, never changed in place): a queued
        # job costs less memory, which counts with a million of them.
        self.result_info: dict[str, Any] = _NO_INFO
        self.result_frames: list[Any] = _NO_FRAMES
        self.watchers: set[bytes] | None = None
        self.unacked = 0  # deliveries to clients not yet acknowledged (deliveries.py)
        self.delivered = False  # some client acknowledged its outcome

    @property
    def class_key(self) -> ClassKey:
        return self.opts.class_key


@dataclass(slots=True)
class WorkerInfo:
    id: bytes
    name: str
    host: str
    pid: int
    mode: str
    concurrency: int
    tags: frozenset[str]
    credit: int
    last_seen: float
    registered_at: float
    running: dict[str, int] = field(default_factory=dict)  # job id -> attempt
    done: int = 0
    draining: bool = False
    classes: dict[ClassKey, None] = field(default_factory=dict)  # queue classes it can serve (an ordered set)
    session: str = ""  # the worker's connection; a READY with a new one means a new connection
    prefetch: int = 0  # most jobs it may hold beyond its slots, queued on the worker
    prefetch_auto: bool = False  # hold only as many as its recent task durations justify (window)
    window: int = 0  # jobs held beyond the slots right now: prefetch, or less when prefetch_auto
    mean_duration: float | None = None  # moving average of its tasks' run time (seconds), once known
    results_next: int = 1  # the RESULTS number it applies next: RESULTS are applied in order (§5)
    resend_asked: int = 0  # the number a RESEND last asked for (asked once per gap)

    @property
    def results_acked(self) -> int:
        """The highest RESULTS number applied: what ASSIGN and HEARTBEAT acknowledge."""
        return self.results_next - 1

    @property
    def capacity(self) -> int:
        """Most jobs the worker may hold at once: its slots plus its prefetch window."""
        return self.concurrency + self.window

    def serves(self, key: ClassKey) -> bool:
        mode, tags = key
        return (mode is None or mode == self.mode) and tags <= self.tags


# --- actions: what the socket loop must send ----------------------------------------------------


@dataclass(slots=True)
class Assign:
    worker: bytes
    jobs: list[Job]


@dataclass(slots=True)
class CancelRunning:
    worker: bytes
    job_id: str
    attempt: int


@dataclass(slots=True)
class Deliver:
    client: bytes
    jobs: list[Job]
    seq: int  # this JOB_DONE's number in the client's sequence (deliveries.py)
    withhold: frozenset[str] = frozenset()  # jobs sent without their result (their dependants use it)


@dataclass(slots=True)
class Resend:
    """Ask a worker to send again its RESULTS from `seq` on (one went missing)."""

    worker: bytes
    seq: int


Action = Assign | CancelRunning | Deliver | Resend


# --- clocks: the scheduler keeps monotonic times; peers and the journal get wall-clock ones -------------


def wall_clock_offset() -> float:
    """Add to a reading of time.monotonic() to get Unix time (now: it moves if the wall clock is set)."""
    return time.time() - time.monotonic()


def shift_history(history: list[dict[str, Any]], offset: float) -> list[dict[str, Any]]:
    """Attempt records with `started` and `finished` moved by offset (monotonic <-> wall clock)."""
    out = []
    for h in history:
        h = dict(h)
        if isinstance(h.get("started"), int | float):
            h["started"] += offset
        if isinstance(h.get("finished"), int | float):
            h["finished"] += offset
        out.append(h)
    return out


def wall_clock_view(view: dict[str, Any], offset: float) -> dict[str, Any]:
    """A job view (Scheduler.job_view) with its times in wall-clock: history, submitted, finished, retry, due,
    expiry."""
    view["history"] = shift_history(view["history"], offset)
    for key in ("submitted_at", "finished_at", "retry_at", "due_at", "expires_at"):
        if view.get(key) is not None:
            view[key] += offset
    return view

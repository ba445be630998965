"""What a running task can use from Conveyor: `conveyor.progress(fraction, message)`,
`conveyor.current_job()`, and `conveyor.Failed`, what it receives for a parent that did not succeed
where its edge allows that (`allow_failure`).

This module is all a task imports, and it loads no worker code: the worker plugs in where reports go
(conveyor/worker/capture.py sets the current task's reporter), so `import conveyor` in a client stays
light. Outside a task every function here does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class Reporter(Protocol):
    """Where the current task's reports go (the worker's side)."""

    def progress(self, fraction: float | None, message: str | None) -> None: ...


class Lender(Protocol):
    """A mode that lends a task's slot while the task waits for a child (conveyor.current_client())."""

    def lend(self, job: tuple[str, int]) -> None: ...

    def back(self, job: tuple[str, int]) -> None: ...

    # And optionally blocks_loop() -> bool: True if a blocking wait in this thread would stop the tasks'
    # event loop (asyncio mode, on its loop thread).


# Where a worker's tasks reach its dispatcher as clients (conveyor.current_client()): set by the worker
# for itself and its children. A worker with keys sets it only if its key directory holds a client key
# pair too (its own keys are a worker's, not a client's), and names that directory in TASK_KEYS_ENV.
TASK_DISPATCHER_ENV = "CONVEYOR_TASK_DISPATCHER"
TASK_KEYS_ENV = "CONVEYOR_TASK_KEYS"
# Why tasks here can have no client at all, whatever the worker gives (set by interpreters mode's entry).
no_client: str | None = None


def in_task() -> bool:
    """True in code a worker runs as a task (any mode)."""
    return running.get() is not None or current.get() is not None or process_reporter is not None


# The task this thread or asyncio task runs (threads and asyncio modes)...
current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("conveyor_task", default=None)
# ...or, in a processes-mode child, the reporter of the one task the child runs at a time.
process_reporter: Reporter | None = None
# (job id, attempt) of the job this thread, asyncio task or child runs: set by the worker around each
# call (conveyor/worker/execution.py), in every mode; parsed only when current_job() asks.
running: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("conveyor_job", default=None)
# The mode that runs this thread's task, if it can lend the task's slot while it waits (threads mode).
lender: contextvars.ContextVar[Lender | None] = contextvars.ContextVar("conveyor_lender", default=None)


@contextlib.contextmanager
def slot_lent(blocking: bool = True) -> Iterator[None]:
    """Around a task's wait for a child: its worker may start one more task meanwhile (Ray's rule), so a
    one-slot worker whose task waits on its own child does not deadlock. Elsewhere: nothing. A blocking
    wait on the event loop of asyncio mode raises instead (it would stop every task there, the child too)."""
    mode, job = lender.get(), running.get()
    if mode is None or job is None:
        yield
        return
    blocks_loop = getattr(mode, "blocks_loop", None)
    if blocking and blocks_loop is not None and blocks_loop():
        raise RuntimeError(
            "a coroutine task blocks the event loop waiting for its child: `await` the future instead of "
            "calling result() (or wait() / as_completed())"
        )
    mode.lend(job)
    try:
        yield
    finally:
        mode.back(job)


@dataclass(frozen=True, slots=True)
class JobContext:
    """The job a task runs as (`conveyor.current_job()`), for idempotent tasks (execution is at-least-once)."""

    job_id: str
    attempt: int  # 1 for the first run; a retry or a re-run after a lost worker counts up
    schedule: str | None = None  # the schedule that created the job (ids sched:NAME:...), else None
    slot: datetime | None = None  # its slot, in UTC; None for a manual trigger (sched:NAME:manual:N)


def current_job() -> JobContext | None:
    """The running job's id and attempt, and for a scheduled run its schedule and slot; None outside a task.

    Inside a task in any mode (threads, processes, asyncio, interpreters). A thread the task starts
    itself does not inherit it (as with any context variable): pass the value along."""
    job = running.get()
    if job is None:
        return None
    job_id, attempt = job
    if not job_id.startswith("sched:"):
        return JobContext(job_id, attempt)
    _, name, stamp = job_id.split(":", 2)
    try:
        slot = None if stamp.startswith("manual:") else datetime.fromisoformat(stamp)
    except ValueError:  # not an id a schedule made
        return JobContext(job_id, attempt)
    return JobContext(job_id, attempt, name, slot)


def progress(fraction: float | None = None, message: str | None = None) -> None:
    """Report how far the current task has got: `fraction` from 0 to 1 (or None), and a short message.

    `conveyor result JOB_ID` and the dashboard show the latest report while the job runs. Outside a
    task this does nothing. Reports are cheap: the worker sends only the latest a few times a second.
    """
    if fraction is not None:
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0:  # also rejects NaN
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction}")
    if message is not None:
        message = str(message)[:1000]
    reporter = current.get() or process_reporter
    if reporter is not None:
        reporter.progress(fraction, message)


class Failed:
    """A parent's failure, passed to a dependant in place of its result where the edge allows it
    (`options(allow_failure=[fut])`). `error` is the parent's exception as its own future raises it,
    `job_id` the parent's id and `state` how it ended (failed, cancelled or expired)."""

    __slots__ = ("error", "job_id", "state")

    def __init__(self, error: BaseException, job_id: str = "", state: str = "failed"):
        self.error = error
        self.job_id = job_id
        self.state = state

    def __repr__(self) -> str:
        return f"Failed({type(self.error).__name__}: {self.error}, job_id={self.job_id!r}, state={self.state!r})"

    def __bool__(self) -> bool:
        return False  # `if value:` tells a failed parent from a result (most results are truthy)

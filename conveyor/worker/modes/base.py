"""What every execution mode provides, and the timeout/cancel supervision they share.

A mode runs at most `concurrency` tasks at once (the dispatcher's credit guarantees it is never
given more) and turns each Task into an Outcome. Adding a mode (say, subinterpreters) means one
new subclass registered in `modes/__init__.py`; the dispatcher and the worker loop do not change.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable
from typing import Any, ClassVar

from conveyor.errors import TaskTimeout
from conveyor.protocol import errors as perr
from conveyor.worker.execution import Outcome, Task, infra_failure, is_retryable


class Mode(abc.ABC):
    name: ClassVar[str]

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self._cancel_events: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        """Prepare threads, loops or child processes."""

    @abc.abstractmethod
    async def run(self, task: Task) -> Outcome:
        """Run one task to its outcome, honouring its timeout and cancellation."""

    async def shutdown(self) -> None:
        """Release everything start() made. Running tasks have been handed back or finished by now."""

    def cancel(self, job_id: str) -> None:
        """Stop a running task (best effort per mode); its run() returns a 'cancelled' outcome."""
        event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()

    @abc.abstractmethod
    def abort(self, task: Task, reason: BaseException) -> None:
        """Mode-specific interruption of a task that timed out or was cancelled."""

    async def supervise(self, task: Task, work: Awaitable[Outcome]) -> Outcome:
        """Wait for work, but no longer than the task's timeout and no longer than until it is cancelled."""
        cancelled = self._cancel_events[task.job_id] = asyncio.Event()
        work_f = asyncio.ensure_future(work)
        cancel_f = asyncio.ensure_future(cancelled.wait())
        try:
            done, _ = await asyncio.wait(
                {work_f, cancel_f}, timeout=task.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            cancel_f.cancel()
            del self._cancel_events[task.job_id]
        if work_f in done:
            return work_f.result()
        work_f.add_done_callback(_consume)  # the interrupted work still finishes; its outcome is dropped
        if cancel_f in done:
            self.abort(task, perr_cancelled())
            return infra_failure(task, perr.CANCELLED, "JobCancelled", "the job was cancelled")
        timeout_exc = TaskTimeout(f"the task ran longer than its {task.timeout:g} s timeout")
        self.abort(task, timeout_exc)
        out = infra_failure(task, perr.TIMEOUT, "TaskTimeout", str(timeout_exc))
        out.info["retryable"] = is_retryable(timeout_exc, task.retry_on)
        return out


def perr_cancelled() -> BaseException:
    from conveyor.errors import JobCancelled

    return JobCancelled("the job was cancelled")


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()

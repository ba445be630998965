"""What every execution mode provides, and the timeout/cancel supervision they share.

A mode runs at most `concurrency` tasks at once and turns each Task into an Outcome. The worker
hands it at most `concurrency` tasks, or, for a mode that queues tasks itself (`takes_backlog`),
its prefetched ones too. Adding a mode (say, subinterpreters) means one
new subclass registered in `modes/__init__.py`; the dispatcher and the worker loop do not change.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from conveyor.errors import JobCancelled, TaskTimeout
from conveyor.protocol import failures as perr
from conveyor.worker.capture import TaskReports
from conveyor.worker.execution import Outcome, Task, failure, infra_failure, is_retryable

log = logging.getLogger("conveyor.worker")

Done = Callable[[Task, Outcome], None]  # how a mode reports an ended task to the worker, on its loop


class Mode(abc.ABC):
    name: ClassVar[str]
    # True: the mode queues submitted tasks itself and starts them as slots free up (see withdraw);
    # the worker then submits prefetched tasks at once instead of one per freed slot.
    takes_backlog: ClassVar[bool] = False
    # Set by the worker before start(): where tasks' progress goes, and whether their output is captured.
    reports: TaskReports | None = None
    capture_output: bool = True

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self._stoppers: dict[tuple[str, int], Callable[[], None]] = {}
        self._runners: set[asyncio.Task[None]] = set()  # the tasks submit() started; they end themselves

    async def start(self) -> None:
        """Prepare threads, loops or child processes."""

    @abc.abstractmethod
    async def run(self, task: Task) -> Outcome:
        """Run one task to its outcome, honouring its timeout and cancellation."""

    def submit(self, task: Task, done: Done) -> None:
        """Start a task (or, with `takes_backlog`, queue it); done(task, outcome) is called on the
        worker's loop when it has ended.

        This default runs `run` in an asyncio task held by the mode. A mode may start tasks more
        cheaply (threads and asyncio modes do, for tasks without a timeout), as long as `cancel`
        still works.
        """
        runner = asyncio.get_running_loop().create_task(self._run_and_report(task, done))
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)

    async def guarded(self, task: Task, work: Awaitable[Outcome]) -> Outcome:
        """work's outcome; a cancellation or a bug in the mode becomes the task's outcome, not the worker's end."""
        try:
            return await work
        except asyncio.CancelledError:  # the loop running it is closing under it
            return infra_failure(task, perr.CANCELLED, "JobCancelled", "the job was cancelled")
        except Exception as exc:
            log.exception("mode %s failed running %s", self.name, task.job_id)
            return failure(task, exc)

    def withdraw(self, key: tuple[str, int]) -> bool:
        """Take back a submitted task that waits for a slot (it never starts, and is not reported)."""
        return False

    async def _run_and_report(self, task: Task, done: Done) -> None:
        outcome = await self.guarded(task, self.run(task))
        done(task, outcome)

    async def shutdown(self) -> None:
        """Release everything start() made. Running tasks have been handed back or finished by now."""

    def cancel(self, key: tuple[str, int]) -> None:
        """Stop a running task (best effort per mode); it ends with a 'cancelled' outcome. For a task
        started without `run` (see submit), `done` may be called before this returns."""
        stop = self._stoppers.get(key)
        if stop is not None:
            stop()

    @abc.abstractmethod
    def abort(self, task: Task, reason: BaseException) -> None:
        """Mode-specific interruption of a task that timed out or was cancelled."""

    async def supervise(self, task: Task, work: Awaitable[Outcome]) -> Outcome:
        """Wait for work, but no longer than the task's timeout and no longer than until it is cancelled."""
        loop = asyncio.get_running_loop()
        work_f = asyncio.ensure_future(work)
        verdict: asyncio.Future[str] = loop.create_future()

        def decide(why: str) -> None:
            if not verdict.done():
                verdict.set_result(why)

        work_f.add_done_callback(lambda _: decide("done"))
        self._stoppers[task.key] = lambda: decide("cancelled")
        timer = loop.call_later(task.timeout, decide, "timeout") if task.timeout else None
        try:
            why = await verdict
        finally:
            self._stoppers.pop(task.key, None)
            if timer is not None:
                timer.cancel()
        if why == "done":
            return work_f.result()
        if why == "cancelled":
            reason: BaseException = JobCancelled("the job was cancelled")
            out = infra_failure(task, perr.CANCELLED, "JobCancelled", str(reason))
        else:
            reason = TaskTimeout(f"the task ran longer than its {task.timeout:g} s timeout")
            out = infra_failure(task, perr.TIMEOUT, "TaskTimeout", str(reason))
            out.info["retryable"] = is_retryable(reason, task.retry_on)
        self.abort(task, reason)
        # Not started yet: cancelling the future keeps it from starting. Started: the mode's abort stops
        # it (or, in threads mode, tries to); whatever it still returns is dropped.
        work_f.cancel()
        work_f.add_done_callback(_consume)
        return out


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()

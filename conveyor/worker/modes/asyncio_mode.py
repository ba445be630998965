"""asyncio mode: coroutine tasks run concurrently on one event loop, in one thread.

The loop lives in its own thread so that a task that blocks it cannot stop the worker's heartbeats.
Thousands of tasks waiting on I/O cost one coroutine each, and since they switch only at `await`, they
need no locks between awaits. A plain (non-async) function would block every task on the loop, so it
runs in the loop's default thread pool instead (`asyncio.to_thread`). Tasks cross between the two loops
in batches: one wake-up of the task loop starts every task submitted since the last one, and one
wake-up of the worker's loop reports every task finished meanwhile. A stopped task is cancelled
(CancelledError at its current await).

A task waiting on its own child (conveyor.current_client()) lends its slot: `await fut` in a coroutine,
or a blocking result(), wait() or as_completed() in a plain function (which runs in a thread). The
worker is told (on_lend) and may hand this mode one more task, which the loop simply runs too. A
blocking wait on the loop itself raises a RuntimeError saying to await (it would stop the loop, and the
child with it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor import task as task_api
from conveyor.protocol import failures as perr
from conveyor.worker.execution import Key, Outcome, Task, failure, infra_failure, run_async
from conveyor.worker.modes import inproc_capture
from conveyor.worker.modes.base import Mode, ModeSettings, Report
from conveyor.worker.reports import TaskReports

log = logging.getLogger("conveyor.worker")


@dataclass(slots=True, eq=False)
class _Item:
    task: Task
    dropped: bool = False  # stopped: it does not start, or its outcome is not reported
    runner: asyncio.Task[None] | None = field(default=None)  # on the task loop, once started


class AsyncioMode(Mode):
    name = "asyncio"

    def __init__(self, settings: ModeSettings, reports: TaskReports | None = None):
        super().__init__(settings, reports)
        self._loop: asyncio.AbstractEventLoop | None = None  # the task loop
        self._thread: threading.Thread | None = None
        self._worker_loop: asyncio.AbstractEventLoop | None = None
        self._report: Report | None = None
        self._items: dict[Key, _Item] = {}  # submitted and not yet reported or stopped (worker's loop)
        self._runners: set[asyncio.Task[None]] = set()  # held until they end (task loop)
        self._lock = threading.Lock()
        self._inbox: list[_Item] = []  # worker loop -> task loop, one wake-up per batch
        self._finished: list[tuple[_Item, Outcome]] = []  # task loop -> worker loop, likewise
        self._inbox_wake = self._finished_wake = False

    @classmethod
    def default_concurrency(cls) -> int:
        return 1000

    async def start(self, report: Report) -> None:
        self._report = report
        if self.capture_output:
            inproc_capture.install()  # sys.stdout/stderr and logging, routed per task
        ready = threading.Event()
        self._worker_loop = asyncio.get_running_loop()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        self._thread = threading.Thread(target=serve, name="conveyor-asyncio", daemon=True)
        self._thread.start()
        await asyncio.to_thread(ready.wait)

    def submit(self, tasks: Sequence[Task]) -> None:
        loop = self._loop
        assert loop is not None, "submit before start"
        items = [_Item(task) for task in tasks]
        for item in items:
            self._items[item.task.key] = item
        with self._lock:
            self._inbox.extend(items)
            wake, self._inbox_wake = not self._inbox_wake, True
        if wake:
            loop.call_soon_threadsafe(self._start_inbox)

    def _start_inbox(self) -> None:
        """On the task loop: start every task submitted since the last wake-up."""
        with self._lock:
            items, self._inbox = self._inbox, []
            self._inbox_wake = False
        loop = asyncio.get_running_loop()
        for item in items:
            if not item.dropped:
                runner = loop.create_task(self._run(item))
                item.runner = runner  # set before its first step: a stop can cancel it from now on
                self._runners.add(runner)
                runner.add_done_callback(self._runners.discard)

    async def _run(self, item: _Item) -> None:
        task = item.task
        task_api.lender.set(self)  # in this asyncio task's own context (and the threads it copies it to)
        ctx = inproc_capture.enter(self.reports, task.key) if self.reports is not None else None
        try:
            outcome = await run_async(task)
        except asyncio.CancelledError:  # stopped (its outcome was decided already), or the loop is closing
            outcome = infra_failure(task, perr.CANCELLED, "JobCancelled", "the job was cancelled")
        except Exception as exc:  # a bug here, not in the task (run_async catches the task's own)
            log.exception("asyncio mode failed running %s", task.job_id)
            outcome = failure(task, exc)
        finally:
            if ctx is not None:
                inproc_capture.leave(ctx)
        with self._lock:
            self._finished.append((item, outcome))
            wake, self._finished_wake = not self._finished_wake, True
        if wake and self._worker_loop is not None:
            try:
                self._worker_loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                pass  # the worker's loop has closed: nobody waits for this outcome

    def lend(self, job: Key) -> None:
        """A task waits on its child (on the task loop, or in a thread of a plain function): tell the worker."""
        self._tell(job, True)

    def back(self, job: Key) -> None:
        self._tell(job, False)

    def blocks_loop(self) -> bool:
        return self._thread is not None and threading.get_ident() == self._thread.ident

    def _tell(self, job: Key, lent: bool) -> None:
        if self._worker_loop is not None and self.on_lend is not None:
            try:
                self._worker_loop.call_soon_threadsafe(self.on_lend, job, lent)
            except RuntimeError:
                pass  # the worker's loop has closed

    def _deliver(self) -> None:
        """On the worker's loop: report every task finished since the last wake-up."""
        with self._lock:
            finished, self._finished = self._finished, []
            self._finished_wake = False
        items = self._items
        outcomes = [o for item, o in finished if not item.dropped and items.pop(item.task.key, None) is item]
        if outcomes and self._report is not None:
            self._report(outcomes)

    def stop(self, key: Key, reason: BaseException) -> None:
        item = self._items.pop(key, None)
        loop = self._loop
        if item is None or loop is None:
            return
        item.dropped = True  # still in the inbox: it never starts

        def cancel() -> None:
            if item.runner is not None:
                item.runner.cancel()

        try:
            loop.call_soon_threadsafe(cancel)  # after _start_inbox if that is queued: it finds the runner
        except RuntimeError:
            pass  # the task loop has stopped

    async def shutdown(self) -> None:
        if self.capture_output:
            inproc_capture.uninstall()
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 5)

"""asyncio mode: coroutine tasks run concurrently on one event loop, in one thread.

The loop lives in its own thread so that a task that blocks it cannot stop the worker's
heartbeats. Thousands of tasks waiting on I/O cost one coroutine each, and since they switch only
at `await`, they need no locks between awaits. A plain (non-async) function would block every
task on the loop, so it runs in the loop's default thread pool instead (`asyncio.to_thread`).
Cancellation and timeouts cancel the task (CancelledError at its current await).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from conveyor.errors import JobCancelled
from conveyor.protocol import failures as perr
from conveyor.worker import capture
from conveyor.worker.execution import Outcome, Task, infra_failure, run_async
from conveyor.worker.modes.base import Done, Mode


@dataclass(slots=True)
class _Item:
    """A task without a timeout, started and reported in batches between the two loops."""

    task: Task
    done: Done
    dropped: bool = False  # cancelled: it does not start, or its outcome is ignored


class AsyncioMode(Mode):
    name = "asyncio"

    def __init__(self, concurrency: int):
        super().__init__(concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[tuple[str, int], asyncio.Task[Outcome]] = {}  # owned by the task loop's thread
        self._direct: dict[tuple[str, int], _Item] = {}  # owned by the worker's loop
        self._direct_runners: set[asyncio.Task[None]] = set()  # owned by the task loop's thread
        self._worker_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._inbox: list[_Item] = []  # worker loop -> task loop, one wake-up per batch
        self._finished: list[tuple[_Item, Outcome]] = []  # task loop -> worker loop, likewise
        self._inbox_wake = self._finished_wake = False

    async def start(self) -> None:
        if self.reports is not None and self.capture_output:
            capture.install()  # sys.stdout/stderr and logging, routed per task
        ready = threading.Event()
        self._worker_loop = asyncio.get_running_loop()  # where outcomes of direct tasks are delivered

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

    async def _run_here(self, task: Task) -> Outcome:
        current = asyncio.current_task()
        assert current is not None
        self._tasks[task.key] = current
        ctx = capture.enter(self.reports, task.key) if self.reports is not None else None
        try:
            return await run_async(task)
        finally:
            self._tasks.pop(task.key, None)
            if ctx is not None:
                capture.leave(ctx)

    def submit(self, task: Task, done: Done) -> None:
        if task.timeout is not None or self._loop is None:
            super().submit(task, done)  # supervised: its timer runs on the worker's loop
            return
        item = _Item(task, done)
        self._direct[task.key] = item
        with self._lock:
            self._inbox.append(item)
            wake, self._inbox_wake = not self._inbox_wake, True
        if wake:
            self._loop.call_soon_threadsafe(self._start_inbox)

    def _start_inbox(self) -> None:
        """On the task loop: start every task submitted since the last wake-up."""
        with self._lock:
            items, self._inbox = self._inbox, []
            self._inbox_wake = False
        loop = asyncio.get_running_loop()
        for item in items:
            if not item.dropped:
                runner = loop.create_task(self._run_direct(item))
                self._direct_runners.add(runner)  # held until it ends
                runner.add_done_callback(self._direct_runners.discard)

    async def _run_direct(self, item: _Item) -> None:
        outcome = await self.guarded(item.task, self._run_here(item.task))
        with self._lock:
            self._finished.append((item, outcome))
            wake, self._finished_wake = not self._finished_wake, True
        if wake and self._worker_loop is not None:
            try:
                self._worker_loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                pass  # the worker's loop has closed: nobody waits for this outcome

    def _deliver(self) -> None:
        """On the worker's loop: report every task finished since the last wake-up."""
        with self._lock:
            finished, self._finished = self._finished, []
            self._finished_wake = False
        for item, outcome in finished:
            if not item.dropped:
                del self._direct[item.task.key]
                item.done(item.task, outcome)

    def cancel(self, key: tuple[str, int]) -> None:
        item = self._direct.pop(key, None)
        if item is None:
            super().cancel(key)
            return
        item.dropped = True
        reason = JobCancelled("the job was cancelled")
        self.abort(item.task, reason)
        item.done(item.task, infra_failure(item.task, perr.CANCELLED, "JobCancelled", str(reason)))

    async def run(self, task: Task) -> Outcome:
        assert self._loop is not None
        cf = asyncio.run_coroutine_threadsafe(self._run_here(task), self._loop)
        return await self.supervise(task, asyncio.wrap_future(cf))

    def abort(self, task: Task, reason: BaseException) -> None:
        loop = self._loop
        if loop is None:
            return

        def cancel() -> None:
            t = self._tasks.get(task.key)
            if t is not None:
                t.cancel()

        loop.call_soon_threadsafe(cancel)

    async def shutdown(self) -> None:
        if self.reports is not None and self.capture_output:
            capture.uninstall()
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 5)

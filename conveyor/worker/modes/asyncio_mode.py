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

from conveyor.worker import capture
from conveyor.worker.execution import Outcome, Task, run_async
from conveyor.worker.modes.base import Mode


class AsyncioMode(Mode):
    name = "asyncio"

    def __init__(self, concurrency: int):
        super().__init__(concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[tuple[str, int], asyncio.Task[Outcome]] = {}  # owned by the task loop's thread

    async def start(self) -> None:
        if self.reports is not None and self.capture_output:
            capture.install()  # sys.stdout/stderr and logging, routed per task
        ready = threading.Event()

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

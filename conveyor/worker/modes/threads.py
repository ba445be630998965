"""threads mode: tasks run in a pool of threads inside the worker process.

They share the worker's memory and, in CPython with the GIL, one core for Python code. A task that
times out or is cancelled gets an exception raised asynchronously in its thread
(PyThreadState_SetAsyncExc): it lands at the next Python bytecode, so pure-Python code stops
promptly, but a thread blocked in C (a socket read, time.sleep) only stops when that call returns.
The worker reports the task as failed at once and starts a replacement thread, so capacity stays.
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import threading
from dataclasses import dataclass

from conveyor.errors import JobCancelled, TaskTimeout
from conveyor.protocol import failures as perr
from conveyor.worker import capture
from conveyor.worker.execution import Outcome, Task, infra_failure, run_sync
from conveyor.worker.modes.base import Done, Mode


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class _Item:
    task: Task
    future: asyncio.Future[Outcome] | None  # a task with a timeout: supervised, run() waits on this
    loop: asyncio.AbstractEventLoop
    done: Done | None = None  # any other task: reported straight to the worker (no asyncio task per job)
    thread: int | None = None  # while it runs
    started: bool = False
    dropped: bool = False  # cancelled: its thread skips it, or its outcome is ignored


def _set_if_pending(fut: asyncio.Future[Outcome], outcome: Outcome) -> None:
    """Runs on the worker's loop: the future may have been cancelled meanwhile."""
    if not fut.done():
        fut.set_result(outcome)


class ThreadsMode(Mode):
    name = "threads"
    takes_backlog = True  # the threads take tasks from one queue: no trip through the loop per task

    def __init__(self, concurrency: int):
        super().__init__(concurrency)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._running: dict[tuple[str, int], _Item] = {}
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._target = concurrency
        self._busy: set[_Item] = set()  # the items threads are running (an abandoned one leaves it)
        self._finished: list[tuple[_Item, Outcome]] = []  # handed to the loop in batches
        self._wake_pending = False

    async def start(self) -> None:
        if self.reports is not None and self.capture_output:
            capture.install()  # sys.stdout/stderr and logging, routed per task
        for _ in range(self.concurrency):
            self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._serve, name=f"conveyor-task-{len(self._threads)}", daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                if not self._serve_one():
                    break
            except (TaskTimeout, JobCancelled):
                pass  # an interruption that landed just after its task had finished: this thread goes on
        with self._lock:
            self._threads.discard(me)

    def _serve_one(self) -> bool:
        """Run one queued task; False when this thread should exit."""
        item = self._queue.get()
        if item is None:
            return False
        with self._lock:  # decided together with cancel(): it either starts here or never
            if item.dropped or (item.future is not None and item.future.cancelled()):
                return True  # timed out or cancelled before it started
            item.thread = threading.get_ident()
            item.started = True
            self._busy.add(item)
        reports = self.reports
        if reports is None:
            outcome = run_sync(item.task)
        else:
            ctx = capture.enter(reports, item.task.key)
            try:
                outcome = run_sync(item.task)
            finally:
                capture.leave(ctx)
        with self._lock:
            item.thread = None
            self._busy.discard(item)
            self._finished.append((item, outcome))
            wake = not self._wake_pending
            self._wake_pending = True
            more = len(self._threads) <= self._target  # False: a replacement took this thread's place
        if wake:  # one wake-up of the loop for however many tasks finish before it runs
            try:
                item.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                pass  # the worker's loop has closed (an abandoned task outlived the worker): nobody waits
        return more

    def _deliver(self) -> None:
        """On the worker's loop: resolve every task finished since the last wake-up."""
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake_pending = False
        for item, outcome in finished:
            if item.future is not None:
                _set_if_pending(item.future, outcome)
            elif not item.dropped and item.done is not None:
                self._running.pop(item.task.key, None)
                item.done(item.task, outcome)

    def submit(self, task: Task, done: Done) -> None:
        if task.timeout is not None:
            super().submit(task, done)  # supervised: a timer and an asyncio task
            return
        item = _Item(task, None, asyncio.get_running_loop(), done)
        self._running[task.key] = item
        self._queue.put(item)

    def cancel(self, key: tuple[str, int]) -> None:
        item = self._running.get(key)
        if item is None or item.done is None:
            super().cancel(key)
            return
        reason = JobCancelled("the job was cancelled")
        with self._lock:
            item.dropped = True  # not started: its thread will skip it
        self.abort(item.task, reason)  # started: stop its thread
        del self._running[key]
        item.done(item.task, infra_failure(item.task, perr.CANCELLED, "JobCancelled", str(reason)))

    def withdraw(self, key: tuple[str, int]) -> bool:
        item = self._running.get(key)
        if item is None or item.done is None:
            return False  # supervised tasks (with a timeout) are only submitted to a free slot
        with self._lock:
            if item.started or item.dropped:
                return False  # running or ran (or already cancelled)
            if self._next_for_an_idle_thread(item):
                return False  # not waiting for a slot: a free thread is about to take it
            item.dropped = True
        del self._running[key]
        return True

    def _next_for_an_idle_thread(self, item: _Item) -> bool:
        """True if item is among the first queued items that the idle threads will take (under the lock)."""
        idle = self._target - len(self._busy)
        if idle <= 0:
            return False
        for queued in self._running.values():  # in queue order
            if queued.started or queued.dropped:
                continue
            if queued is item:
                return True
            idle -= 1
            if idle == 0:
                return False
        return False

    async def run(self, task: Task) -> Outcome:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        item = _Item(task, future, loop)
        self._running[task.key] = item
        self._queue.put(item)
        try:
            return await self.supervise(task, future)
        finally:
            self._running.pop(task.key, None)

    def abort(self, task: Task, reason: BaseException) -> None:
        item = self._running.get(task.key)
        if item is None:
            return
        with self._lock:  # the thread cannot move on to another task while we aim at it
            thread = item.thread
            if thread is None:
                return  # not started (it will be skipped) or already finished
            hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(type(reason)))
            if hit == 1:
                self._busy.discard(item)  # its thread is abandoned; a new one takes its place
        if hit == 1:
            self._spawn()  # keep `concurrency` threads free to take new tasks meanwhile

    async def shutdown(self) -> None:
        if self.reports is not None and self.capture_output:
            capture.uninstall()
        with self._lock:
            self._target = 0
            n = len(self._threads)
        for _ in range(n):
            self._queue.put(None)

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

from conveyor.worker.execution import Outcome, Task, run_sync
from conveyor.worker.modes.base import Mode


@dataclass(slots=True)
class _Item:
    task: Task
    future: asyncio.Future[Outcome]
    loop: asyncio.AbstractEventLoop
    thread: int | None = None


def _set_if_pending(fut: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not fut.done():
        fut.set_result(outcome)


class ThreadsMode(Mode):
    name = "threads"

    def __init__(self, concurrency: int):
        super().__init__(concurrency)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._running: dict[str, _Item] = {}
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._target = concurrency

    async def start(self) -> None:
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
            item = self._queue.get()
            if item is None:
                break
            item.thread = threading.get_ident()
            outcome = run_sync(item.task)
            item.thread = None
            item.loop.call_soon_threadsafe(_set_if_pending, item.future, outcome)
            with self._lock:
                if len(self._threads) > self._target:  # a replacement took this thread's place
                    break
        with self._lock:
            self._threads.discard(me)

    async def run(self, task: Task) -> Outcome:
        loop = asyncio.get_running_loop()
        item = _Item(task, loop.create_future(), loop)
        self._running[task.job_id] = item
        self._queue.put(item)
        try:
            return await self.supervise(task, item.future)
        finally:
            self._running.pop(task.job_id, None)

    def abort(self, task: Task, reason: BaseException) -> None:
        item = self._running.get(task.job_id)
        thread = item.thread if item is not None else None
        if thread is None:
            return  # not started yet: the thread will run it, and its outcome is dropped
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(type(reason)))
        self._spawn()  # keep `concurrency` threads free to take new tasks meanwhile

    async def shutdown(self) -> None:
        with self._lock:
            self._target = 0
            n = len(self._threads)
        for _ in range(n):
            self._queue.put(None)

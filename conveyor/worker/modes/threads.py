"""threads mode: tasks run in a pool of threads inside the worker process.

They share the worker's memory and, in CPython with the GIL, one core for Python code. A task goes
straight to one idle thread, the one idle the shortest (each waits on a lock of its own), or else into a
backlog that threads take from as they finish; so the worker hands this mode its prefetched tasks too
(`queue_limit`): a thread goes from task to task without waiting for the worker's loop, and finished
tasks are reported in batches, one loop wake-up for however many finish meanwhile. (One shared queue
woke two threads per task once two were idle, and each wake-up costs tens of microseconds:
benchmarks/wakeups.py.)

A task that is stopped (timeout, cancel) gets an exception raised asynchronously in its thread
(PyThreadState_SetAsyncExc): it lands at the next Python bytecode, so pure-Python code stops promptly,
but a thread blocked in C (a socket read, time.sleep) only stops when that call returns. A replacement
thread starts at once, so capacity stays.

A task blocked on its own child (conveyor.current_client()) lends its slot: one more thread starts for
the wait, and the worker is told (on_lend) so one more task may come. When the wait ends, one thread
exits: an idle one, or the next to finish its task.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from _thread import LockType, allocate_lock
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor import task as task_api
from conveyor.errors import JobCancelled, TaskTimeout
from conveyor.worker.execution import Key, Outcome, Task, run_sync
from conveyor.worker.modes import inproc_capture
from conveyor.worker.modes.base import Mode, ModeSettings, Report
from conveyor.worker.reports import TaskReports


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class _Item:
    task: Task
    thread: int | None = None  # while it runs
    started: bool = False
    handed: bool = False  # given to a thread (no longer withdrawable)
    dropped: bool = False  # stopped or withdrawn: its thread skips it, or its outcome is not reported


def _parked_lock() -> LockType:
    lock = allocate_lock()
    lock.acquire()
    return lock


@dataclass(slots=True, eq=False)
class _Parking:
    """Where one idle thread waits: its lock is released once, by whoever hands it a task (or None: exit)."""

    lock: LockType = field(default_factory=_parked_lock)
    item: _Item | None = None


class ThreadsMode(Mode):
    name = "threads"

    def __init__(self, settings: ModeSettings, reports: TaskReports | None = None):
        super().__init__(settings, reports)
        self._backlog: deque[_Item] = deque()  # submitted while no thread was idle, in order
        self._idle: list[_Parking] = []  # threads waiting for a task: the last to go idle is woken first
        self._closing = False
        self._items: dict[Key, _Item] = {}  # submitted and not yet reported, stopped or withdrawn; in order
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._abandoned: set[int] = set()  # threads left running a stopped task: they exit when it returns
        self._retire = 0  # lent slots come back: that many threads exit once idle
        self._busy: set[_Item] = set()  # the items threads are running (an abandoned one leaves it)
        self._finished: list[tuple[_Item, Outcome]] = []  # handed to the loop in batches
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._report: Report | None = None

    @property
    def queue_limit(self) -> int:
        return self.settings.prefetch

    async def start(self, report: Report) -> None:
        self._loop = asyncio.get_running_loop()
        self._report = report
        if self.capture_output:
            inproc_capture.install()  # sys.stdout/stderr and logging, routed per task
        for _ in range(self.concurrency):
            self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._serve, name=f"conveyor-task-{len(self._threads)}", daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        task_api.lender.set(self)  # this thread's tasks may lend their slot (conveyor.task.slot_lent)
        parking = _Parking()
        while True:
            try:
                if not self._serve_one(parking):
                    break
            except (TaskTimeout, JobCancelled):
                pass  # an interruption that landed just after its task had finished: this thread goes on
        with self._lock:
            self._threads.discard(me)

    def _take(self, parking: _Parking) -> _Item | None:
        """The next task for this thread, waiting for one if there is none; None: this thread exits."""
        with self._lock:
            if self._retire:
                self._retire -= 1
                return None  # a lent slot came back: one thread too many
            if self._closing:
                return None
            if self._backlog:
                item = self._backlog.popleft()
                item.handed = True
                return item
            parking.item = None
            self._idle.append(parking)
        parking.lock.acquire()  # until _hand (a task) or _wake_one (None) releases it
        return parking.item

    def _hand(self, item: _Item | None) -> bool:
        """Give an idle thread this task (None: exit), under the lock; False if no thread is idle."""
        if not self._idle:
            return False
        parking = self._idle.pop()
        parking.item = item
        if item is not None:
            item.handed = True
        parking.lock.release()
        return True

    def _serve_one(self, parking: _Parking) -> bool:
        """Run one task; False when this thread should exit."""
        item = self._take(parking)
        if item is None:
            return False
        with self._lock:  # decided together with stop() and withdraw(): it either starts here or never
            if item.dropped:
                return True
            item.thread = threading.get_ident()
            item.started = True
            self._busy.add(item)
        reports = self.reports
        if reports is None:
            outcome = run_sync(item.task)
        else:
            ctx = inproc_capture.enter(reports, item.task.key)
            try:
                outcome = run_sync(item.task)
            finally:
                inproc_capture.leave(ctx)
        with self._lock:
            item.thread = None
            self._busy.discard(item)
            self._finished.append((item, outcome))
            wake = not self._wake_pending
            self._wake_pending = True
            me = threading.get_ident()
            if me in self._abandoned:  # a replacement took this thread's place
                self._abandoned.discard(me)
                more = False
            else:
                more = True
        if wake and self._loop is not None:  # one wake-up of the loop for however many tasks finish before it runs
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                pass  # the worker's loop has closed (an abandoned task outlived the worker): nobody waits
        return more

    def lend(self, job: Key) -> None:
        """On the task's thread, as it blocks on a child: one more thread, and the worker is told."""
        self._spawn()
        self._tell(job, True)

    def back(self, job: Key) -> None:
        """On the task's thread, as its wait ends: one thread fewer, once one is idle."""
        with self._lock:
            if not self._hand(None):  # an idle thread exits now, or else the next to look for a task
                self._retire += 1
        self._tell(job, False)

    def _tell(self, job: Key, lent: bool) -> None:
        if self._loop is not None and self.on_lend is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_lend, job, lent)
            except RuntimeError:
                pass  # the worker's loop has closed

    def _deliver(self) -> None:
        """On the worker's loop: report every task finished since the last wake-up."""
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake_pending = False
        items = self._items
        outcomes = [o for item, o in finished if not item.dropped and items.pop(item.task.key, None) is item]
        if outcomes and self._report is not None:
            self._report(outcomes)

    def submit(self, tasks: Sequence[Task]) -> None:
        items = self._items
        with self._lock:
            for task in tasks:
                item = _Item(task)
                items[task.key] = item
                if not self._hand(item):
                    self._backlog.append(item)

    def stop(self, key: Key, reason: BaseException) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        with self._lock:  # the thread cannot move on to another task while we aim at it
            item.dropped = True  # not started: its thread will skip it
            thread = item.thread
            hit = 0
            if thread is not None:
                hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(type(reason)))
                if hit == 1:
                    self._busy.discard(item)  # its thread is abandoned; a new one takes its place
                    self._abandoned.add(thread)
        if hit == 1:
            self._spawn()  # keep `concurrency` threads free to take new tasks meanwhile

    def withdraw(self, key: Key) -> bool:
        item = self._items.get(key)
        if item is None:
            return False
        with self._lock:
            if item.handed or item.dropped:
                return False  # a thread has it: running, or about to
            item.dropped = True  # (the backlog's threads skip it)
        del self._items[key]
        return True

    async def shutdown(self) -> None:
        if self.capture_output:
            inproc_capture.uninstall()
        with self._lock:
            self._closing = True
            while self._hand(None):
                pass

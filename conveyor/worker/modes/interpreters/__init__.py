"""interpreters mode: tasks run in N subinterpreters of the worker process, each driven by its own thread.

Since Python 3.12 each subinterpreter has its own GIL (PEP 684), so CPU-bound tasks use every core as
in processes mode, at the memory and start-up cost of threads. The API is the stdlib's
`concurrent.interpreters` (3.14) or its backport `backports.interpreters` (`pip install
'conveyor[interpreters]'`, Python 3.12 and 3.13): the same calls, so this module runs on both.

Each slot is one thread and one subinterpreter, created at start and reused. A task crosses the boundary
as bytes (entry.py): its call frames go in, its encoded outcome comes out, and the function is imported
(by reference) or unpickled (by value) inside the subinterpreter, so nothing is shared by accident.
Output and progress come back while the task runs, on a per-slot cross-interpreter queue.

A subinterpreter cannot be interrupted from outside (no async exception reaches another interpreter), so
a stopped task (timeout, cancel) is abandoned: its outcome is decided, a fresh slot takes its place at
once (capacity stays), and the abandoned thread closes its interpreter and exits when the call returns
(`abandoned` counts them; one that never returns holds its memory until the worker exits). If calling
into a subinterpreter itself fails, the task fails as `crashed` and the slot gets a new interpreter.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from conveyor.protocol import failures as perr
from conveyor.worker.execution import Key, Outcome, Task, infra_failure
from conveyor.worker.modes.base import Mode, ModeSettings, Report
from conveyor.worker.reports import TaskReports

log = logging.getLogger("conveyor.worker")

NEEDED = (
    "interpreters mode needs Python >= 3.12 with concurrent.interpreters (3.14) "
    "or its backport: pip install 'conveyor[interpreters]'"
)
POLL_S = 0.05  # how often output and progress of running tasks are collected


def load_api() -> ModuleType | None:
    """The PEP 734 module: the stdlib's (3.14+) or the backport's; None if neither is usable here."""
    if sys.version_info < (3, 12):
        return None
    try:
        from concurrent import interpreters  # type: ignore[attr-defined,unused-ignore]

        return interpreters  # type: ignore[no-any-return,unused-ignore]
    except ImportError:
        pass
    try:
        from backports import interpreters  # type: ignore[import-not-found,unused-ignore]

        return interpreters  # type: ignore[no-any-return,unused-ignore]
    except ImportError:
        return None


def missing_reason() -> str | None:
    """One line naming what is needed, or None if this Python can run the mode."""
    return None if load_api() is not None else f"{NEEDED} (this is Python {sys.version.split()[0]})"


def _call_entry(blob: bytes) -> bytes:
    """Sent to Interpreter.call, which runs its code with the subinterpreter's __main__ as globals, where
    BOOTSTRAP left `_entry` (so this function must name nothing else)."""
    return bytes(_entry.run(blob))  # type: ignore[name-defined]  # noqa: F821


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class _Item:
    task: Task
    started: bool = False
    dropped: bool = False  # stopped or withdrawn: its slot skips it, or its outcome is not reported


class _Slot:
    """One thread driving one subinterpreter, task after task."""

    def __init__(self, mode: InterpretersMode, number: int):
        self.mode = mode
        self.number = number
        self.interp: Any = None
        self.events: Any = None  # the cross-interpreter queue of this slot's output and progress
        self.events_lock = threading.Lock()
        self.item: _Item | None = None  # while it runs
        self.abandoned = False
        self.ready = threading.Event()
        self.error: BaseException | None = None  # why the first interpreter could not be made
        self.thread = threading.Thread(target=self._serve, name=f"conveyor-interp-{number}", daemon=True)

    def _new_interpreter(self) -> None:
        api = self.mode.api
        from conveyor.worker.modes.interpreters.entry import BOOTSTRAP

        self.events = api.create_queue()
        self.interp = api.create()
        self.interp.prepare_main(events=self.events, capture=self.mode.capture_output)
        self.interp.exec(BOOTSTRAP)

    def _close_interpreter(self) -> None:
        interp, self.interp = self.interp, None
        if interp is not None:
            try:
                interp.close()
            except Exception:
                log.exception("closing a subinterpreter failed")

    def _serve(self) -> None:
        try:
            self._new_interpreter()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self.abandoned:
                item = self.mode._queue.get()
                if item is None:
                    break
                with self.mode._lock:  # decided together with stop(): it either starts here or never
                    if item.dropped:
                        continue
                    item.started = True
                    self.item = item
                outcome = self._run(item.task)
                self.collect()
                with self.mode._lock:
                    self.item = None
                    if self.abandoned:
                        break  # stopped meanwhile: its outcome is decided, a new slot has this one's place
                self.mode._finished(item, outcome)
        finally:
            self._close_interpreter()

    def _run(self, task: Task) -> Outcome:
        blob = pickle.dumps((task.job_id, task.attempt, task.timeout, task.retry_on, [bytes(f) for f in task.frames]))
        try:
            ok, info, frames = pickle.loads(self.interp.call(_call_entry, blob))
        except Exception as exc:  # the call into the subinterpreter itself failed: replace the interpreter
            log.warning("subinterpreter of slot %d failed (%s); replacing it", self.number, exc)
            self._close_interpreter()
            try:
                self._new_interpreter()
            except Exception:
                log.exception("could not replace the subinterpreter of slot %d", self.number)
                self.abandoned = True
            return infra_failure(task, perr.CRASHED, type(exc).__name__, f"the subinterpreter failed: {exc}")
        return Outcome(task.job_id, task.attempt, ok, info, frames)

    def collect(self) -> None:
        """Pass this slot's queued output and progress to the task reports (any thread)."""
        reports = self.mode.reports
        with self.events_lock:
            events = self.events
            if events is None:
                return
            while True:
                try:
                    raw = events.get_nowait()
                except Exception:  # QueueEmpty, or the queue went with a closed interpreter
                    return
                if reports is None:
                    continue
                event = pickle.loads(raw)
                key: Key = (event[0], event[1])
                if event[2] == "progress":
                    reports.progress(key, event[3], event[4])
                else:
                    reports.output(key, event[2], event[3])


class InterpretersMode(Mode):
    name = "interpreters"

    def __init__(self, settings: ModeSettings, reports: TaskReports | None = None):
        super().__init__(settings, reports)
        api = load_api()
        if api is None:
            raise ValueError(missing_reason())
        self.api = api
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._items: dict[Key, _Item] = {}  # submitted and not yet reported, stopped or withdrawn
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._made = 0
        self.abandoned = 0  # slots left running a stopped task
        self._loop: asyncio.AbstractEventLoop | None = None
        self._report: Report | None = None
        self._closing = threading.Event()
        self._poller: threading.Thread | None = None

    async def start(self, report: Report) -> None:
        self._loop = asyncio.get_running_loop()
        self._report = report
        slots = [self._spawn() for _ in range(self.concurrency)]
        for slot in slots:
            await asyncio.to_thread(slot.ready.wait)
            if slot.error is not None:
                raise RuntimeError(f"interpreters mode could not create a subinterpreter: {slot.error}")
        self._poller = threading.Thread(target=self._poll, name="conveyor-interp-output", daemon=True)
        self._poller.start()

    def _spawn(self) -> _Slot:
        slot = _Slot(self, self._made)
        self._made += 1
        with self._lock:
            self._slots.append(slot)
        slot.thread.start()
        return slot

    def _poll(self) -> None:
        """Streams running tasks' output and progress every POLL_S, as the other modes do as it is written."""
        while not self._closing.wait(POLL_S):
            with self._lock:
                slots = [s for s in self._slots if s.item is not None]
            for slot in slots:
                slot.collect()

    def _finished(self, item: _Item, outcome: Outcome) -> None:
        """From a slot's thread: hand the outcome to the worker's loop."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, item, outcome)
        except RuntimeError:
            pass  # the worker's loop has closed

    def _deliver(self, item: _Item, outcome: Outcome) -> None:
        if item.dropped or self._items.pop(item.task.key, None) is not item:
            return
        if self._report is not None:
            self._report([outcome])

    def submit(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            item = _Item(task)
            self._items[task.key] = item
            self._queue.put(item)

    def stop(self, key: Key, reason: BaseException) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        with self._lock:
            item.dropped = True  # not started: its slot will skip it
            running = [s for s in self._slots if s.item is item]
            for slot in running:  # a subinterpreter cannot be interrupted: abandon the slot
                slot.abandoned = True
                self._slots.remove(slot)
                self.abandoned += 1
        for slot in running:
            log.warning(
                "task %s stopped (%s) in subinterpreter slot %d, which cannot be interrupted: "
                "abandoned (it closes when the call returns), a new slot takes its place",
                key[0], type(reason).__name__, slot.number,
            )
            self._spawn()

    def withdraw(self, key: Key) -> bool:
        item = self._items.get(key)
        if item is None:
            return False
        with self._lock:
            if item.started or item.dropped:
                return False
            idle = sum(1 for s in self._slots if s.item is None)
            if idle > 0:
                return False  # an idle slot is about to take it
            item.dropped = True
        del self._items[key]
        return True

    async def shutdown(self) -> None:
        self._closing.set()
        with self._lock:
            slots = list(self._slots)
        for _ in slots:
            self._queue.put(None)
        deadline = time.monotonic() + 5.0
        for slot in slots:  # idle slots close their interpreters; a busy one is left to the process exit
            await asyncio.to_thread(slot.thread.join, max(0.0, deadline - time.monotonic()))

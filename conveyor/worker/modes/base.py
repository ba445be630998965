"""The contract every execution mode implements; the worker treats all of them alike.

A mode turns tasks into outcomes somewhere other than the worker's loop (threads, child processes,
another event loop, ...), at most `concurrency` at once. The worker's state machine (worker/state.py)
decides everything else, for every mode the same way: which task goes to the mode when, timeouts,
cancels, hand-backs and the drain. So a mode only does four things, all called on the worker's loop
and none of which may block it:

    submit(tasks)        run these, in order, as its slots free up
    stop(key, reason)    interrupt that task (a timeout, a cancel, the drain deadline), or never start it;
                         its outcome is already decided, so the mode reports nothing more for it
    withdraw(key)        take back a task still in the mode's own queue (see queue_limit); False if it
                         started, or an idle slot is about to take it
    report(outcomes)     (the callback given to start) tasks that ended by themselves, called on the
                         worker's loop, exactly once per task submitted and neither stopped nor withdrawn

`queue_limit` is how many tasks the mode accepts beyond its `concurrency`, in its own queue: 0 (the
default) means the worker hands it a task only when a slot is free; threads mode takes its prefetch
window too, so its threads go from task to task without waiting for the loop.

Adding a mode is one module with a Mode subclass, plus its line in modes/__init__.py (docs/modes.md §6).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from conveyor.worker.execution import Key, Outcome, Task
from conveyor.worker.reports import TaskReports

Report = Callable[[Sequence[Outcome]], None]  # how a mode reports ended tasks, on the worker's loop
Lending = Callable[[Key, bool], None]  # a task lends its slot (True) or takes it back (False), on the loop


@dataclass(frozen=True, slots=True)
class ModeSettings:
    """What a mode is configured with. Each mode uses what applies to it and ignores the rest."""

    concurrency: int
    prefetch: int = 0  # jobs the worker may hold beyond its slots (the most, with auto prefetch)
    capture_output: bool = True  # route tasks' stdout, stderr and logging into their reports
    max_child_memory_bytes: int | None = None  # a child process using more resident memory is killed


class Mode(abc.ABC):
    name: ClassVar[str]  # the string of --mode, READY's `mode` and the task option `mode`

    def __init__(self, settings: ModeSettings, reports: TaskReports | None = None):
        if settings.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.settings = settings
        self.concurrency = settings.concurrency
        self.reports = reports  # where tasks' output and progress go (None: nowhere)
        self.capture_output = reports is not None and settings.capture_output
        # Set by the worker. A mode able to run one more task while one of its tasks blocks on a child
        # (conveyor.current_client()) calls it on the worker's loop; the others never do (docs/workflows.md).
        self.on_lend: Lending | None = None

    @classmethod
    def default_concurrency(cls) -> int:
        """Slots when the worker is given no --concurrency."""
        return os.cpu_count() or 1

    @property
    def queue_limit(self) -> int:
        """Tasks this mode accepts beyond `concurrency`, queued in submission order (withdrawable)."""
        return 0

    @abc.abstractmethod
    async def start(self, report: Report) -> None:
        """Create the executors (once, on the worker's loop, before it connects); report ended tasks with `report`."""

    @abc.abstractmethod
    def submit(self, tasks: Sequence[Task]) -> None:
        """Run these tasks, in order, as slots free up (never more than `concurrency` at once)."""

    @abc.abstractmethod
    def stop(self, key: Key, reason: BaseException) -> None:
        """Interrupt this task (best effort per mode), or keep it from starting. Report nothing more for it,
        and keep the capacity: free or replace what a task that does not stop still holds."""

    def withdraw(self, key: Key) -> bool:
        """Take back a task waiting in the mode's own queue: True if it will never start (and is never
        reported), False if it started or is about to (an idle slot takes it next)."""
        return False

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release what start() made, in bounded time, even with tasks still running."""

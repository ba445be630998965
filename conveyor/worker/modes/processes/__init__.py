"""processes mode: each task runs in one of `concurrency` child processes of the worker.

Each child has its own interpreter, memory and GIL, so CPU-bound Python code uses every core. A child
that dies (segfault, os._exit, the OOM killer, the memory limit) fails only the task it was running, with
WorkerCrashed, and is replaced; the worker and its other children carry on. A stopped task's child
(timeout, cancel) is terminated (SIGTERM, then SIGKILL after a grace period) and replaced. Children are
forked by the pool's own fork server (forkserver.py), so they do not inherit the worker's threads or
sockets, and they end with the pool.

    __init__.py   the pool: starting and replacing children, handing them tasks, crashes, memory limit
    channel.py    the worker's ends of one child's pipes (tasks out, outcomes and output back)
    forkserver.py the process that forks the children, and the worker's handle on each child
    child.py      what runs in the child (and the wire format of the task pipe)

A task blocked on its own child (conveyor.current_client()) lends its slot: its child process says so on
the task pipe, the pool grows by one child meanwhile and the worker is told (on_lend), so one more task
may come; when the wait ends the pool shrinks back (an idle child is stopped, or the next to finish).

Replacing a child is one task the mode owns. If a child cannot be started (too many open files, a
broken fork server), it retries with backoff and logs each failure; while no child at all is alive,
tasks fail at once as WorkerCrashed with a message naming the cause, instead of waiting for a slot that
never comes back.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from conveyor.protocol import failures as perr
from conveyor.worker.execution import Key, Outcome, Task, infra_failure
from conveyor.worker.modes.base import Mode, ModeSettings, Report
from conveyor.worker.modes.processes.channel import Child, ChildOutput, child_pipes
from conveyor.worker.modes.processes.forkserver import ForkServer
from conveyor.worker.reports import TaskReports

if TYPE_CHECKING:
    import asyncio

# asyncio and psutil are imported where they are used: a child imports this package (its module lives in
# it), and the fork server and each child would carry them (~8 MiB of RSS apiece) for nothing.

log = logging.getLogger("conveyor.worker")

KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for a stopped task's child
MEMORY_CHECK_INTERVAL = 0.25
RESTART_BACKOFF = (0.1, 5.0)  # seconds between attempts to start a child that failed to start: first, most
SHUTDOWN_WAIT = 2.0  # seconds children get to exit at shutdown before they are killed


class ProcessesMode(Mode):
    name = "processes"

    def __init__(self, settings: ModeSettings, reports: TaskReports | None = None):
        super().__init__(settings, reports)
        self.max_child_memory = settings.max_child_memory_bytes  # bytes of RSS; a child above it is killed
        self._forks = ForkServer()  # started with the first child, ended at shutdown
        self._children: set[Child] = set()
        self._idle: deque[Child] = deque()
        self._waiting: deque[Task] = deque()  # submitted, no idle child yet (one is being replaced)
        self._pending: dict[Key, Task] = {}  # those of them not stopped
        self._running: dict[Key, Child] = {}  # tasks on a child, not stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._report: Report | None = None
        self._closing = False
        self._spawner: asyncio.Task[None] | None = None  # starts missing children, owned here
        import asyncio

        self._closed = asyncio.Event()  # set at shutdown: the spawner stops waiting to retry
        self.start_error: BaseException | None = None  # why the last child start failed, until one succeeds
        self._lent = 0  # children whose task waits on a child of its own: the pool is that much larger

    async def start(self, report: Report) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._report = report
        started = await asyncio.gather(
            *(asyncio.to_thread(self._start_child) for _ in range(self.concurrency)), return_exceptions=True
        )
        errors = [r for r in started if isinstance(r, BaseException)]
        for child in started:
            if isinstance(child, Child):
                self._adopt(child)
        if errors:
            if not self._children:
                raise errors[0]
            self._start_failed(errors[0])
            self._replenish()
        if self.max_child_memory:
            self._loop.call_later(MEMORY_CHECK_INTERVAL, self._check_memory)

    def child_pids(self) -> list[int]:
        return [c.pid for c in self._children if not c.dead]

    @property
    def _target(self) -> int:
        """Children the pool should have: the slots, plus one per slot lent."""
        return self.concurrency + self._lent

    # --- children -----------------------------------------------------------------------------------

    def _start_child(self) -> Child:
        """Start one child (in a thread: the fork server's start and handshake take a while)."""
        ours, theirs = socket.socketpair()
        task_fd = ours.detach()
        reads: list[int] = []
        writes: list[int] = []
        try:
            if self.reports is not None:
                reads, writes = child_pipes()
            level = logging.getLogger().getEffectiveLevel()
            process = self._forks.start_child([theirs.fileno(), *writes], level, self.capture_output)
        except BaseException:
            os.close(task_fd)
            for fd in reads:
                os.close(fd)
            raise
        finally:
            theirs.close()
            for w in writes:
                os.close(w)
        output = ChildOutput(self.reports, *reads) if self.reports is not None else None
        return Child(process, task_fd, output)

    def _adopt(self, child: Child) -> None:
        assert self._loop is not None
        self._children.add(child)
        child.attach(self._loop, self._on_outcome, self._on_exit, self._on_lent)
        self._idle.append(child)
        self._trim()  # (a lent slot came back while it started)
        self._dispatch()

    def _replenish(self) -> None:
        """Make sure the spawner runs while children are missing (one task, owned, never fire-and-forget)."""
        if self._closing or (self._spawner is not None and not self._spawner.done()):
            return
        assert self._loop is not None
        self._spawner = self._loop.create_task(self._spawn_missing(), name="conveyor-child-spawner")

    async def _spawn_missing(self) -> None:
        import asyncio

        delay, most = RESTART_BACKOFF
        while not self._closing and len(self._children) < self._target:
            try:
                child = await asyncio.to_thread(self._start_child)
            except Exception as exc:
                self._start_failed(exc, retry_in=delay)
                try:
                    await asyncio.wait_for(self._closed.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, most)
                continue
            if self._closing:  # shutdown began while it started: nobody else will stop this one
                child.close()
                await _reap([child])
                return
            if self.start_error is not None:
                log.warning("processes mode: child processes start again (%d of %d up)", len(self._children) + 1,
                            self.concurrency)
                self.start_error = None
            delay = RESTART_BACKOFF[0]
            self._adopt(child)

    def _start_failed(self, exc: BaseException, retry_in: float | None = None) -> None:
        """A child could not be started: say so loudly; with no child left, fail what waits instead of hanging."""
        first = self.start_error is None
        self.start_error = exc
        alive = len(self._children)
        log.error(
            "processes mode: cannot start a child process (%d of %d up): %s: %s%s",
            alive, self.concurrency, type(exc).__name__, exc,
            f"; retrying in {retry_in:g} s" if retry_in is not None else "",
            exc_info=exc if first else None,
        )
        if not alive:
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        exc = self.start_error
        message = f"no child process could be started to run the task: {type(exc).__name__}: {exc}"
        failed: list[Outcome] = []
        while self._waiting:
            task = self._waiting.popleft()
            if self._pending.pop(task.key, None) is task:
                failed.append(infra_failure(task, perr.CRASHED, "WorkerCrashed", message))
        if failed and self._report is not None:
            self._report(failed)

    # --- tasks --------------------------------------------------------------------------------------

    def submit(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            self._pending[task.key] = task
            self._waiting.append(task)
        if self.start_error is not None and not self._children:
            self._fail_waiting()  # no child to wait for: say why now
        else:
            self._dispatch()

    def _dispatch(self) -> None:
        while self._idle and self._waiting:
            task = self._waiting.popleft()
            if self._pending.pop(task.key, None) is not task:
                continue  # stopped while it waited: it never starts
            child = self._idle.popleft()
            self._running[task.key] = child
            child.send(task)

    def _on_outcome(self, child: Child, ok: bool, info: Any, frames: list[Any]) -> None:
        task, child.task = child.task, None
        self._unlend(child)  # (it said so before its outcome; unless it could not)
        if task is not None and self._running.pop(task.key, None) is child and self._report is not None:
            self._report([Outcome(task.job_id, task.attempt, ok, info, frames)])
        if not child.dying and not child.dead:
            self._idle.append(child)
            self._trim()
            self._dispatch()

    def _on_lent(self, child: Child, key: Key, waiting: bool) -> None:
        """The child's task blocks on a child of its own (waiting) or stops: one child more, or fewer."""
        task = child.task
        if task is None or task.key != key or child.dying or child.dead or waiting == child.lent:
            return  # stopped meanwhile (its lending ended there), or said twice
        if waiting:
            child.lent = True
            self._lent += 1
            self._replenish()
        else:
            self._unlend(child)
            self._trim()
        if self.on_lend is not None:
            self.on_lend(key, waiting)

    def _unlend(self, child: Child) -> None:
        if child.lent:
            child.lent = False
            self._lent -= 1

    def _trim(self) -> None:
        """Stop idle children beyond the target (lent slots came back); a busy one goes once it is idle."""
        surplus = sum(1 for c in self._children if not c.dying) - self._target
        while surplus > 0 and self._idle:
            self._terminate(self._idle.pop())
            surplus -= 1

    def _on_exit(self, child: Child) -> None:
        if child.dead:
            return
        child.dead = True
        child.detach()
        try:
            child.process.join(1)  # reaps it: its sentinel says it has exited
        except OSError as exc:  # (poll can fail when the process is out of descriptors) the exit code is then unknown
            log.warning("processes mode: cannot reap child %d: %s", child.pid, exc)
        code = child.process.exitcode
        child.process.close()
        child.close()  # what the task printed before the child died stays its output
        self._children.discard(child)
        self._unlend(child)
        if child in self._idle:
            self._idle.remove(child)
        task, child.task = child.task, None
        if task is not None and self._running.pop(task.key, None) is child and self._report is not None:
            if child.process.server_died:
                how = "the fork server that started it died, and it with it"
            elif code is not None and code < 0:
                how = f"killed by signal {-code}"
            else:
                how = f"exit code {code}"
            message = child.killed_because or f"the child process (pid {child.pid}) running the task died: {how}"
            self._report([infra_failure(task, perr.CRASHED, "WorkerCrashed", message)])
        if not self._closing:
            self._replenish()

    def stop(self, key: Key, reason: BaseException) -> None:
        if self._pending.pop(key, None) is not None:
            return  # still waiting for a child: it never starts
        child = self._running.pop(key, None)
        if child is not None:
            child.task = None  # whatever it still reports no longer counts
            self._unlend(child)  # (the worker's state ends its lending with the stop)
            self._terminate(child)
            self._trim()

    def _terminate(self, child: Child) -> None:
        child.dying = True
        if child in self._idle:
            self._idle.remove(child)
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        assert self._loop is not None
        self._loop.call_later(KILL_GRACE, self._kill_if_alive, child)

    @staticmethod
    def _kill_if_alive(child: Child) -> None:
        if not child.dead and child.process.is_alive():
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _check_memory(self) -> None:
        """Kill a child whose task grew past the memory limit (a leak must not take the host down)."""
        if self._closing or self._loop is None or not self.max_child_memory:
            return
        import psutil

        for child in list(self._children):
            if child.dead or child.task is None:
                continue
            try:
                rss = psutil.Process(child.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > self.max_child_memory:
                child.killed_because = (
                    f"the child process (pid {child.pid}) used {rss >> 20} MiB, over the worker's "
                    f"{self.max_child_memory >> 20} MiB limit, and was killed"
                )
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._loop.call_later(MEMORY_CHECK_INTERVAL, self._check_memory)

    async def shutdown(self) -> None:
        import asyncio

        self._closing = True
        self._closed.set()
        if self._spawner is not None:
            await self._spawner  # a start under way finishes, and the spawner stops that child itself
        children = list(self._children)
        for child in children:
            if not child.dead:
                child.detach()
            child.close_task_pipe()  # EOF: an idle child exits by itself
        await _reap(children)
        for child in children:
            if child.output is not None and not child.dead:
                child.output.close()
        await asyncio.to_thread(self._forks.close)


async def _reap(children: list[Child]) -> None:
    """Wait for the children to exit, together; kill those still alive after SHUTDOWN_WAIT."""
    import asyncio

    await asyncio.gather(*(asyncio.to_thread(c.process.join, SHUTDOWN_WAIT) for c in children))
    stuck = [c for c in children if c.process.is_alive()]
    for child in stuck:
        child.process.kill()
    await asyncio.gather(*(asyncio.to_thread(c.process.join, SHUTDOWN_WAIT) for c in stuck))
    for child in children:  # (detached by the caller: nothing watches their status pipes any more)
        child.process.close()

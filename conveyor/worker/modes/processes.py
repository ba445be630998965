"""processes mode: each task runs in one of `concurrency` child processes of the worker.

Each child has its own interpreter, memory and GIL, so CPU-bound Python code uses every core. A
child that dies (segfault, os._exit, OOM kill) fails only the task it was running, with
WorkerCrashed, and is replaced; the worker and its other children carry on. A timed-out or
cancelled task's child is terminated (SIGTERM, then SIGKILL after a grace period) and replaced.
Children are started by the `forkserver` method, so they do not inherit the worker's threads or
sockets.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import select
import signal
import sys
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import msgpack
import psutil

from conveyor.protocol import failures as perr
from conveyor.worker import capture
from conveyor.worker.child import child_main, consume
from conveyor.worker.execution import Outcome, Task, infra_failure
from conveyor.worker.modes.base import Mode

KILL_GRACE = 1.0
MEMORY_CHECK_INTERVAL = 0.25
_IOV_MAX = 512  # buffers per writev
_scratch = bytearray(1 << 16)  # what one read from a child's task pipe lands in (the loop is single-threaded)


def _context() -> Any:
    method = "forkserver" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["conveyor.worker.child"])
    return ctx


class _Child:
    def __init__(self, process: BaseProcess, conn: Connection):
        self.process = process
        self.conn = conn
        self.task: Task | None = None
        self.future: asyncio.Future[Outcome] | None = None
        self.dead = False
        self.dying = False  # terminated by us: never handed another task
        self.capture: capture.ChildCapture | None = None  # the child's stdout, stderr and events pipes
        self.output = select.poll()  # those pipes: one poll tells whether the task wrote anything
        self.killed_because: str | None = None
        # The task pipe, read and written without blocking (the wire format is in child.py).
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.out: list[Any] = []  # what is left to write of the current task
        self.writing = False  # a writer callback is registered for out
        self.inbuf = bytearray()  # a partial outcome message
        self.body: bytearray | None = None  # a large outcome's frames, read straight into this
        self.got = 0
        self.head: tuple[Any, Any, list[int]] = (False, None, [])  # (ok, info, frame lengths) of body

    @property
    def pid(self) -> int:
        return self.process.pid or 0


class ProcessesMode(Mode):
    name = "processes"

    def __init__(self, concurrency: int, max_child_memory: int | None = None):
        super().__init__(concurrency)
        self.max_child_memory = max_child_memory  # bytes of RSS; a child above it is killed
        self._ctx = _context()
        self._children: set[_Child] = set()
        self._idle: deque[_Child] = deque()
        self._waiting: deque[tuple[Task, asyncio.Future[Outcome]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._packer = msgpack.Packer()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        starts = [asyncio.to_thread(self._start_child) for _ in range(self.concurrency)]
        for child in await asyncio.gather(*starts):
            self._adopt(child)
        if self.max_child_memory:
            self._loop.call_later(MEMORY_CHECK_INTERVAL, self._check_memory)

    def _check_memory(self) -> None:
        """Kill a child whose task grew past the memory limit (a leak must not take the host down)."""
        if self._closing or self._loop is None or not self.max_child_memory:
            return
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

    def _start_child(self) -> _Child:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        reads, writes = capture.child_pipes() if self.reports is not None else ([], [])
        level = logging.getLogger().getEffectiveLevel()
        args = (child_conn, writes, level, self.capture_output) if writes else (child_conn,)
        process = self._ctx.Process(target=child_main, args=args, daemon=True, name="conveyor-child")
        process.start()
        child_conn.close()
        for w in writes:
            w.close()
        child = _Child(process, parent_conn)
        if self.reports is not None:
            child.capture = capture.ChildCapture(self.reports, *reads)
            for fd in reads:
                child.output.register(fd, select.POLLIN)
        return child

    def _adopt(self, child: _Child) -> None:
        assert self._loop is not None
        self._children.add(child)
        self._loop.add_reader(child.fd, self._on_readable, child)
        self._loop.add_reader(child.process.sentinel, self._on_exit, child)
        if child.capture is not None:
            child.capture.attach(self._loop)
        self._idle.append(child)
        self._dispatch()

    def child_pids(self) -> list[int]:
        return [c.pid for c in self._children if not c.dead]

    async def run(self, task: Task) -> Outcome:
        assert self._loop is not None
        fut: asyncio.Future[Outcome] = self._loop.create_future()
        self._waiting.append((task, fut))
        self._dispatch()
        return await self.supervise(task, fut)

    def _dispatch(self) -> None:
        while self._idle and self._waiting:
            task, fut = self._waiting.popleft()
            if fut.done():
                continue
            child = self._idle.popleft()
            child.task, child.future = task, fut
            if child.capture is not None:
                child.capture.task = task.key
            header = self._packer.pack(
                [task.job_id, task.attempt, task.timeout, task.retry_on, [memoryview(f).nbytes for f in task.frames]]
            )
            child.out = [len(header).to_bytes(4, "little") + header, *task.frames]
            self._write(child)

    def _write(self, child: _Child) -> None:
        """Write what is left of the child's task message; a large one goes on when the pipe drains."""
        out = child.out
        try:
            while out:
                consume(out, os.writev(child.fd, out[:_IOV_MAX]))
        except BlockingIOError:
            pass
        except OSError:  # the child died; its sentinel fires and fails this task as crashed
            out.clear()
        assert self._loop is not None
        if out and not child.writing:
            child.writing = True
            self._loop.add_writer(child.fd, self._write, child)
        elif not out and child.writing:
            child.writing = False
            self._loop.remove_writer(child.fd)

    def _on_readable(self, child: _Child) -> None:
        try:
            if child.body is not None:  # a large outcome: read into its place
                n = os.readv(child.fd, [memoryview(child.body)[child.got :]])
            else:
                n = os.readv(child.fd, [_scratch])
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            # The pipe closed: the child is exiting. Its sentinel fires once it has, with an exit code.
            assert self._loop is not None
            self._loop.remove_reader(child.fd)
            return
        if child.body is not None:
            child.got += n
            if child.got == len(child.body):
                ok, info, lengths = child.head
                view, pos = memoryview(child.body), 0
                parts: list[Any] = []
                for size in lengths:
                    parts.append(view[pos : pos + size])
                    pos += size
                child.body = None
                self._finished(child, ok, info, parts)
            return
        buf = child.inbuf
        buf += memoryview(_scratch)[:n]
        frames: list[Any] | None
        while len(buf) >= 4:
            end = 4 + int.from_bytes(buf[:4], "little")
            if len(buf) < end:
                return
            with memoryview(buf) as view:
                ok, info, lengths = msgpack.unpackb(view[4:end])
                total = end + sum(lengths)
                if len(buf) < total:  # a large outcome: read the rest straight into one buffer
                    child.body = bytearray(total - end)
                    child.body[: len(buf) - end] = view[end:]
                    child.got, child.head = len(buf) - end, (ok, info, lengths)
                    frames = None
                else:
                    frames, pos = [], end
                    for size in lengths:
                        frames.append(bytes(view[pos : pos + size]))
                        pos += size
            if frames is None:
                buf.clear()
                return
            del buf[:total]
            self._finished(child, ok, info, frames)

    def _finished(self, child: _Child, ok: bool, info: Any, frames: list[Any]) -> None:
        if child.capture is not None:  # the task's last output, written before its outcome
            if child.output.poll(0):  # one syscall, not three reads that fail when it printed nothing
                child.capture.drain()
            child.capture.task = None
        task, fut = child.task, child.future
        child.task = child.future = None
        if task is not None and fut is not None and not fut.done():
            fut.set_result(Outcome(task.job_id, task.attempt, bool(ok), info, frames))
        if not child.dying:
            self._idle.append(child)
            self._dispatch()

    def _on_exit(self, child: _Child) -> None:
        if child.dead:
            return
        child.dead = True
        assert self._loop is not None
        self._loop.remove_reader(child.fd)
        if child.writing:
            self._loop.remove_writer(child.fd)
            child.writing = False
        self._loop.remove_reader(child.process.sentinel)
        child.process.join(1)
        code = child.process.exitcode
        child.conn.close()
        if child.capture is not None:  # what the task printed before the child died stays its output
            child.capture.close()
        self._children.discard(child)
        if child in self._idle:
            self._idle.remove(child)
        task, fut = child.task, child.future
        if task is not None and fut is not None and not fut.done():
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            message = child.killed_because or f"the child process (pid {child.pid}) running the task died: {how}"
            fut.set_result(infra_failure(task, perr.CRASHED, "WorkerCrashed", message))
        if not self._closing:
            self._loop.create_task(self._replace())

    async def _replace(self) -> None:
        child = await asyncio.to_thread(self._start_child)
        if self._closing:
            child.conn.close()
            child.process.join(1)
            return
        self._adopt(child)

    def abort(self, task: Task, reason: BaseException) -> None:
        for child in self._children:
            if child.task is not None and child.task.key == task.key and not child.dead:
                self._terminate(child)
                return

    def _terminate(self, child: _Child) -> None:
        child.dying = True
        if child in self._idle:
            self._idle.remove(child)
        pid = child.pid
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        assert self._loop is not None
        self._loop.call_later(KILL_GRACE, self._kill_if_alive, child)

    @staticmethod
    def _kill_if_alive(child: _Child) -> None:
        if not child.dead and child.process.is_alive():
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def shutdown(self) -> None:
        self._closing = True
        children = list(self._children)
        for child in children:
            if self._loop is not None and not child.dead:
                self._loop.remove_reader(child.fd)
                if child.writing:
                    self._loop.remove_writer(child.fd)
                self._loop.remove_reader(child.process.sentinel)
            child.conn.close()  # EOF: an idle child exits by itself
        for child in children:
            await asyncio.to_thread(child.process.join, 2)
            if child.process.is_alive():
                child.process.kill()
                await asyncio.to_thread(child.process.join, 2)
            if child.capture is not None and not child.dead:
                child.capture.close()

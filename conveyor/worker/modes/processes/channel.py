"""The worker's side of one processes-mode child: its task pipe, read and written without blocking, and the
pipes its output comes back on (the wire format is in child.py).

A task goes out with one writev when the pipe has room, the rest when it drains; an outcome comes back
through one read per chunk, a large one read straight into its own buffer. The child's stdout, stderr
and events pipes are read as data arrives and attributed to the task the child runs (`output.task`).
"""

from __future__ import annotations

import codecs
import os
import select
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from conveyor.transport.shm import Segment
from conveyor.worker.execution import Key, Task
from conveyor.worker.modes.processes.child import IOV_MAX, LENT, consume
from conveyor.worker.modes.processes.forkserver import ChildProcess
from conveyor.worker.reports import TaskReports

if TYPE_CHECKING:
    import asyncio

_scratch = bytearray(1 << 16)  # what one read from a child's task pipe lands in (the loop is single-threaded)

OnOutcome = Callable[["Child", bool, Any, list[Any]], None]
OnLent = Callable[["Child", Key, bool], None]  # its task (key) blocks on a child of its own (True) or stops


class Child:
    """One child process and the worker's ends of its pipes."""

    def __init__(self, process: ChildProcess, task_fd: int, output: ChildOutput | None):
        self.process = process
        self.output = output
        self.task: Task | None = None  # the task it runs (None once stopped: its outcome no longer counts)
        self.busy = False  # a task was written to it and its outcome has not come back
        self.dead = False
        self.dying = False  # terminated by us: never handed another task
        self.killed_because: str | None = None
        self.lent = False  # its task waits on a child of its own: the pool has one more child meanwhile
        self.fd = task_fd  # the worker's end of the task pipe (a Unix socket pair)
        os.set_blocking(self.fd, False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_outcome: OnOutcome | None = None
        self._on_lent: OnLent | None = None
        self._packer = msgpack.Packer()
        self._out: list[Any] = []  # what is left to write of the current task
        self._writing = False  # a writer callback is registered for _out
        self._inbuf = bytearray()  # a partial outcome message
        self._body: bytearray | None = None  # a large outcome's frames, read straight into this
        self._got = 0
        self._head: tuple[Any, Any, list[int]] = (False, None, [])  # (ok, info, frame lengths) of _body

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def attach(
        self, loop: asyncio.AbstractEventLoop, on_outcome: OnOutcome, on_exit: Callable[[Child], None],
        on_lent: OnLent | None = None,
    ) -> None:
        self._loop = loop
        self._on_outcome = on_outcome
        self._on_lent = on_lent
        loop.add_reader(self.fd, self._on_readable)
        loop.add_reader(self.process.sentinel, on_exit, self)
        if self.output is not None:
            self.output.attach(loop)

    def detach(self) -> None:
        """Stop watching its pipes and its exit (before closing them)."""
        loop = self._loop
        if loop is None:
            return
        loop.remove_reader(self.fd)
        if self._writing:
            loop.remove_writer(self.fd)
            self._writing = False
        loop.remove_reader(self.process.sentinel)

    def send(self, task: Task) -> None:
        self.task = task
        self.busy = True
        if self.output is not None:
            self.output.task = task.key
        frames = task.frames
        if any(type(f) is Segment for f in frames):  # mapped from /dev/shm: the child maps it too, by name
            sizes: list[Any] = [[f.name, len(f)] if type(f) is Segment else memoryview(f).nbytes for f in frames]
            frames = [f for f in frames if type(f) is not Segment]
        else:
            sizes = [memoryview(f).nbytes for f in frames]
        header = self._packer.pack([task.job_id, task.attempt, task.timeout, task.retry_on, sizes])
        self._out = [len(header).to_bytes(4, "little") + header, *frames]
        self._write()

    def _write(self) -> None:
        """Write what is left of the child's task message; a large one goes on when the pipe drains."""
        out = self._out
        try:
            while out:
                consume(out, os.writev(self.fd, out[:IOV_MAX]))
        except BlockingIOError:
            pass
        except OSError:  # the child died; its sentinel fires and fails this task as crashed
            out.clear()
        assert self._loop is not None
        if out and not self._writing:
            self._writing = True
            self._loop.add_writer(self.fd, self._write)
        elif not out and self._writing:
            self._writing = False
            self._loop.remove_writer(self.fd)

    def _on_readable(self) -> None:
        try:
            if self._body is not None:  # a large outcome: read into its place
                n = os.readv(self.fd, [memoryview(self._body)[self._got :]])
            else:
                n = os.readv(self.fd, [_scratch])
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            # The pipe closed: the child is exiting. Its sentinel fires once it has, with an exit code.
            assert self._loop is not None
            self._loop.remove_reader(self.fd)
            return
        if self._body is not None:
            self._got += n
            if self._got == len(self._body):
                ok, info, lengths = self._head
                view, pos = memoryview(self._body), 0
                parts: list[Any] = []
                for size in lengths:
                    parts.append(view[pos : pos + size])
                    pos += size
                self._body = None
                self._finished(ok, info, parts)
            return
        buf = self._inbuf
        buf += memoryview(_scratch)[:n]
        frames: list[Any] | None
        while len(buf) >= 4:
            end = 4 + int.from_bytes(buf[:4], "little")
            if len(buf) < end:
                return
            with memoryview(buf) as view:
                head = msgpack.unpackb(view[4:end])
            if len(head) == 4 and head[0] == LENT:  # its task blocks on a child, or stops: no frames
                del buf[:end]
                if self._on_lent is not None:
                    self._on_lent(self, (str(head[1]), int(head[2])), bool(head[3]))
                continue
            with memoryview(buf) as view:
                ok, info, lengths = head
                total = end + sum(lengths)
                if len(buf) < total:  # a large outcome: read the rest straight into one buffer
                    self._body = bytearray(total - end)
                    self._body[: len(buf) - end] = view[end:]
                    self._got, self._head = len(buf) - end, (ok, info, lengths)
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
            self._finished(ok, info, frames)

    def _finished(self, ok: bool, info: Any, frames: list[Any]) -> None:
        if self.output is not None:  # the task's last output, written before its outcome
            self.output.drain_if_ready()
            self.output.task = None
        self.busy = False
        assert self._on_outcome is not None
        self._on_outcome(self, bool(ok), info, frames)

    def close_task_pipe(self) -> None:
        """EOF for the child: an idle one exits by itself."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """The child is gone (or going): close the worker's ends, keeping what its output pipes still held."""
        self.close_task_pipe()
        if self.output is not None:
            self.output.close()


class ChildOutput:
    """The worker's ends of one child's stdout, stderr and events pipes, read as data arrives."""

    def __init__(self, reports: TaskReports, stdout_fd: int, stderr_fd: int, events_fd: int):
        self.reports = reports
        self.task: Key | None = None
        self._fds = {stdout_fd: "stdout", stderr_fd: "stderr", events_fd: "events"}
        self._decoders = {
            stdout_fd: codecs.getincrementaldecoder("utf-8")("replace"),
            stderr_fd: codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self._events = msgpack.Unpacker(raw=False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll = select.poll()  # one poll tells whether the task wrote anything
        for fd in self._fds:
            os.set_blocking(fd, False)
            self._poll.register(fd, select.POLLIN)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for fd in self._fds:
            loop.add_reader(fd, self._read, fd)

    def drain_if_ready(self) -> None:
        """Read whatever the child wrote so far (it wrote it all before it sent its outcome): one syscall,
        not three reads that fail, when the task printed nothing."""
        if self._poll.poll(0):
            self.drain()

    def drain(self) -> None:
        for fd in list(self._fds):
            self._read(fd)

    def close(self) -> None:
        """The child is gone: read what is left, then close our ends."""
        self.drain()
        for fd in list(self._fds):
            if self._loop is not None:
                self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()

    def _read(self, fd: int) -> None:
        name = self._fds.get(fd)
        if name is None:
            return
        while True:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # every writer closed: stop watching this pipe
                if self._loop is not None:
                    self._loop.remove_reader(fd)
                return
            if name == "events":
                self._on_events(data)
            else:
                text = self._decoders[fd].decode(data)
                if self.task is not None:
                    self.reports.output(self.task, name, text)
                else:  # the child said something between tasks: keep it in the worker's own output
                    (sys.stdout if name == "stdout" else sys.stderr).write(text)
            if len(data) < 65536:
                return

    def _on_events(self, data: bytes) -> None:
        self._events.feed(data)
        for record in self._events:
            if not isinstance(record, list) or not record or self.task is None:
                continue
            if record[0] == "p" and len(record) == 3:
                self.reports.progress(self.task, record[1], record[2])
            elif record[0] == "l" and len(record) == 2:
                self.reports.output(self.task, "log", str(record[1]))


def child_pipes() -> tuple[list[int], list[int]]:
    """(worker's read ends, child's write ends) of a child's stdout, stderr and events pipes. The worker
    closes its copies of the write ends once the fork server has them."""
    reads: list[int] = []
    writes: list[int] = []
    try:
        for _ in range(3):
            r, w = os.pipe()
            reads.append(r)
            writes.append(w)
    except OSError:
        for fd in (*reads, *writes):
            os.close(fd)
        raise
    return reads, writes

"""What a running task says: its stdout, stderr and log records, and the progress it reports.

Everything a task produces lands in the worker's `TaskReports`, keyed by (job id, attempt). The worker
sends it on to the dispatcher a few times a second, as OUTPUT and PROGRESS messages, and always right
before the RESULTS entry of that task, so the dispatcher has a task's last output when it learns the
outcome. Each stream keeps only its tail (`limit` characters) between two sends.

How output is captured depends on the mode:

- threads and asyncio: many tasks share one process, so `sys.stdout` and `sys.stderr` are replaced
  (while such a mode runs) by proxies that look the current task up in a context variable and append
  to that task's buffer; writes outside any task go to the real stream. A handler on the root logger
  does the same for log records. Threads a task starts itself do not inherit the context, so their
  output goes to the worker's own streams.
- processes: fd 1 and fd 2 of every child are pipes that the worker reads, so C-level writes, the
  output of subprocesses and everything a task wrote before it crashed are kept. Python's streams in
  the child are unbuffered for the same reason. Log records and progress reports go through a third
  pipe (msgpack records). The worker attributes what it reads to the task the child is running.

`conveyor.progress(fraction, message)` (conveyor/task.py) finds the current task the same way, in every mode.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from conveyor import task
from conveyor.protocol import Cmd

STREAMS = ("stdout", "stderr", "log")
DEFAULT_LIMIT = 64 * 1024  # characters of each stream kept per task (the tail)
FLUSH_INTERVAL = 0.2  # seconds between two sends of a running task's output and progress
MESSAGE_CHARS = 4 * 1024 * 1024  # characters of output per OUTPUT message at most (bodies stay small)
CLOSED_KEYS = 4096  # tasks remembered as finished: what they still write afterwards is dropped
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Key = tuple[str, int]  # (job id, attempt)


# --- the worker's collection of reports ------------------------------------------------------------


class _Pending:
    """One task's reports not yet sent."""

    __slots__ = ("chunks", "done", "progress", "sizes")

    def __init__(self) -> None:
        self.chunks: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.progress: tuple[float | None, str | None] | None = None
        self.done = False


class TaskReports:
    """Output and progress of the running tasks, written from any thread, sent by the worker's loop."""

    def __init__(self, limit: int = DEFAULT_LIMIT, interval: float = FLUSH_INTERVAL):
        self.limit = limit
        self.interval = interval
        self._lock = threading.Lock()
        self._tasks: dict[Key, _Pending] = {}
        # Tasks whose outcome is known. A thread left running after a timeout, or a terminated child's last
        # bytes, must not start a new entry that nothing would ever finish.
        self._closed: OrderedDict[Key, None] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush: Callable[[], None] | None = None
        self._armed = False

    def bind(self, loop: asyncio.AbstractEventLoop, flush: Callable[[], None]) -> None:
        """Reports arriving from now on make `flush` run on `loop` within `interval` seconds."""
        self._loop = loop
        self._flush = flush

    def output(self, key: Key, stream: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            p = self._tasks.get(key)
            if p is None or p.done:
                if key in self._closed:
                    return
                p = self._tasks[key] = _Pending()
            parts = p.chunks.get(stream)
            if parts is None:
                parts = p.chunks[stream] = []
                p.sizes[stream] = 0
            parts.append(text)
            size = p.sizes[stream] + len(text)
            if size > 2 * self.limit:  # keep the tail only; amortised: at most one join per `limit` characters
                tail = "".join(parts)[-self.limit :]
                parts[:] = [tail]
                size = len(tail)
            p.sizes[stream] = size
        self._arm()

    def progress(self, key: Key, fraction: float | None, message: str | None) -> None:
        with self._lock:
            p = self._tasks.get(key)
            if p is None or p.done:
                if key in self._closed:
                    return
                p = self._tasks[key] = _Pending()
            p.progress = (fraction, message)
        self._arm()

    def finish(self, key: Key) -> None:
        """The task has its outcome: what it still has pending goes with the next send, then it is dropped;
        what it writes from now on is ignored."""
        with self._lock:
            p = self._tasks.get(key)
            if p is not None:
                p.done = True
            self._closed[key] = None
            if len(self._closed) > CLOSED_KEYS:
                self._closed.popitem(last=False)

    def drain(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """(PROGRESS entries, OUTPUT entries) pending now; finished tasks are forgotten."""
        if not self._tasks:
            return [], []
        progress: list[list[Any]] = []
        output: list[list[Any]] = []
        with self._lock:
            for key, p in list(self._tasks.items()):
                if p.progress is not None:
                    progress.append([key[0], key[1], p.progress[0], p.progress[1]])
                    p.progress = None
                for stream, parts in p.chunks.items():
                    if parts:
                        text = "".join(parts)
                        if len(text) > self.limit:
                            text = text[-self.limit :]
                        output.append([key[0], key[1], stream, text])
                p.chunks.clear()
                p.sizes.clear()
                if p.done:
                    del self._tasks[key]
        return progress, output

    def send(self, send: Callable[[Cmd, Any], None]) -> None:
        """Send what is pending (output first: progress is the newer news)."""
        progress, output = self.drain()
        batch: list[list[Any]] = []
        size = 0
        for entry in output:
            if batch and size + len(entry[3]) > MESSAGE_CHARS:
                send(Cmd.OUTPUT, batch)
                batch, size = [], 0
            batch.append(entry)
            size += len(entry[3])
        if batch:
            send(Cmd.OUTPUT, batch)
        if progress:
            send(Cmd.PROGRESS, progress)

    def _arm(self) -> None:
        if self._armed or self._loop is None:
            return
        self._armed = True
        try:
            self._loop.call_soon_threadsafe(self._schedule)
        except RuntimeError:  # the loop is closed: nobody sends any more
            pass

    def _schedule(self) -> None:
        assert self._loop is not None
        self._loop.call_later(self.interval, self._fire)

    def _fire(self) -> None:
        self._armed = False
        if self._flush is not None:
            self._flush()


# --- threads and asyncio modes: a context variable names the current task -------------------------


class TaskContext:
    """The current task of a thread or asyncio task (conveyor.task.current): where its reports go."""

    __slots__ = ("closed", "key", "reports")

    def __init__(self, key: Key, reports: TaskReports):
        self.key = key
        self.reports = reports
        self.closed = False

    def progress(self, fraction: float | None, message: str | None) -> None:
        if not self.closed:
            self.reports.progress(self.key, fraction, message)


def _current_context() -> TaskContext | None:
    ctx = task.current.get()
    return ctx if isinstance(ctx, TaskContext) else None


def enter(reports: TaskReports, key: Key) -> TaskContext:
    """From here on, in this thread (or asyncio task), output and progress belong to this task."""
    ctx = TaskContext(key, reports)
    task.current.set(ctx)
    return ctx


def leave(ctx: TaskContext) -> None:
    ctx.closed = True  # a thread or coroutine the task left behind writes to the worker's streams again
    task.current.set(None)


class _StreamProxy:
    """Stands in for sys.stdout / sys.stderr: a task's writes go to its buffer, anything else through."""

    def __init__(self, stream: str, original: Any):
        self._stream = stream
        self._original = original

    def write(self, text: str) -> int:
        ctx = _current_context()
        if ctx is None or ctx.closed:
            return int(self._original.write(text))
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        ctx.reports.output(ctx.key, self._stream, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        ctx = _current_context()
        if ctx is None or ctx.closed:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, buffer...
        return getattr(self._original, name)


class _TaskLogHandler(logging.Handler):
    """Log records emitted while a task is current become that task's `log` stream."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = _current_context()
        if ctx is None or ctx.closed:
            return
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        ctx.reports.output(ctx.key, "log", text)


_install_lock = threading.Lock()
_installs = 0
_proxies: tuple[_StreamProxy, _StreamProxy] | None = None
_log_handler: _TaskLogHandler | None = None


def install() -> None:
    """Route task output by context (refcounted: several workers may share a process, as in tests)."""
    global _installs, _proxies, _log_handler
    with _install_lock:
        _installs += 1
        if _installs > 1:
            return
        out, err = _StreamProxy("stdout", sys.stdout), _StreamProxy("stderr", sys.stderr)
        sys.stdout, sys.stderr = out, err
        _proxies = (out, err)
        handler = _TaskLogHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        _log_handler = handler


def uninstall() -> None:
    global _installs, _proxies, _log_handler
    with _install_lock:
        if _installs == 0:
            return
        _installs -= 1
        if _installs:
            return
        if _proxies is not None:
            out, err = _proxies
            if sys.stdout is out:
                sys.stdout = out._original
            if sys.stderr is err:
                sys.stderr = err._original
            _proxies = None
        if _log_handler is not None:
            logging.getLogger().removeHandler(_log_handler)
            _log_handler = None


# --- processes mode: the child's side ----------------------------------------------------------------

_child_events: int | None = None  # the events pipe of this process, when it is a processes-mode child
_child_lock = threading.Lock()


def _child_write(record: list[Any]) -> None:
    fd = _child_events
    if fd is None:
        return
    data = msgpack.packb(record, use_bin_type=True)
    with _child_lock:  # threads of one task write whole records, never interleaved
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # the worker is gone
            view = view[n:]


class _ChildReporter:
    """conveyor.progress in a processes-mode child: a record on the events pipe."""

    def progress(self, fraction: float | None, message: str | None) -> None:
        _child_write(["p", fraction, message])


class _ChildLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        _child_write(["l", text])


def install_child(pipes: list[Connection], log_level: int = logging.INFO, capture_output: bool = True) -> None:
    """In a processes-mode child: fd 1 and 2 become the worker's pipes, unbuffered; logging and progress
    go to the events pipe. Called once, before the child runs any task. `pipes` are the write ends made
    by `child_pipes` (Connection objects only because multiprocessing knows how to hand those over).
    Without `capture_output`, only progress reports go to the worker."""
    global _child_events
    stdout, stderr, events = pipes
    if capture_output:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
    _child_events = os.dup(events.fileno())
    task.process_reporter = _ChildReporter()
    for conn in pipes:
        conn.close()
    if not capture_output:
        return
    # Unbuffered (as with `python -u`): what a task printed reaches the worker even if it then crashes.
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _ChildLogHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(log_level)


# --- processes mode: the worker's side ---------------------------------------------------------------


class ChildCapture:
    """The worker's ends of one child's pipes: stdout, stderr and events, read as data arrives."""

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
        for fd in self._fds:
            os.set_blocking(fd, False)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for fd in self._fds:
            loop.add_reader(fd, self._read, fd)

    def drain(self) -> None:
        """Read whatever the child wrote so far (it wrote it all before it sent its outcome)."""
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


def child_pipes() -> tuple[list[int], list[Connection]]:
    """(worker's read ends, child's write ends) of a child's stdout, stderr and events pipes.

    The write ends are wrapped as Connections so that they can be passed to a child process; the worker
    closes its copies once the child has started."""
    reads: list[int] = []
    writes: list[Connection] = []
    for _ in range(3):
        r, w = os.pipe()
        reads.append(r)
        writes.append(Connection(w, readable=False))
    return reads, writes

"""What running tasks say, buffered until the worker sends it: stdout, stderr, log records and progress.

Everything a task produces lands in the worker's `TaskReports`, keyed by (job id, attempt), from any
thread. The worker's loop takes it out (`take`) a few times a second and sends it as OUTPUT and
PROGRESS messages, and always right before the RESULTS entry of that task, so the dispatcher has a
task's last output when it learns the outcome. Each stream keeps only its tail (`limit_chars`
characters) between two sends. Nothing here sends a message.

How output gets here depends on the mode: modes/inproc_capture.py (threads and asyncio: proxies for
sys.stdout, sys.stderr and logging, by context variable) and modes/processes/ (a child's file
descriptors 1 and 2 and an events pipe, read by the worker).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conveyor.worker.execution import Key

if TYPE_CHECKING:
    import asyncio

STREAMS = ("stdout", "stderr", "log")
DEFAULT_LIMIT_CHARS = 64 * 1024  # characters of each stream kept per task (the tail)
FLUSH_INTERVAL = 0.2  # seconds between two sends of a running task's output and progress
MESSAGE_CHARS = 4 * 1024 * 1024  # characters of output per OUTPUT message at most (bodies stay small)
CLOSED_KEYS = 4096  # tasks remembered as finished: what they still write afterwards is dropped
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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

    def __init__(self, limit_chars: int = DEFAULT_LIMIT_CHARS, interval: float = FLUSH_INTERVAL):
        self.limit = limit_chars
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

    def take(self) -> tuple[list[list[Any]], list[list[list[Any]]]]:
        """What is pending now, to send: (PROGRESS entries, OUTPUT entries cut into messages of at most
        MESSAGE_CHARS characters). Output goes first: progress is the newer news."""
        progress, output = self.drain()
        batches: list[list[list[Any]]] = []
        batch: list[list[Any]] = []
        size = 0
        for entry in output:
            if batch and size + len(entry[3]) > MESSAGE_CHARS:
                batches.append(batch)
                batch, size = [], 0
            batch.append(entry)
            size += len(entry[3])
        if batch:
            batches.append(batch)
        return progress, batches

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

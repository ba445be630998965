"""A processes-mode child: read a task from the pipe, run it, write the outcome back; its output goes to pipes.

The task pipe is one end of a Unix socket pair, read and written directly: one message is a 4-byte
little-endian header length, the msgpack header, then the data frames back to back,
    parent -> child   [job_id, attempt, timeout, retry_on, [frame lengths]], then the call frames; a
                      length [name, size] is a frame in /dev/shm the child reads (transport/shm.py)
    child -> parent   [ok, info, [frame lengths]], then the result frames
                      or ["lent", job_id, attempt, waiting] (no frames): its task blocks on a child of
                      its own (waiting true) or stops waiting, so the worker may run one more task meanwhile
written with one writev (not one write per frame) and read by a buffered reader, which reads a large
frame straight into the bytes object the task gets (multiprocessing's recv_bytes copies it several times).

The child's side of output capture: file descriptors 1 and 2 become pipes the worker reads (so C-level
writes, subprocesses' output and what a task wrote before it crashed are kept), Python's streams are
unbuffered, and log records and progress reports go through a third pipe as msgpack records.

The child exits when the pipe closes (its worker is gone) and ignores SIGINT: a Ctrl-C at the terminal
reaches the whole process group, and it is the worker's job to stop its children. It raises its own
oom_score_adj, so that under memory pressure the kernel kills a child (its task fails with WorkerCrashed)
rather than the worker.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import msgpack

from conveyor import task
from conveyor.transport.shm import read_segment
from conveyor.worker.execution import Task, failure, run_sync
from conveyor.worker.reports import LOG_FORMAT

READ_BUFFER = 1 << 16
IOV_MAX = 512  # buffers per writev, well under the system's IOV_MAX (1024 on Linux)
LENT = "lent"  # the first field of a child's message saying its task lends its slot (or takes it back)
OOM_SCORE_BONUS = 500  # added to a child's oom_score_adj (capped at 1000): the OOM killer picks a child first


def child_main(
    task_fd: int,
    pipes: list[int] | None = None,
    log_level: int = logging.INFO,
    capture: bool = True,
    oom_score_bonus: int = OOM_SCORE_BONUS,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_oom_score(oom_score_bonus)
    if pipes:  # stdout, stderr and events pipes to the worker
        install_capture(pipes, log_level, capture)
    fd = task_fd
    os.set_blocking(fd, True)
    reader = open(fd, "rb", buffering=READ_BUFFER, closefd=False)  # noqa: SIM115 - lives as long as the loop
    packer = msgpack.Packer()
    task.lender.set(_PipeLender(fd))  # a task waiting on its child lends its slot (conveyor.task.slot_lent)
    while True:
        try:
            header = _read_exactly(reader, int.from_bytes(_read_exactly(reader, 4), "little"))
            job_id, attempt, timeout, retry_on, lengths = msgpack.unpackb(header)
            frames = [_read_exactly(reader, n) if type(n) is int else n for n in lengths]
        except (EOFError, OSError, ValueError):
            return
        job = Task(job_id, attempt, timeout, tuple(retry_on), frames)
        try:  # [name, size]: a frame in /dev/shm, read here rather than sent down the pipe
            frames[:] = [read_segment(*f) if type(f) is list else f for f in frames]
        except OSError as exc:
            outcome = failure(job, exc)
        else:
            outcome = run_sync(job)
        del job, frames  # the argument goes with its task
        try:
            with _pipe_lock:
                write_message(
                    fd,
                    packer.pack([outcome.ok, outcome.info, [memoryview(f).nbytes for f in outcome.frames]]),
                    outcome.frames,
                )
        except OSError:  # the worker is gone
            return


_pipe_lock = threading.Lock()  # whole messages on the task pipe: a lending note may come from another thread


class _PipeLender:
    """conveyor.task.Lender in a child: tells the worker over the task pipe when the task starts and stops
    waiting on its children (nested waits count once), so the worker may run one more task meanwhile."""

    def __init__(self, fd: int):
        self._fd = fd
        self._depth = 0

    def lend(self, job: tuple[str, int]) -> None:
        with _pipe_lock:
            self._depth += 1
            if self._depth == 1:
                self._send(job, True)

    def back(self, job: tuple[str, int]) -> None:
        with _pipe_lock:
            self._depth -= 1
            if self._depth == 0:
                self._send(job, False)

    def _send(self, job: tuple[str, int], waiting: bool) -> None:
        try:
            write_message(self._fd, msgpack.packb([LENT, job[0], job[1], waiting]), ())
        except OSError:
            pass  # the worker is gone; the task's outcome will not reach it either


def raise_oom_score(bonus: int) -> int | None:
    """Add `bonus` to this process's oom_score_adj (at most 1000; raising it needs no privilege). Returns
    the new value, or None where there is no such setting."""
    if bonus <= 0:
        return None
    try:
        with open("/proc/self/oom_score_adj", "r+") as f:
            current = int(f.read().strip() or 0)
            target = min(1000, current + bonus)
            if target > current:
                f.seek(0)
                f.write(str(target))
            return target
    except (OSError, ValueError):
        return None


def _read_exactly(reader: Any, n: int) -> bytes:
    data: bytes = reader.read(n)
    if len(data) != n:
        raise EOFError
    return data


def write_message(fd: int, header: bytes, frames: Sequence[Any]) -> None:
    """Write one message (blocking fd): length prefix, header and frames, with as few writev calls as fit."""
    pending: list[Any] = [len(header).to_bytes(4, "little") + header]
    pending.extend(frames)
    while pending:
        n = os.writev(fd, pending[:IOV_MAX])
        consume(pending, n)


def consume(pending: list[Any], n: int) -> None:
    """Drop the first n bytes written from the front of pending (a list of buffers), in place."""
    while n:
        first = memoryview(pending[0]).cast("B")
        if n >= len(first):
            n -= len(first)
            del pending[0]
        else:
            pending[0] = first[n:]
            return
    while pending and not memoryview(pending[0]).nbytes:
        del pending[0]


# --- output capture, the child's side ---------------------------------------------------------------------

_events_fd: int | None = None  # the events pipe of this process, once install_capture ran
_events_lock = threading.Lock()


def _write_event(record: list[Any]) -> None:
    fd = _events_fd
    if fd is None:
        return
    data = msgpack.packb(record, use_bin_type=True)
    with _events_lock:  # threads of one task write whole records, never interleaved
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # the worker is gone
            view = view[n:]


class _Reporter:
    """conveyor.progress in a processes-mode child: a record on the events pipe."""

    def progress(self, fraction: float | None, message: str | None) -> None:
        _write_event(["p", fraction, message])


class _LogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        _write_event(["l", text])


def install_capture(pipes: list[int], log_level: int = logging.INFO, capture_output: bool = True) -> None:
    """fd 1 and 2 become the worker's pipes, unbuffered; logging and progress go to the events pipe. Called
    once, before the child runs any task. `pipes` are the write ends made by `channel.child_pipes`, passed
    on by the fork server. Without `capture_output`, only progress reports go to the worker."""
    global _events_fd
    stdout, stderr, events = pipes
    if capture_output:
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
    _events_fd = os.dup(events)
    task.process_reporter = _Reporter()
    for fd in pipes:
        os.close(fd)
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
    handler = _LogHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(log_level)

"""The loop of a processes-mode child: read a task from the pipe, run it, write the outcome back.

The task pipe is the socket of a multiprocessing Connection, but read and written directly: one
message is a 4-byte little-endian header length, the msgpack header, then the data frames back to back,
    parent -> child   [job_id, attempt, timeout, retry_on, [frame lengths]], then the call frames
    child -> parent   [ok, info, [frame lengths]], then the result frames
written with one writev (not one write per frame) and read by a buffered reader, which reads a large
frame straight into the bytes object the task gets (Connection.recv_bytes copies it several times).
The child exits when the pipe closes (its worker is gone) and ignores SIGINT: a Ctrl-C at the
terminal reaches the whole process group, and it is the worker's job to stop its children.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from conveyor.worker.capture import install_child
from conveyor.worker.execution import Task, run_sync


def child_main(
    conn: Connection, pipes: list[Connection] | None = None, log_level: int = 20, capture: bool = True
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if pipes:  # stdout, stderr and events pipes to the worker (see capture.py)
        install_child(pipes, log_level, capture)
    fd = conn.fileno()
    os.set_blocking(fd, True)
    reader = open(fd, "rb", buffering=READ_BUFFER, closefd=False)  # noqa: SIM115 - lives as long as the loop
    packer = msgpack.Packer()
    while True:
        try:
            header = _read_exactly(reader, int.from_bytes(_read_exactly(reader, 4), "little"))
            job_id, attempt, timeout, retry_on, lengths = msgpack.unpackb(header)
            frames = [_read_exactly(reader, n) for n in lengths]
        except (EOFError, OSError, ValueError):
            return
        outcome = run_sync(Task(job_id, attempt, timeout, tuple(retry_on), frames))
        try:
            write_message(
                fd,
                packer.pack([outcome.ok, outcome.info, [memoryview(f).nbytes for f in outcome.frames]]),
                outcome.frames,
            )
        except OSError:  # the worker is gone
            return


READ_BUFFER = 1 << 16
_IOV_MAX = 512  # buffers per writev, well under the system's IOV_MAX (1024 on Linux)


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
        n = os.writev(fd, pending[:_IOV_MAX])
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

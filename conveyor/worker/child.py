"""The loop of a processes-mode child: read a task from the pipe, run it, write the outcome back.

Pipe messages are sequences of byte strings (multiprocessing Connection framing):
    parent -> child   msgpack [job_id, attempt, timeout, retry_on, n], then n data frames
    child -> parent   msgpack [ok, info, n], then n data frames
The child exits when the pipe closes (its worker is gone) and ignores SIGINT: a Ctrl-C at the
terminal reaches the whole process group, and it is the worker's job to stop its children.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection

import msgpack

from conveyor.worker.capture import install_child
from conveyor.worker.execution import Task, run_sync


def child_main(
    conn: Connection, pipes: list[Connection] | None = None, log_level: int = 20, capture: bool = True
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if pipes:  # stdout, stderr and events pipes to the worker (see capture.py)
        install_child(pipes, log_level, capture)
    while True:
        try:
            job_id, attempt, timeout, retry_on, n = msgpack.unpackb(conn.recv_bytes())
            frames = [conn.recv_bytes() for _ in range(n)]
        except (EOFError, OSError):
            return
        outcome = run_sync(Task(job_id, attempt, timeout, tuple(retry_on), frames))
        try:
            conn.send_bytes(msgpack.packb([outcome.ok, outcome.info, len(outcome.frames)]))
            for frame in outcome.frames:
                conn.send_bytes(frame)
        except (BrokenPipeError, OSError):
            return

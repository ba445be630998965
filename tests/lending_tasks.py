"""Task functions of the slot-lending tests (tests/test_lending.py): tasks that wait on their own children."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from pathlib import Path
from typing import Any

import conveyor
from tests.graph_tasks import inc, slow


def wait_in_a_thread(x: int, wait_s: float) -> str:
    """Waits on its child from a thread it starts, which lends nothing (that thread is not the task):
    on a one-slot worker the child cannot start before the wait gives up."""
    fut = conveyor.current_client().submit(inc, x)
    seen: list[str] = []

    def wait() -> None:
        try:
            seen.append(f"child ran: {fut.result(timeout=wait_s)}")
        except TimeoutError:
            seen.append("the child never started")

    t = threading.Thread(target=wait)
    t.start()
    t.join()
    return seen[0]


def lend_and_record(pid_path: str, child_s: float) -> Any:
    """Write this process's pid, then wait on a slow child (the test kills or times out this task)."""
    fut = conveyor.current_client().submit(slow, child_s, "child")
    Path(pid_path).write_text(str(os.getpid()))
    return fut.result(timeout=60)


def wait_for_all(xs: list[int], seconds: float) -> list[Any]:
    """A fan-out waited on with concurrent.futures.wait (no result() until all are done)."""
    client = conveyor.current_client()
    futures = [client.submit(slow, seconds, x) for x in xs]
    _, not_done = concurrent.futures.wait(futures, timeout=30)
    assert not not_done
    return [f.result(0) for f in futures]


def as_they_complete(xs: list[int], seconds: float) -> list[Any]:
    """A fan-out waited on with concurrent.futures.as_completed."""
    client = conveyor.current_client()
    futures = [client.submit(slow, seconds, x) for x in xs]
    return sorted(f.result(0) for f in concurrent.futures.as_completed(futures, timeout=30))


async def await_child(x: int) -> int:
    """An asyncio-mode task that awaits its child (a JobFuture is awaitable), and a grandchild via with_child."""
    client = conveyor.current_client()
    first = await client.submit(inc, x)
    return int(await client.submit(async_with_child, first)) + 1000


async def async_with_child(x: int) -> int:
    return int(await conveyor.current_client().submit(inc, x)) + 100


async def blocks_the_loop(x: int) -> str:
    """A coroutine task that calls the blocking result() on the task loop: a clear error, not a hang."""
    try:
        conveyor.current_client().submit(inc, x).result(timeout=10)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def sleeps(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def client_or_why() -> str:
    """What conveyor.current_client() gives this task: 'a client', or the error's message."""
    try:
        conveyor.current_client()
    except RuntimeError as exc:
        return str(exc)
    return "a client"


def returns_child(x: int) -> Any:
    """Returns its child's future: a JobFuture is awaitable, so the worker awaits it (lending the slot)."""
    return conveyor.current_client().submit(inc, x)

"""Task functions the tests submit; workers import them by reference (tests.tasks:NAME)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any


def noop(x: Any = None) -> Any:
    return x


def add(a: int, b: int = 0) -> int:
    return a + b


def whoami() -> dict[str, Any]:
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "thread": threading.current_thread().name,
        "main_thread": threading.current_thread() is threading.main_thread(),
        "in_loop": in_loop,
    }


async def async_whoami() -> dict[str, Any]:
    await asyncio.sleep(0)
    info = whoami()
    info["in_loop"] = True
    return info


def fail(message: str = "boom") -> None:
    raise ValueError(message)


class CustomError(Exception):
    pass


def fail_custom() -> None:
    raise CustomError("custom failure")


def size_of(data: bytes, seconds: float = 0.0) -> int:
    """len(data), after sleeping (a task that holds its argument for a while)."""
    if seconds:
        time.sleep(seconds)
    return len(data)


def sleep_for(seconds: float, value: Any) -> Any:
    """Sleep, then return value (which job this was)."""
    time.sleep(seconds)
    return value


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def spin(seconds: float) -> int:
    """Busy pure-Python loop (interruptible at bytecode boundaries)."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def crash() -> None:
    os._exit(13)


def sleep_marked(marker: str, seconds: float) -> float:
    """Sleep, after creating `marker`: a test waits for the file to know the task has really started
    (the dispatcher counts a job as running from its assignment, before the worker starts it)."""
    Path(marker).touch()
    time.sleep(seconds)
    return seconds


def pid_and_sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def flaky(marker: str, failures: int) -> int:
    """Fail with OSError `failures` times (counted in a file), then return the attempt number."""
    path = Path(marker)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    if attempt <= failures:
        raise OSError(f"flaky failure {attempt}")
    return attempt


class Unpicklable(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.lock = threading.Lock()  # cannot be pickled: the client gets a RemoteError instead


def fail_unpicklable() -> None:
    raise Unpicklable("holds a lock")


# --- in-process gates (tests/test_inproc.py): the worker runs in the test's own process ----------

_gates: dict[str, threading.Event] = {}


def _gate(name: str) -> threading.Event:
    return _gates.setdefault(name, threading.Event())


def wait_gate(name: str, timeout: float = 30.0) -> str:
    """Block until open_gate(name) is called in this process (only meaningful for in-process workers)."""
    if not _gate(name).wait(timeout):
        raise TimeoutError(f"gate {name!r} was never opened")
    return name


def open_gate(name: str) -> None:
    _gate(name).set()


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV


def leak(mb_per_step: int = 20, steps: int = 100) -> int:
    hoard = []
    for _ in range(steps):
        hoard.append(bytearray(mb_per_step << 20))
        time.sleep(0.05)
    return len(hoard)


def square_after(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def wait_gate_lending(name: str, timeout: float = 30.0) -> str:
    """wait_gate, as a task blocked on a child waits: lending its slot (conveyor.task.slot_lent)."""
    from conveyor.task import slot_lent

    with slot_lent():
        return wait_gate(name, timeout)

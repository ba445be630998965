"""The demo's task functions. Workers import them by reference (`conveyor.demo.tasks:name`).

Module-level variables here are the point of experiments 1 and 2: every process that imports this
module has its own copy of them, and every thread of one process shares that process's copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
import sysconfig
import threading
import time
from typing import Any

# --- experiment 1 and 2: module-global state ---------------------------------------------------------

COUNTERS: dict[str, int] = {}  # one counter per demo run (a running cluster may serve several runs)
SHARED: dict[str, int] = {}
_registry = threading.Lock()
_counter_lock = threading.Lock()
_locks: dict[str, threading.Lock] = {}
_barriers: dict[str, threading.Barrier] = {}


def ping() -> int:
    """The cheapest task: start-up time is measured to its first result."""
    return os.getpid()


def where() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "thread": threading.current_thread().name}


def bump_counter(key: str, pause: float = 0.002) -> dict[str, Any]:
    """Add one to this process's copy of the counter; say which process and what it now holds."""
    time.sleep(pause)  # a little time per task, so every child of a processes worker gets some
    with _counter_lock:
        COUNTERS[key] = COUNTERS.get(key, 0) + 1
        value = COUNTERS[key]
    return {"host": socket.gethostname(), "pid": os.getpid(), "value": value}


def read_counter(key: str) -> int:
    return COUNTERS.get(key, 0)


def _lock_for(name: str) -> threading.Lock:
    with _registry:
        return _locks.setdefault(name, threading.Lock())


def _barrier_for(name: str, parties: int) -> threading.Barrier:
    with _registry:
        return _barriers.setdefault(name, threading.Barrier(parties))


def racy_add(key: str, n: int) -> int:
    """Read-modify-write without a lock. time.sleep(0) between the read and the write lets another
    thread run there, as a preemption at that point would: its update is then overwritten."""
    for _ in range(n):
        value = SHARED.get(key, 0)
        time.sleep(0)
        SHARED[key] = value + 1
    return os.getpid()


def locked_add(key: str, n: int) -> int:
    """The same read-modify-write, with the read and the write under one lock."""
    lock = _lock_for(f"{key}/add")
    for _ in range(n):
        with lock:
            value = SHARED.get(key, 0)
            time.sleep(0)
            SHARED[key] = value + 1
    return os.getpid()


def read_shared(key: str) -> dict[str, int]:
    return {"pid": os.getpid(), "value": SHARED.get(key, 0)}


def lock_pair(key: str, first: str, second: str, timeout: float, rendezvous: bool) -> dict[str, Any]:
    """Take lock `first`, then try lock `second` for at most `timeout` seconds; never hangs.

    With rendezvous, two of these calls meet at a barrier while each holds its first lock, so if
    they take the locks in opposite orders each waits for the other: a deadlock, which the timed
    acquire detects. They meet again before letting go, so both see it.
    """
    outer, inner = _lock_for(f"{key}/{first}"), _lock_for(f"{key}/{second}")
    started = time.perf_counter()
    if not outer.acquire(timeout=timeout):
        return {"order": f"{first}->{second}", "got_second": False, "waited": timeout, "note": "first lock busy"}
    try:
        met = True
        if rendezvous:
            met = _meet(f"{key}/meet-1", timeout)
        t = time.perf_counter()
        got = inner.acquire(timeout=timeout)
        waited = time.perf_counter() - t
        if got:
            time.sleep(0.01)  # a little work under both locks
            inner.release()
        if rendezvous:
            _meet(f"{key}/meet-2", timeout * 2)
    finally:
        outer.release()
    return {
        "order": f"{first}->{second}",
        "got_second": got,
        "waited": round(waited, 4),
        "met": met,
        "total": round(time.perf_counter() - started, 4),
    }


def _meet(name: str, timeout: float) -> bool:
    try:
        _barrier_for(name, 2).wait(timeout)
        return True
    except threading.BrokenBarrierError:
        return False


# --- experiments 3 to 7: CPU-bound work ---------------------------------------------------------------


def spin(n: int) -> int:
    """Pure-Python CPU work: the interpreter holds the GIL for all of it."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


_buffers: dict[int, bytes] = {}


def sha_rounds(mib: int, rounds: int) -> str:
    """SHA-256 over a large buffer: hashlib releases the GIL while it hashes big inputs."""
    with _registry:
        data = _buffers.get(mib)
        if data is None:
            data = _buffers[mib] = bytes(range(256)) * (mib * 4096)
    digest = b""
    for _ in range(rounds):
        digest = hashlib.sha256(data).digest()
    return digest.hex()[:16]


# --- experiment 8: crashes ------------------------------------------------------------------------------


def hold(seconds: float) -> dict[str, Any]:
    """Occupy a slot for a while, then say where it ran."""
    time.sleep(seconds)
    return where()


def crash_now() -> None:
    """End the process running this task at once, as a segfault would: no exception, no clean-up."""
    sys.stdout.flush()
    os._exit(13)


def crash_once(marker: str) -> dict[str, Any]:
    """Crash the process the first time (creating `marker`); run normally once it exists."""
    try:
        with open(marker, "x", encoding="utf-8") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return where()
    crash_now()
    return where()  # not reached


# --- experiment 9: waiting --------------------------------------------------------------------------------


async def wait_async(seconds: float) -> int:
    """Waits without blocking: thousands of these share one thread's event loop."""
    await asyncio.sleep(seconds)
    return os.getpid()


def wait_blocking(seconds: float) -> int:
    """Waits by blocking its thread (or its whole process, in processes mode)."""
    time.sleep(seconds)
    return os.getpid()


# --- experiment 10: the interpreter -------------------------------------------------------------------------


def interpreter_info() -> dict[str, Any]:
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return {
        "implementation": sys.implementation.name,
        "version": sys.version.split()[0],
        "version_full": sys.version,
        "executable": sys.executable,
        "free_threaded_build": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
        "gil_enabled": bool(is_gil_enabled()) if callable(is_gil_enabled) else True,
        "has_is_gil_enabled": callable(is_gil_enabled),
        "switch_interval": sys.getswitchinterval(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }

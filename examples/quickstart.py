"""Conveyor quick start: real work on a private local cluster, in each of the three modes.

    pip install . && python examples/quickstart.py

`Client()` with no address (and no CONVEYOR_DISPATCHER) starts a dispatcher and a worker for
the life of the client. Point it at a real cluster with Client("tcp://host:5555") and nothing
else changes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from conveyor import Client


def cpu_work(n: int) -> int:
    """Pure-Python CPU work: the GIL lets only one thread of a process run this at a time."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


async def wait_a_bit(i: int) -> int:
    await asyncio.sleep(0.2)
    return i


def where() -> str:
    return f"pid {os.getpid()} / {threading.current_thread().name}"


def main() -> None:
    cores = os.cpu_count() or 1
    for mode in ("processes", "threads"):
        with Client(local_mode=mode, local_concurrency=cores) as client:
            started = time.perf_counter()
            results = list(client.map(cpu_work, [3_000_000] * (2 * cores)))
            elapsed = time.perf_counter() - started
            print(f"{mode:>9}: {len(results)} CPU-bound tasks in {elapsed:.2f} s on {client.submit(where).result()}")
    with Client(local_mode="asyncio") as client:
        started = time.perf_counter()
        waited = list(client.map(wait_a_bit, range(1000)))
        print(f"  asyncio: {len(waited)} tasks that each wait 0.2 s, done in {time.perf_counter() - started:.2f} s")
        try:
            client.submit(int, "not a number").result()
        except ValueError as exc:
            print(f"  errors come back as themselves: ValueError({exc})")


if __name__ == "__main__":
    main()

"""Task functions the benchmarks run. Workers import them by reference (benchmarks.tasks:NAME),
so keep them at module level and free of imports the workers may not have."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any


def noop(x: Any = None) -> Any:
    return x


def getpid(_: Any = None) -> int:
    return os.getpid()


def payload_len(data: bytes) -> int:
    return len(data)


def cpu_loop(n: int) -> int:
    """Pure-Python arithmetic loop: holds the GIL the whole time, deterministic result."""
    total = 0
    for i in range(n):
        total += (i * i) % 7
    return total


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def apply_chunk(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """fn over a chunk of items in one task (manual batching for backends without chunksize)."""
    return [fn(x) for x in items]

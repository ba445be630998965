"""Example task functions. Run workers from the repository root so `examples.tasks` is importable."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading


def square(x: int) -> int:
    return x * x


def checksum(text: str, rounds: int = 100_000) -> str:
    """CPU-bound: hash a string many times."""
    data = text.encode()
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()[:16]


async def fetch(name: str, delay: float = 0.1) -> str:
    """I/O-bound stand-in: waits without blocking the worker's event loop."""
    await asyncio.sleep(delay)
    return f"fetched {name}"


def where() -> str:
    return f"pid {os.getpid()}, thread {threading.current_thread().name}"

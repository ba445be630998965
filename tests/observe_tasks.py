"""Tasks for the observability tests (tests/test_observe*.py): output, logging, progress, crashes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import conveyor

log = logging.getLogger("tests.observe_tasks")


def chatty(tag: str, lines: int = 3, pause: float = 0.0) -> str:
    """Print to stdout and stderr and log, each line naming the tag (to check tasks never mix)."""
    for i in range(lines):
        print(f"{tag} out {i}")
        print(f"{tag} err {i}", file=sys.stderr)
        log.warning("%s log %d", tag, i)
        if pause:
            time.sleep(pause)
    return tag


async def async_chatty(tag: str, lines: int = 3, pause: float = 0.01) -> str:
    for i in range(lines):
        print(f"{tag} out {i}")
        print(f"{tag} err {i}", file=sys.stderr)
        log.warning("%s log %d", tag, i)
        await asyncio.sleep(pause)
    return tag


def flood(megabytes: int = 4) -> int:
    """Print `megabytes` MiB to stdout in numbered lines; the last line says END."""
    line = "x" * 1000
    n = (megabytes << 20) // 1024
    for i in range(n):
        print(f"{i:08d} {line[:1014]}")
    print("END of flood")
    return n


def print_then_crash(text: str) -> None:
    print(f"last words: {text}")
    print("stderr words", file=sys.stderr)
    log.warning("logged words")
    os._exit(3)


def fail_loudly(text: str) -> None:
    print(f"about to fail: {text}")
    raise RuntimeError(f"failed on purpose: {text}")


def steps(n: int, pause: float, message: str = "step") -> int:
    """Report progress n times, pausing between reports."""
    for i in range(n):
        conveyor.progress((i + 1) / n, f"{message} {i + 1}/{n}")
        time.sleep(pause)
    return n


async def async_steps(n: int, pause: float) -> int:
    for i in range(n):
        conveyor.progress((i + 1) / n, f"step {i + 1}/{n}")
        await asyncio.sleep(pause)
    return n


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Print, report progress, then block until `path` exists (lets a test look at a running job)."""
    print("waiting for", path)
    conveyor.progress(0.5, "half way")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
    print("done waiting")
    return path


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b

"""Task functions of the client tests; workers import them by reference (tests.client_tasks:NAME)."""

from __future__ import annotations

import time
from typing import Any


def fail_at(i: int, bad: int) -> int:
    """i, except that item `bad` raises ValueError."""
    if i == bad:
        raise ValueError(f"item {i} is bad")
    return i


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def pair(a: Any, b: Any) -> list[Any]:
    return [a, b]


class Dummy:
    """A result that is not plain data (it travels pickled), to watch for references the client keeps."""

    def __init__(self, n: int):
        self.n = n


def make_dummy(n: int) -> Dummy:
    return Dummy(n)

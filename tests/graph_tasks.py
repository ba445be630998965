"""Task functions of the dependency tests (tests/test_workflows.py); workers import them by reference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conveyor import Failed


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int = 0) -> int:
    return a + b


def total(values: Any) -> int:
    """The sum of a list (or a dict's values) of results."""
    return sum(values.values()) if isinstance(values, dict) else sum(values)


def describe(value: Any) -> str:
    """What a dependant received: 'Failed:<type>:<root job>' for a failed parent, else repr."""
    if isinstance(value, Failed):
        return f"Failed:{type(value.error).__name__}:{value.job_id}:{value.state}"
    return repr(value)


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def slow(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def mark(path: str, value: Any = None) -> Any:
    """Append one line to `path` (how many times did it run?) and return value."""
    with Path(path).open("a") as f:
        f.write(f"{value}\n")
    return value


def blob(n_bytes: int) -> bytes:
    return b"x" * n_bytes


def length(data: bytes) -> int:
    return len(data)


def structure(*args: Any, **kwargs: Any) -> Any:
    return [list(args), kwargs]


def node(path: str, name: str, *inputs: str) -> str:
    """A node of a test graph: records that it ran (one line in `path`) and returns name(inputs)."""
    with Path(path).open("a") as f:
        f.write(f"{name}\n")
    return f"{name}({','.join(inputs)})"


def wait_file(path: str, value: Any = None, timeout_s: float = 60.0) -> Any:
    """Return value once `path` exists (a gate the test opens)."""
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)
    return value


def combine(seed: int, *inputs: int) -> int:
    """A node of a random test graph: a value from its seed and its parents' values (after a short wait)."""
    time.sleep(0.005)
    return (seed * 7919 + sum(inputs) * 31) % 1_000_003


def with_child(x: int) -> int:
    """A task that submits a child through the worker's client and waits for it."""
    import conveyor

    return conveyor.current_client().submit(inc, x).result(timeout=30) + 100

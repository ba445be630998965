"""Tasks for tests/test_interpreters_mode.py, imported by reference inside the worker's subinterpreters."""

from __future__ import annotations

import os
import time


def where(spin_s: float = 0.3) -> tuple[int, int]:
    """(pid, subinterpreter id) of whoever runs this, after spinning so that two run at once."""
    from conveyor.worker.modes.interpreters.entry import interpreter_id

    end = time.monotonic() + spin_s
    while time.monotonic() < end:
        pass
    return os.getpid(), interpreter_id()


def fail() -> None:
    raise KeyError("missing")


def single_phase() -> None:
    import _testsinglephase  # noqa: F401 - a single-phase-init extension: refuses subinterpreters


def chatty() -> str:
    print("to stdout")
    return "ok"


def spin(seconds: float, marker: str = "") -> int:
    """A busy pure-Python loop (after creating `marker`, if given, to say it started): a subinterpreter
    cannot be interrupted in it, only abandoned."""
    if marker:
        open(marker, "w").close()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def report_then_wait(path: str, timeout_s: float = 30.0) -> str:
    """Print to both streams and log, report progress, then wait for `path` (a test looks at it running)."""
    import logging
    import sys

    import conveyor

    print("waiting for", path)
    print("on stderr", file=sys.stderr)
    logging.getLogger("tests.interp_tasks").warning("logged")
    conveyor.progress(0.5, "half way")
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
    print("done waiting")
    return path


def uses_msgspec() -> None:
    import msgspec  # noqa: F401 - its extension refuses subinterpreters: the task fails naming it


async def async_where() -> tuple[int, int]:
    """An `async def` task: run with asyncio.run() inside the subinterpreter."""
    import asyncio

    from conveyor.worker.modes.interpreters.entry import interpreter_id

    await asyncio.sleep(0.01)
    return os.getpid(), interpreter_id()


def hold(marker: str, release: str) -> str:
    """Create `marker`, then wait until `release` exists (the Mode contract tests look at a running task)."""
    from pathlib import Path

    Path(marker).touch()
    while not Path(release).exists():
        time.sleep(0.005)
    return marker


def total(values: list[int]) -> int:
    return sum(values)

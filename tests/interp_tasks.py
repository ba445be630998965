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

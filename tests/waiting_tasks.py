"""Task functions of the work-that-waits end-to-end tests (tests/test_client_waiting.py)."""

from __future__ import annotations

import os
import time
from typing import Any


def stamp(seconds: float, value: Any) -> dict[str, Any]:
    """When it started and ended (wall clock), where it ran, and which job it was."""
    started = time.time()
    if seconds:
        time.sleep(seconds)
    return {"value": value, "started": started, "ended": time.time(), "pid": os.getpid()}


def stamp_once(marker: str, seconds: float, value: Any) -> dict[str, Any]:
    """stamp(), and a line in the file `marker` per run (how many times it ran, across restarts)."""
    with open(marker, "a") as f:
        f.write(f"{value} {time.time()}\n")
    return stamp(seconds, value)

"""Small shared pieces: deadlines (no unbounded waits) and the errors a sample can end with."""

from __future__ import annotations

import time


class WrongResult(AssertionError):
    """A backend returned results that differ from what the tasks compute."""


class BackendFailure(RuntimeError):
    """A backend's process died or stopped answering during a sample."""


class Deadline:
    """Every wait in a sample takes its timeout from here, so a hang ends as a TimeoutError."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the sample did not finish within {self.seconds:g} s")
        return left

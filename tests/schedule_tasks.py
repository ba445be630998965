"""Tasks for the schedule and current_job() tests (importable by workers: they run from the repo root)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import conveyor


def job_context(log: str | None = None) -> dict[str, Any] | None:
    """conveyor.current_job() as plain values; with `log`, the job id is appended to that file (one line)."""
    job = conveyor.current_job()
    if log is not None and job is not None:
        with open(log, "a") as f:
            f.write(job.job_id + "\n")
    if job is None:
        return None
    return {"job_id": job.job_id, "attempt": job.attempt, "schedule": job.schedule,
            "slot": None if job.slot is None else job.slot.timestamp(), "pid": os.getpid()}


async def async_job_context() -> dict[str, Any] | None:
    await asyncio.sleep(0)  # the context survives a suspension
    return job_context()


def fail_first_attempt() -> int:
    """Fail on attempt 1, succeed on a retry: returns the attempt current_job() reports."""
    job = conveyor.current_job()
    assert job is not None
    if job.attempt == 1:
        raise RuntimeError("first attempt fails")
    return job.attempt

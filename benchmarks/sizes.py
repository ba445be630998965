"""Workload sizes: the full targets and the tiny smoke sizes CI runs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sizes:
    slots: int  # concurrency of the Conveyor worker = max_workers of the pool
    bulk_tasks: int
    bulk_chunksize: int  # Client.map chunksize (also dask / Ray manual batches)
    bulk_pool_chunksize: int  # ProcessPoolExecutor.map chunksize
    one_by_one_tasks: int
    latency_samples: int
    latency_warmup: int
    payload_bytes: int
    payload_tasks: int
    cpu_tasks: int
    cpu_task_seconds: float  # what the calibrated loop should take serially
    io_tasks: int  # Conveyor, asyncio mode
    io_concurrency: int
    io_sleep_s: float
    io_reduced_tasks: int  # pool / dask / Ray: time.sleep on `slots` slots
    sample_timeout_s: float  # one sample of one workload on one backend; past it: a hang

    def io_ideal_s(self, tasks: int, concurrency: int) -> float:
        """Wall time of `tasks` sleeps with `concurrency` of them at once, with zero overhead."""
        return math.ceil(tasks / concurrency) * self.io_sleep_s

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = Sizes(
    slots=2,
    bulk_tasks=200_000,
    bulk_chunksize=256,
    bulk_pool_chunksize=100,
    one_by_one_tasks=50_000,
    latency_samples=500,
    latency_warmup=100,
    payload_bytes=10_000_000,
    payload_tasks=50,
    cpu_tasks=40,
    cpu_task_seconds=0.05,
    io_tasks=10_000,
    io_concurrency=1000,
    io_sleep_s=0.1,
    io_reduced_tasks=20,
    sample_timeout_s=600.0,
)

SMOKE = Sizes(
    slots=2,
    bulk_tasks=2_000,
    bulk_chunksize=256,
    bulk_pool_chunksize=100,
    one_by_one_tasks=300,
    latency_samples=50,
    latency_warmup=10,
    payload_bytes=1_000_000,
    payload_tasks=4,
    cpu_tasks=4,
    cpu_task_seconds=0.02,
    io_tasks=300,
    io_concurrency=1000,
    io_sleep_s=0.1,
    io_reduced_tasks=4,
    sample_timeout_s=60.0,
)

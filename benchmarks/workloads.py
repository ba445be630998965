"""The workloads. Each one runs one timed sample on one backend and checks every result.

A workload says which backends it applies to and how to start them (`setup`), what it measures
(`metrics`), and how (`run`). Timing covers submission to the last result; starting a cluster
and warming it up (imports, process start) happen before the clock starts.
"""

from __future__ import annotations

import abc
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from benchmarks import tasks
from benchmarks.backends import Backend, Setup
from benchmarks.common import Deadline, WrongResult
from benchmarks.sizes import Sizes

MICRO = "\N{MICRO SIGN}"


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    comparable: bool = True  # False when backends run different sizes: no Conveyor/pool ratio

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "comparable": self.comparable,
        }


@dataclass(slots=True)
class Sample:
    values: dict[str, float]  # the metrics, and other numbers worth a median
    detail: dict[str, Any] = field(default_factory=dict)  # raw data (e.g. every latency)


class RunContext:
    """What workloads share within a whole invocation (calibration) and within one run (baselines)."""

    def __init__(self, sizes: Sizes):
        self.sizes = sizes
        self.run_index = 0
        self.cpu_loops = 0
        self.cpu_expected = 0
        self.cpu_calibration: dict[str, Any] = {}
        self._serial: dict[int, float] = {}
        self._payload: bytes | None = None

    def calibrate_cpu(self) -> None:
        """Find the loop count for which cpu_loop takes cpu_task_seconds here, serially."""
        target = self.sizes.cpu_task_seconds
        n = 10_000
        while True:
            took = _timed(tasks.cpu_loop, n)
            if took >= 0.01:
                break
            n *= 4
        trials: list[dict[str, float]] = []
        for _ in range(3):  # refine twice on medians of three
            n = max(1, round(n * target / took))
            took = statistics.median(_timed(tasks.cpu_loop, n) for _ in range(3))
            trials.append({"loops": n, "seconds": took})
        self.cpu_loops = max(1, round(n * target / took))
        self.cpu_expected = tasks.cpu_loop(self.cpu_loops)
        self.cpu_calibration = {"target_s": target, "loops": self.cpu_loops, "trials": trials}

    def cpu_serial_s(self) -> float:
        """This run's serial baseline: every CPU task, one after another, in this process."""
        if self.run_index not in self._serial:
            started = time.perf_counter()
            for _ in range(self.sizes.cpu_tasks):
                tasks.cpu_loop(self.cpu_loops)
            self._serial[self.run_index] = time.perf_counter() - started
        return self._serial[self.run_index]

    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = random.Random(1234).randbytes(self.sizes.payload_bytes)
        return self._payload


def _timed(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise WrongResult(message)


def _first_mismatch(got: list[Any], want: list[Any]) -> str:
    if len(got) != len(want):
        return f"{len(got)} results for {len(want)} tasks"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            return f"result {i} is {g!r}, expected {w!r}"
    return "no mismatch"


class Workload(abc.ABC):
    name: ClassVar[str]
    title: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]

    # Tiny tasks (no CPU work to spread): also measured on a threads-mode Conveyor worker, the mode
    # for them; processes mode adds a pipe hop per task and is what the "conveyor" column shows.
    tiny_tasks: ClassVar[bool] = True

    def setup(self, backend: str, sizes: Sizes) -> Setup | None:
        """How to start this backend for this workload; None: the workload does not apply."""
        if backend == "conveyor_threads":
            return Setup(slots=sizes.slots, mode="threads") if self.tiny_tasks else None
        return Setup(slots=sizes.slots)

    @abc.abstractmethod
    def params(self, ctx: RunContext) -> dict[str, Any]: ...

    @abc.abstractmethod
    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample: ...

    def note(self, ctx: RunContext) -> str:
        """One line for the table: the sizes that matter."""
        return ""

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "title": self.title,
            "note": self.note(ctx),
            "params": self.params(ctx),
            "metrics": {m.key: m.describe() for m in self.metrics},
        }


class BulkNoop(Workload):
    name = "bulk_noop"
    title = "bulk no-op map"
    metrics = (Metric("tasks_per_s", "throughput", "tasks/s", True),)

    def note(self, ctx: RunContext) -> str:
        s = ctx.sizes
        return f"{s.bulk_tasks:,} tasks; chunksize {s.bulk_chunksize} (pool {s.bulk_pool_chunksize})"

    def params(self, ctx: RunContext) -> dict[str, Any]:
        s = ctx.sizes
        return {
            "tasks": s.bulk_tasks,
            "chunksize": {"conveyor": s.bulk_chunksize, "process_pool": s.bulk_pool_chunksize,
                          "dask": s.bulk_chunksize, "ray": s.bulk_chunksize},
            "call": "map(noop, range(tasks)) until the last result",
        }

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        s = ctx.sizes
        chunk = s.bulk_pool_chunksize if backend.name == "process_pool" else s.bulk_chunksize
        warm = list(backend.map(tasks.noop, range(4 * chunk), chunk, deadline))
        _check(warm == list(range(4 * chunk)), "warm-up map returned wrong results")
        want = range(s.bulk_tasks)
        started = time.perf_counter()
        got = list(backend.map(tasks.noop, want, chunk, deadline))
        wall = time.perf_counter() - started
        _check(got == list(want), f"map(noop): {_first_mismatch(got, list(want))}")
        return Sample({"tasks_per_s": s.bulk_tasks / wall, "wall_s": wall}, {"chunksize": chunk})


class DefaultMap(Workload):
    """What a first-time user writes: map(noop, items) with no chunksize. Conveyor sizes its chunks by
    itself; the pool runs with the chunksize it needs to be fast (100), so the ratio says how close the
    default comes to a tuned pool."""

    name = "default_map"
    title = "map with default arguments"
    metrics = (Metric("tasks_per_s", "throughput", "tasks/s", True),)

    def setup(self, backend: str, sizes: Sizes) -> Setup | None:
        if backend in ("dask", "ray"):  # one task per item by default: minutes for this size
            return None
        return super().setup(backend, sizes)

    def note(self, ctx: RunContext) -> str:
        s = ctx.sizes
        return f"{s.bulk_tasks:,} tasks; Conveyor: no chunksize (pool: chunksize {s.bulk_pool_chunksize})"

    def params(self, ctx: RunContext) -> dict[str, Any]:
        s = ctx.sizes
        return {
            "tasks": s.bulk_tasks,
            "chunksize": {"conveyor": "default (automatic)", "process_pool": s.bulk_pool_chunksize},
            "call": "Client.map(noop, range(tasks)) until the last result; pool.map(noop, range(tasks), chunksize)",
        }

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        s = ctx.sizes
        pool = backend.name == "process_pool"

        def run_map(items: range) -> list[Any]:
            if pool:
                return list(backend.map(tasks.noop, items, s.bulk_pool_chunksize, deadline))
            return list(backend.default_map(tasks.noop, items, deadline))

        _check(run_map(range(1000)) == list(range(1000)), "warm-up map returned wrong results")
        want = range(s.bulk_tasks)
        started = time.perf_counter()
        got = run_map(want)
        wall = time.perf_counter() - started
        _check(got == list(want), f"map(noop): {_first_mismatch(got, list(want))}")
        return Sample({"tasks_per_s": s.bulk_tasks / wall, "wall_s": wall})


class ExecutorMap(Workload):
    """concurrent.futures.Executor.map(noop, items) with its default chunksize=1: conveyor.Executor against
    ProcessPoolExecutor, and (one_by_one) against submitting the same calls one by one."""

    name = "executor_map"
    title = "Executor.map, default chunksize=1"
    metrics = (Metric("tasks_per_s", "throughput", "tasks/s", True),)

    def setup(self, backend: str, sizes: Sizes) -> Setup | None:
        if backend in ("dask", "ray"):
            return None
        return super().setup(backend, sizes)

    def note(self, ctx: RunContext) -> str:
        return f"{ctx.sizes.one_by_one_tasks:,} calls, one job each"

    def params(self, ctx: RunContext) -> dict[str, Any]:
        return {"tasks": ctx.sizes.one_by_one_tasks, "call": "Executor.map(noop, range(tasks)) until the last result"}

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        n = ctx.sizes.one_by_one_tasks
        _check(list(backend.executor_map(tasks.noop, range(100), deadline)) == list(range(100)),
               "warm-up Executor.map returned wrong results")
        started = time.perf_counter()
        got = list(backend.executor_map(tasks.noop, range(n), deadline))
        wall = time.perf_counter() - started
        _check(got == list(range(n)), f"Executor.map(noop): {_first_mismatch(got, list(range(n)))}")
        return Sample({"tasks_per_s": n / wall, "wall_s": wall})


class OneByOne(Workload):
    name = "one_by_one"
    title = "one-by-one submit, then gather"
    metrics = (Metric("tasks_per_s", "throughput", "tasks/s", True),)

    def note(self, ctx: RunContext) -> str:
        return f"{ctx.sizes.one_by_one_tasks:,} submits"

    def params(self, ctx: RunContext) -> dict[str, Any]:
        return {"tasks": ctx.sizes.one_by_one_tasks, "call": "[submit(noop, i) for i in range(tasks)], then gather"}

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        n = ctx.sizes.one_by_one_tasks
        warm = backend.gather([backend.submit(tasks.noop, i) for i in range(100)], deadline)
        _check(warm == list(range(100)), "warm-up submits returned wrong results")
        started = time.perf_counter()
        handles = [backend.submit(tasks.noop, i) for i in range(n)]
        submitted = time.perf_counter()
        got = backend.gather(handles, deadline)
        wall = time.perf_counter() - started
        _check(got == list(range(n)), f"submit(noop): {_first_mismatch(got, list(range(n)))}")
        return Sample({"tasks_per_s": n / wall, "wall_s": wall, "submit_s": submitted - started})


class Latency(Workload):
    name = "latency"
    title = "sequential round trip submit -> result"
    metrics = (
        Metric("p50_us", "p50 latency", f"{MICRO}s", False),
        Metric("p99_us", "p99 latency", f"{MICRO}s", False),
    )

    def note(self, ctx: RunContext) -> str:
        return f"{ctx.sizes.latency_samples} samples after {ctx.sizes.latency_warmup} warm-up"

    def params(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "samples": ctx.sizes.latency_samples,
            "warmup": ctx.sizes.latency_warmup,
            "call": "submit(noop, i).result(), one at a time",
        }

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        s = ctx.sizes
        for i in range(s.latency_warmup):
            _check(backend.result(backend.submit(tasks.noop, i), deadline) == i, "warm-up round trip: wrong result")
        ns: list[int] = []
        for i in range(s.latency_samples):
            started = time.perf_counter_ns()
            value = backend.result(backend.submit(tasks.noop, i), deadline)
            ns.append(time.perf_counter_ns() - started)
            _check(value == i, f"round trip {i} returned {value!r}")
        us = [x / 1000 for x in ns]
        cuts = statistics.quantiles(us, n=100, method="inclusive")
        values = {
            "p50_us": cuts[49],
            "p99_us": cuts[98],
            "mean_us": statistics.fmean(us),
            "min_us": min(us),
            "max_us": max(us),
        }
        return Sample(values, {"latencies_us": [round(x, 1) for x in us]})


class Payload(Workload):
    name = "payload"
    title = "large argument in, its length out"
    metrics = (Metric("mb_per_s", "argument bandwidth", "MB/s", True),)

    def note(self, ctx: RunContext) -> str:
        s = ctx.sizes
        return f"{s.payload_tasks} tasks x {s.payload_bytes / 1e6:g} MB"

    def params(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "tasks": ctx.sizes.payload_tasks,
            "argument_bytes": ctx.sizes.payload_bytes,
            "call": "submit(payload_len, data) for each task, then gather; MB = 10**6 bytes",
        }

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        s = ctx.sizes
        data = ctx.payload()
        _check(backend.result(backend.submit(tasks.payload_len, data), deadline) == len(data), "warm-up: wrong length")
        started = time.perf_counter()
        handles = [backend.submit(tasks.payload_len, data) for _ in range(s.payload_tasks)]
        got = backend.gather(handles, deadline)
        wall = time.perf_counter() - started
        want = [len(data)] * s.payload_tasks
        _check(got == want, f"payload_len: {_first_mismatch(got, want)}")
        total_mb = s.payload_tasks * len(data) / 1e6
        return Sample({"mb_per_s": total_mb / wall, "wall_s": wall})


class CpuBound(Workload):
    name = "cpu_bound"
    tiny_tasks = False
    title = "CPU-bound pure-Python loops"
    metrics = (
        Metric("speedup", "speedup vs serial", "x", True),
        Metric("wall_s", "wall time", "s", False),
    )

    def note(self, ctx: RunContext) -> str:
        s = ctx.sizes
        return f"{s.cpu_tasks} x {1000 * s.cpu_task_seconds:g} ms on {s.slots} slots (processes)"

    def params(self, ctx: RunContext) -> dict[str, Any]:
        s = ctx.sizes
        return {
            "tasks": s.cpu_tasks,
            "task_seconds_target": s.cpu_task_seconds,
            "loops": ctx.cpu_loops,
            "calibration": ctx.cpu_calibration,
            "conveyor_mode": "processes",
            "slots": s.slots,
            "call": "submit(cpu_loop, loops) for each task, then gather; speedup = serial_s / wall_s",
        }

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        s = ctx.sizes
        serial = ctx.cpu_serial_s()
        started = time.perf_counter()
        handles = [backend.submit(tasks.cpu_loop, ctx.cpu_loops) for _ in range(s.cpu_tasks)]
        got = backend.gather(handles, deadline)
        wall = time.perf_counter() - started
        want = [ctx.cpu_expected] * s.cpu_tasks
        _check(got == want, f"cpu_loop: {_first_mismatch(got, want)}")
        return Sample({"speedup": serial / wall, "wall_s": wall, "serial_s": serial})


class IoBound(Workload):
    name = "io_bound"
    tiny_tasks = False
    title = "I/O-bound sleeps"
    metrics = (
        Metric("wall_s", "wall time", "s", False, comparable=False),
        Metric("efficiency", "ideal / wall", "%", True),
    )

    def setup(self, backend: str, sizes: Sizes) -> Setup | None:
        if backend in ("conveyor", "conveyor_pair"):
            return Setup(slots=sizes.io_concurrency, mode="asyncio")
        if backend == "conveyor_threads":
            return None
        return Setup(slots=sizes.slots)  # reduced form: time.sleep on the same slots as the other workloads

    def note(self, ctx: RunContext) -> str:
        s = ctx.sizes
        return (
            f"Conveyor {s.io_tasks:,} asyncio.sleep({s.io_sleep_s:g}), asyncio x{s.io_concurrency}; "
            f"others {s.io_reduced_tasks} time.sleep on {s.slots} slots; ideal "
            f"{s.io_ideal_s(s.io_tasks, s.io_concurrency):g} s / {s.io_ideal_s(s.io_reduced_tasks, s.slots):g} s"
        )

    def params(self, ctx: RunContext) -> dict[str, Any]:
        s = ctx.sizes
        return {
            "sleep_s": s.io_sleep_s,
            "conveyor": {
                "tasks": s.io_tasks,
                "mode": "asyncio",
                "concurrency": s.io_concurrency,
                "fn": "async_sleep (asyncio.sleep)",
                "ideal_s": s.io_ideal_s(s.io_tasks, s.io_concurrency),
            },
            "others": {
                "tasks": s.io_reduced_tasks,
                "slots": s.slots,
                "fn": "sleep (time.sleep), reduced form: the full size on 2 slots would take "
                f"{s.io_ideal_s(s.io_tasks, s.slots):g} s",
                "ideal_s": s.io_ideal_s(s.io_reduced_tasks, s.slots),
            },
            "call": "submit(fn, sleep_s) for each task, then gather; efficiency = ideal_s / wall_s",
        }

    def run(self, backend: Backend, ctx: RunContext, deadline: Deadline) -> Sample:
        s = ctx.sizes
        if backend.async_native:
            fn: Any = tasks.async_sleep
            n, concurrency = s.io_tasks, s.io_concurrency
        else:
            fn, n, concurrency = tasks.sleep, s.io_reduced_tasks, s.slots
        _check(backend.result(backend.submit(fn, 0.0), deadline) == 0.0, "warm-up sleep: wrong result")
        started = time.perf_counter()
        handles = [backend.submit(fn, s.io_sleep_s) for _ in range(n)]
        got = backend.gather(handles, deadline)
        wall = time.perf_counter() - started
        want = [s.io_sleep_s] * n
        _check(got == want, f"{fn.__name__}: {_first_mismatch(got, want)}")
        ideal = s.io_ideal_s(n, concurrency)
        return Sample(
            {"wall_s": wall, "efficiency": 100 * ideal / wall, "tasks_per_s": n / wall, "ideal_s": ideal},
            {"tasks": n, "concurrency": concurrency, "fn": fn.__name__},
        )


WORKLOADS: tuple[Workload, ...] = (
    BulkNoop(), DefaultMap(), OneByOne(), ExecutorMap(), Latency(), Payload(), CpuBound(), IoBound(),
)
WORKLOAD_NAMES: tuple[str, ...] = tuple(w.name for w in WORKLOADS)

"""What every experiment needs: sizes, clusters to run on, timing and resource sampling."""

from __future__ import annotations

import concurrent.futures
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from conveyor.client import Client
from conveyor.client.future import JobFuture
from conveyor.client.local import LocalCluster, conveyor_command
from conveyor.demo import tasks

RESULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Sizes:
    """How big each experiment is: --quick keeps the whole run near a minute on 2 cores."""

    cores: int
    quick: bool
    levels: tuple[int, ...]  # concurrency levels of the scaling sweep
    passes: int  # each timing is the best of this many interleaved passes (other programs add noise)
    retries: int  # extra rounds for timings taken while other programs kept cores busy
    cpu_seconds: float  # serial seconds of CPU-bound work per sweep run
    sha_seconds: float  # serial seconds of hashing per sweep run
    sha_mib: int
    host_seconds: float  # serial seconds of work per run of experiment 6
    counter_tasks: int
    race_tasks: int
    race_increments: int
    deadlock_timeout: float
    io_tasks: int
    io_wait: float
    io_threads: int
    io_processes: int
    crash_hold: float

    @classmethod
    def for_machine(cls, quick: bool, cores: int | None = None) -> Sizes:
        cores = max(1, cores or os.cpu_count() or 1)
        top = min((2 if quick else 4) * cores, 128)
        levels = sorted({2**i for i in range(int(math.log2(top)) + 1)} | {cores})
        return cls(
            cores=cores,
            quick=quick,
            levels=tuple(levels),
            passes=3,
            retries=1 if quick else 3,
            cpu_seconds=(0.4 if quick else 1.5) * cores,
            sha_seconds=(0.3 if quick else 1.0) * cores,
            sha_mib=8,
            host_seconds=(0.4 if quick else 1.5) * cores,
            counter_tasks=60 * cores if quick else 200 * cores,
            race_tasks=4 if quick else 8,
            race_increments=1000 if quick else 5000,
            deadlock_timeout=0.5 if quick else 1.0,
            io_tasks=500 if quick else 10_000,
            io_wait=0.1,
            io_threads=100 if quick else 1000,
            io_processes=4 * cores,
            crash_hold=0.5 if quick else 1.0,
        )


# --- progress --------------------------------------------------------------------------------------


class Progress:
    """What experiments tell the terminal: a description and units of work done."""

    def __init__(
        self, on_step: Callable[[str], None] | None = None, on_advance: Callable[[float], None] | None = None
    ):
        self._on_step = on_step
        self._on_advance = on_advance

    def step(self, description: str) -> None:
        if self._on_step is not None:
            self._on_step(description)

    def advance(self, amount: float = 1.0) -> None:
        if self._on_advance is not None:
            self._on_advance(amount)


# --- measuring processes -------------------------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (a processes worker's forkserver and children included)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class TreeSnapshot:
    processes: int = 0
    threads: int = 0
    rss: int = 0
    pss: int | None = None
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "threads": self.threads,
            "rss_mib": round(self.rss / 2**20, 2),
            "pss_mib": None if self.pss is None else round(self.pss / 2**20, 2),
            "cpu_seconds": round(self.cpu_seconds, 4),
        }


def snapshot(pids: Iterable[int], with_pss: bool = False) -> TreeSnapshot:
    """Processes, threads, resident memory and CPU time of some workers and all their children."""
    snap = TreeSnapshot(pss=0 if with_pss else None)
    for pid in pids:
        for proc in process_tree(pid):
            try:
                with proc.oneshot():
                    snap.rss += proc.memory_info().rss
                    snap.threads += proc.num_threads()
                    times = proc.cpu_times()
                    snap.cpu_seconds += times.user + times.system
                    if snap.pss is not None:
                        snap.pss += getattr(proc.memory_full_info(), "pss", 0)
                snap.processes += 1
            except psutil.Error:
                continue
    return snap


def system_cpu_seconds() -> float:
    """CPU seconds every core of the machine has spent busy so far (all programs, including stolen time)."""
    t = psutil.cpu_times()
    return sum(float(getattr(t, name, 0.0)) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


class Sampler:
    """Samples the worker processes' trees in the background; keeps the peaks."""

    def __init__(self, pids: list[int], interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.peak = TreeSnapshot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            s = snapshot(self.pids)
            self.peak.processes = max(self.peak.processes, s.processes)
            self.peak.threads = max(self.peak.threads, s.threads)
            self.peak.rss = max(self.peak.rss, s.rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- clusters ------------------------------------------------------------------------------------------


@dataclass
class Running:
    """A cluster an experiment runs on: the client, and the local worker pids when we started them."""

    client: Client
    address: str
    description: str
    local: bool
    worker_pids: list[int] = field(default_factory=list)
    cluster: LocalCluster | None = None
    startup: dict[str, float] = field(default_factory=dict)
    idle: TreeSnapshot | None = None

    def worker_alive(self, index: int) -> bool:
        return self.cluster is not None and self.cluster.workers[index].poll() is None

    def worker_exit_code(self, index: int) -> int | None:
        return None if self.cluster is None else self.cluster.workers[index].poll()


def describe_local(workers: int, mode: str, concurrency: int) -> str:
    noun = "worker" if workers == 1 else "workers"
    return f"a local cluster of {workers} {mode} {noun} x{concurrency} (127.0.0.1)"


@contextmanager
def local_cluster(mode: str, concurrency: int, workers: int = 1, measure_idle: bool = False) -> Iterator[Running]:
    """Start a dispatcher and workers, time start-up to the first result, stop them all at the end."""
    started = time.perf_counter()
    cluster = LocalCluster(workers=workers, mode=mode, concurrency=concurrency)
    client: Client | None = None
    try:
        address = cluster.start()
        dispatcher_ready = time.perf_counter()
        client = Client(address)
        client.submit(tasks.ping).result(RESULT_TIMEOUT)  # the first worker to register runs it
        first_result = time.perf_counter()
        if workers > 1:
            client.wait_for_workers(workers, timeout=60)
        pids = [p.pid for p in cluster.workers]
        running = Running(
            client, address, describe_local(workers, mode, concurrency), True, pids, cluster,
            startup={
                "dispatcher_s": dispatcher_ready - started,
                "worker_s": first_result - dispatcher_ready,
                "first_result_s": first_result - started,
            },
        )
        if measure_idle:
            running.idle = snapshot(pids, with_pss=True)
        yield running
    finally:
        if client is not None:
            client.close()
        cluster.stop()


def external_workers(client: Client, mode: str, min_concurrency: int = 1) -> list[dict[str, Any]]:
    return [
        w for w in client.status()["workers"]
        if w["mode"] == mode and w["concurrency"] >= min_concurrency and not w.get("draining")
    ]


@contextmanager
def extra_worker(
    address: str, mode: str, concurrency: int, name: str, tags: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """One more local worker process on an existing dispatcher, stopped (SIGTERM, drained) at the end."""
    args = ["worker", "--connect", address, "--mode", mode, "--concurrency", str(concurrency), "--name", name]
    for tag in tags or []:
        args += ["--tag", tag]
    proc = subprocess.Popen(
        conveyor_command(*args, "--log-level", "warning"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class TaggedWorker:
    """A worker only the tasks carrying its tag go to, with its measured start-up and idle cost."""

    name: str
    tag: str
    mode: str
    concurrency: int
    pid: int
    client: Client  # a view whose tasks carry the tag
    startup_s: float
    idle: TreeSnapshot


def start_tagged_worker(
    stack: ExitStack, client: Client, address: str, mode: str, concurrency: int, tag: str,
    extra_tags: list[str] | None = None,
) -> TaggedWorker:
    """Start a worker with its own tag; its start-up time runs from spawning it to the first result."""
    started = time.perf_counter()
    proc = stack.enter_context(extra_worker(address, mode, concurrency, tag, [tag, *(extra_tags or [])]))
    view = client.options(tags=[tag])
    view.submit(tasks.ping).result(RESULT_TIMEOUT)
    startup = time.perf_counter() - started
    return TaggedWorker(tag, tag, mode, concurrency, proc.pid, view, startup, snapshot([proc.pid], with_pss=True))


@contextmanager
def dispatcher_only() -> Iterator[tuple[Client, str]]:
    """A local dispatcher with no workers yet: experiments add their own tagged workers to it."""
    cluster = LocalCluster(workers=0)
    client: Client | None = None
    try:
        address = cluster.start()
        client = Client(address)
        yield client, address
    finally:
        if client is not None:
            client.close()
        cluster.stop()


# --- running work ----------------------------------------------------------------------------------------


def gather(futures: list[JobFuture], timeout: float = RESULT_TIMEOUT) -> list[Any]:
    deadline = time.monotonic() + timeout
    return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]


def wait_all(futures: list[JobFuture], timeout: float = RESULT_TIMEOUT) -> None:
    """Wait until every future is done, whether it succeeded or failed."""
    _, pending = concurrent.futures.wait(futures, timeout)
    if pending:
        raise TimeoutError(f"{len(pending)} task(s) still unfinished after {timeout:g} s")


def timed_batch(client: Client, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> tuple[float, list[Any]]:
    """Submit every call at once and wait for all: the wall time from first submit to last result."""
    started = time.perf_counter()
    results = gather([client.submit(fn, *args) for args in calls])
    return time.perf_counter() - started, results


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll a condition until it holds (never a blind sleep); raise TimeoutError naming it if it does not."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def calibrate(fn: Callable[[int], Any], target: float, start: int) -> float:
    """Units of fn's argument per second on this machine (best of a few runs in this process)."""
    n = start
    while True:
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            fn(n)
            best = min(best, time.perf_counter() - t)
        if best >= target or n > 2**40:
            return n / best
        n *= 2

"""The systems under test, behind one small interface.

A Backend is a context manager that starts its cluster or pool on entry and stops it on exit,
whatever happened in between. Workloads only use submit / result / gather / map, so each system
runs the very same task functions from benchmarks.tasks.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from benchmarks import tasks
from benchmarks.common import Deadline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True, slots=True)
class Setup:
    """How to start a backend for one workload: slots, and for Conveyor the worker mode."""

    slots: int
    mode: str = "processes"

    def describe(self) -> dict[str, Any]:
        return {"slots": self.slots, "mode": self.mode}


class Backend(abc.ABC):
    name: str = "?"
    #: True when thousands of coroutine tasks can wait at once (Conveyor's asyncio mode)
    async_native: bool = False

    def __init__(self, setup: Setup, *, cluster_logs: bool = False):
        self.setup = setup
        self.cluster_logs = cluster_logs
        self.failed = False  # set on exit when the with-block raised: stop without waiting politely
        self._stack = contextlib.ExitStack()

    # --- lifecycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    def _start(self, stack: contextlib.ExitStack) -> None:
        """Start everything, registering each stop on `stack` as soon as the thing exists."""

    def __enter__(self) -> Backend:
        try:
            self._start(self._stack)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.failed = et is not None
        self._stack.close()

    def expected_processes(self) -> int:
        """How many distinct processes run tasks once warm (what warm() waits for)."""
        return self.setup.slots

    def health(self) -> str | None:
        """A description of a dead component, or None if everything still runs."""
        return None

    # --- running tasks -----------------------------------------------------------------------

    @abc.abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Start fn(*args); returns a handle for result() / gather()."""

    @abc.abstractmethod
    def result(self, handle: Any, deadline: Deadline) -> Any: ...

    def gather(self, handles: list[Any], deadline: Deadline) -> list[Any]:
        return [self.result(h, deadline) for h in handles]

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int, deadline: Deadline) -> Iterator[Any]:
        """fn over items, results in input order."""

    def warm(self, deadline: Deadline, max_rounds: int = 200) -> dict[str, Any]:
        """Run tiny tasks until every task process has run one (imports done, processes started).

        Waits on that condition rather than for a fixed time; gives up after max_rounds rounds
        (then reports how many processes it saw).
        """
        want = self.expected_processes()
        seen: set[int] = set()
        rounds = 0
        while len(seen) < want and rounds < max_rounds:
            rounds += 1
            handles = [self.submit(tasks.getpid, i) for i in range(4 * max(want, 1))]
            seen.update(self.gather(handles, deadline))
        return {"task_processes": len(seen), "expected": want, "rounds": rounds}


# --- Conveyor --------------------------------------------------------------------------------


class ConveyorBackend(Backend):
    name = "conveyor"

    def __init__(self, setup: Setup, *, cluster_logs: bool = False):
        super().__init__(setup, cluster_logs=cluster_logs)
        self.async_native = setup.mode == "asyncio"
        self.cluster: Any = None
        self.client: Any = None

    def _start(self, stack: contextlib.ExitStack) -> None:
        from conveyor import Client, LocalCluster

        self.cluster = LocalCluster(
            workers=1, mode=self.setup.mode, concurrency=self.setup.slots, quiet=not self.cluster_logs
        )
        stack.callback(self.cluster.stop)  # registered first, so it runs last
        address = self.cluster.start()
        self.client = Client(address)
        stack.callback(self.client.close)
        self.client.wait_for_workers(1, timeout=60.0)
        if self.setup.mode != "processes":
            self.client = self.client.options(mode=self.setup.mode)

    def expected_processes(self) -> int:
        return self.setup.slots if self.setup.mode == "processes" else 1

    def health(self) -> str | None:
        cluster = self.cluster
        if cluster is None:
            return None
        problems = []
        if cluster.dispatcher is not None and cluster.dispatcher.poll() is not None:
            problems.append(f"the dispatcher exited (code {cluster.dispatcher.returncode})")
        for proc in cluster.workers:
            if proc.poll() is not None:
                problems.append(f"worker pid {proc.pid} exited (code {proc.returncode})")
        return "; ".join(problems) or None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args)

    def result(self, handle: Any, deadline: Deadline) -> Any:
        return handle.result(deadline.remaining())

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int, deadline: Deadline) -> Iterator[Any]:
        return self.client.map(fn, items, chunksize=chunksize, timeout=deadline.remaining())  # type: ignore[no-any-return]


# --- concurrent.futures.ProcessPoolExecutor --------------------------------------------------


class PoolBackend(Backend):
    name = "process_pool"

    def __init__(self, setup: Setup, *, cluster_logs: bool = False):
        super().__init__(setup, cluster_logs=cluster_logs)
        self.pool: Any = None

    def _start(self, stack: contextlib.ExitStack) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=self.setup.slots)
        stack.callback(self._shutdown)

    def _shutdown(self) -> None:
        pool = self.pool
        if pool is None:
            return
        if not self.failed:
            pool.shutdown(wait=True)
            return
        # After a failure (a hang, a timeout) a clean shutdown could wait forever: stop the children.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def health(self) -> str | None:
        broken = getattr(self.pool, "_broken", False)
        return f"the pool is broken: {broken}" if broken else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def result(self, handle: Any, deadline: Deadline) -> Any:
        return handle.result(deadline.remaining())

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int, deadline: Deadline) -> Iterator[Any]:
        return self.pool.map(fn, items, chunksize=chunksize, timeout=deadline.remaining())  # type: ignore[no-any-return]


# --- dask.distributed (optional) -------------------------------------------------------------


class DaskBackend(Backend):
    """A dask LocalCluster with `slots` single-threaded worker processes (like the pool's slots)."""

    name = "dask"

    def __init__(self, setup: Setup, *, cluster_logs: bool = False):
        super().__init__(setup, cluster_logs=cluster_logs)
        self.client: Any = None

    def _start(self, stack: contextlib.ExitStack) -> None:
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=self.setup.slots,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=False if self.cluster_logs else logging.ERROR,
        )
        stack.callback(cluster.close)
        self.client = Client(cluster)
        stack.callback(self.client.close)
        self.client.wait_for_workers(self.setup.slots, timeout=60)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def result(self, handle: Any, deadline: Deadline) -> Any:
        return handle.result(timeout=deadline.remaining())

    def gather(self, handles: list[Any], deadline: Deadline) -> list[Any]:
        from dask.distributed import wait

        wait(handles, timeout=deadline.remaining())
        return self.client.gather(handles)  # type: ignore[no-any-return]

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int, deadline: Deadline) -> Iterator[Any]:
        handles = [self.submit(tasks.apply_chunk, fn, chunk) for chunk in _chunks(items, chunksize)]
        for chunk_result in self.gather(handles, deadline):
            yield from chunk_result


# --- Ray (optional) --------------------------------------------------------------------------


class RayBackend(Backend):
    """A local Ray instance with `slots` CPUs; tasks are plain remote functions."""

    name = "ray"

    def __init__(self, setup: Setup, *, cluster_logs: bool = False):
        super().__init__(setup, cluster_logs=cluster_logs)
        self._ray: Any = None
        self._remotes: dict[Callable[..., Any], Any] = {}

    def _start(self, stack: contextlib.ExitStack) -> None:
        import ray

        self._ray = ray
        ray.init(
            num_cpus=self.setup.slots,
            include_dashboard=False,
            log_to_driver=self.cluster_logs,
            logging_level=logging.INFO if self.cluster_logs else logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}},
        )
        stack.callback(ray.shutdown)

    def _remote(self, fn: Callable[..., Any]) -> Any:
        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = self._ray.remote(fn)
        return remote

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._remote(fn).remote(*args)

    def result(self, handle: Any, deadline: Deadline) -> Any:
        return self._ray.get(handle, timeout=deadline.remaining())

    def gather(self, handles: list[Any], deadline: Deadline) -> list[Any]:
        return self._ray.get(handles, timeout=deadline.remaining())  # type: ignore[no-any-return]

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int, deadline: Deadline) -> Iterator[Any]:
        handles = [self.submit(tasks.apply_chunk, fn, chunk) for chunk in _chunks(items, chunksize)]
        for chunk_result in self.gather(handles, deadline):
            yield from chunk_result


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- which backends this run has -------------------------------------------------------------


@dataclass(slots=True)
class BackendSpec:
    name: str
    label: str
    factory: type[Backend]
    module: str | None = None  # an optional dependency; the backend runs only if it imports
    available: bool = True
    note: str = ""
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _version_of(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "?"))


def backend_specs() -> list[BackendSpec]:
    import conveyor

    specs = [
        BackendSpec("conveyor", "Conveyor", ConveyorBackend, version=conveyor.__version__),
        BackendSpec("process_pool", "ProcessPool", PoolBackend, version=f"python {sys.version.split()[0]}"),
        BackendSpec("dask", "dask.distributed", DaskBackend, module="dask.distributed"),
        BackendSpec("ray", "Ray", RayBackend, module="ray"),
    ]
    for spec in specs:
        if spec.module is None:
            continue
        if importlib.util.find_spec(spec.module.split(".")[0]) is None:
            spec.available = False
            spec.note = f"skipped: {spec.module} is not installed (optional)"
            continue
        try:
            importlib.import_module(spec.module)
        except Exception as exc:
            spec.available = False
            spec.note = f"skipped: importing {spec.module} failed: {type(exc).__name__}: {exc}"
            continue
        spec.version = _version_of(spec.module.split(".")[0])
    return specs

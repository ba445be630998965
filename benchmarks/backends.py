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
import shutil
import sys
import tempfile
import warnings
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

    def default_map(self, fn: Callable[[Any], Any], items: Iterable[Any], deadline: Deadline) -> Iterator[Any]:
        """map with the backend's default arguments (no chunksize): what a first-time user writes."""
        raise NotImplementedError(f"{self.name} has no default-argument map workload")

    def executor_map(self, fn: Callable[[Any], Any], items: Iterable[Any], deadline: Deadline) -> Iterator[Any]:
        """concurrent.futures.Executor.map(fn, items) with its defaults (chunksize=1)."""
        raise NotImplementedError(f"{self.name} is not a concurrent.futures.Executor")

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
        self._stack_ref: contextlib.ExitStack | None = None
        self._executor: Any = None

    def _start(self, stack: contextlib.ExitStack) -> None:
        from conveyor import Client, LocalCluster

        self._stack_ref = stack

        # The journal is on, as in a real deployment (issue 6 measures with it): in a fresh directory.
        state = tempfile.mkdtemp(prefix="conveyor-bench-")
        stack.callback(shutil.rmtree, state, ignore_errors=True)
        self.cluster = LocalCluster(
            workers=1, mode=self.setup.mode, concurrency=self.setup.slots, quiet=not self.cluster_logs,
            journal=os.path.join(state, "journal.db"),
        )
        stack.callback(self.cluster.stop)  # registered before the client, so it runs after it
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

    def default_map(self, fn: Callable[[Any], Any], items: Iterable[Any], deadline: Deadline) -> Iterator[Any]:
        return self.client.map(fn, items, timeout=deadline.remaining())  # type: ignore[no-any-return]

    def executor_map(self, fn: Callable[[Any], Any], items: Iterable[Any], deadline: Deadline) -> Iterator[Any]:
        if self._executor is None:  # one conveyor.Executor on the same cluster, connected before the clock starts
            from conveyor import Executor

            options = {} if self.setup.mode == "processes" else {"mode": self.setup.mode}
            self._executor = Executor(self.cluster.address, **options)
            assert self._stack_ref is not None
            self._stack_ref.callback(self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor.map(fn, items, timeout=deadline.remaining())  # type: ignore[no-any-return]


class ConveyorThreadsBackend(ConveyorBackend):
    """The same cluster with a threads-mode worker (workloads of tiny tasks set the mode)."""

    name = "conveyor_threads"


class ConveyorPairBackend(ConveyorBackend):
    """A standby pair (issue 17): two dispatchers, each with its own journal, ACCEPTED after both commit
    while in sync; one worker and the client given both addresses. Set against "conveyor" (one dispatcher,
    the same worker), it is the cost of synchronous journal shipping on every workload."""

    name = "conveyor_pair"

    def _start(self, stack: contextlib.ExitStack) -> None:
        import subprocess
        import time

        from conveyor import Client

        self._stack_ref = stack
        state = tempfile.mkdtemp(prefix="conveyor-bench-pair-")
        stack.callback(shutil.rmtree, state, ignore_errors=True)
        ports = [_free_port() for _ in range(4)]
        addr = {"primary": f"tcp://127.0.0.1:{ports[0]}", "backup": f"tcp://127.0.0.1:{ports[1]}"}
        pair = {"primary": f"tcp://127.0.0.1:{ports[2]}", "backup": f"tcp://127.0.0.1:{ports[3]}"}
        self.addresses = [addr["primary"], addr["backup"]]
        self.procs: list[subprocess.Popen[bytes]] = []
        level = "info" if self.cluster_logs else "warning"
        out = None if self.cluster_logs else subprocess.DEVNULL

        def spawn(*args: str) -> None:
            proc = subprocess.Popen([sys.executable, "-m", "conveyor", *args, "--log-level", level],
                                    stdout=subprocess.DEVNULL, stderr=out, cwd=REPO_ROOT)
            self.procs.append(proc)
            stack.callback(_stop, proc)

        for role, other in (("primary", "backup"), ("backup", "primary")):
            spawn("dispatcher", "--bind", addr[role], "--journal", os.path.join(state, f"{role}.db"), "--role", role,
                  "--peer", pair[other], "--pair-bind", pair[role])
        spawn("worker", "--connect", ",".join(self.addresses), "--mode", self.setup.mode,
              "--concurrency", str(self.setup.slots))
        self.client = Client(self.addresses, connect_timeout=60.0)
        stack.callback(self.client.close)
        self.client.wait_for_workers(1, timeout=60.0)
        deadline = time.monotonic() + 60.0  # measured in sync, as deployed: ACCEPTED waits for the backup
        while self.client.status()["dispatcher"].get("pair", {}).get("replication") != "in-sync":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby pair did not get in sync within 60 s")
            time.sleep(0.05)
        if self.setup.mode != "processes":
            self.client = self.client.options(mode=self.setup.mode)
        self.cluster = _PairAddress(self.addresses)

    def health(self) -> str | None:
        dead = [f"pid {p.pid} exited (code {p.returncode})" for p in self.procs if p.poll() is not None]
        return "; ".join(dead) or None


@dataclass(frozen=True, slots=True)
class _PairAddress:
    """What executor_map needs of a cluster: the addresses to connect an Executor to."""

    address: list[str]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except Exception:
            proc.kill()
            proc.wait()


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

    def executor_map(self, fn: Callable[[Any], Any], items: Iterable[Any], deadline: Deadline) -> Iterator[Any]:
        return self.pool.map(fn, items, timeout=deadline.remaining())  # type: ignore[no-any-return]


# --- dask.distributed (optional) -------------------------------------------------------------


class DaskBackend(Backend):
    """A dask LocalCluster of `slots` worker processes with one thread each.

    Tasks run in `slots` separate processes, as in the pool and in Conveyor's processes mode: one
    worker process with `slots` threads would serialize pure-Python tasks on the GIL. Everything else
    is dask's default local setup (the scheduler runs in this process, each worker under a nanny).
    """

    name = "dask"

    def __init__(self, setup: Setup, *, cluster_logs: bool = False):
        super().__init__(setup, cluster_logs=cluster_logs)
        self.cluster: Any = None
        self.client: Any = None

    def _start(self, stack: contextlib.ExitStack) -> None:
        dd = _dask_distributed()
        if not self.cluster_logs:
            # The payload workload sends 10 MB arguments on purpose; dask warns about each one.
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        self.cluster = dd.LocalCluster(
            n_workers=self.setup.slots,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,  # no dashboard; its HTTP server (health, metrics) still runs:
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not on 8787, so runs side by side
            # Everything, even CRITICAL: a shutdown racing heartbeats or results (always, after a
            # timeout) logs CommClosedError tracebacks; the sample reports real failures itself.
            silence_logs=False if self.cluster_logs else logging.CRITICAL + 1,
        )
        stack.callback(self._close, self.cluster)  # registered first, so it runs last
        self.client = dd.Client(self.cluster)
        stack.callback(self._close, self.client)
        self.client.wait_for_workers(self.setup.slots, timeout=60)

    def _close(self, thing: Any) -> None:
        try:
            thing.close(timeout=10 if self.failed else 30)
        except Exception:
            if not self.failed:
                raise
            # After a failure the sample's own error is what matters: do not replace it with this one.

    def health(self) -> str | None:
        cluster = self.cluster
        if cluster is None or self.failed:
            return None
        try:
            alive = len(cluster.scheduler_info.get("workers", {}))
        except Exception as exc:  # the scheduler itself is gone
            return f"the dask scheduler does not answer ({type(exc).__name__}: {exc})"
        if alive < self.setup.slots:
            return f"{alive} of {self.setup.slots} dask workers left"
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def result(self, handle: Any, deadline: Deadline) -> Any:
        return handle.result(timeout=deadline.remaining())

    def gather(self, handles: list[Any], deadline: Deadline) -> list[Any]:
        # Not distributed.wait(handles, timeout): on a timeout it leaves one orphaned coroutine per
        # pending future, which stalls the client's close and prints "Task was destroyed but it is
        # pending!" once for each. One coroutine on the client's loop awaits them all in order
        # instead, and a timeout cancels just that one.
        states = [getattr(h, "_state", None) for h in handles]
        timeout = deadline.remaining()
        try:
            if all(hasattr(state, "wait") for state in states):
                self.client.sync(_await_in_order, states, callback_timeout=timeout)
            else:  # another distributed version: the public (noisier on timeout) way
                _dask_distributed().wait(handles, timeout=timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"the sample did not finish within {deadline.seconds:g} s") from exc
        return self.client.gather(handles)  # type: ignore[no-any-return]

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int, deadline: Deadline) -> Iterator[Any]:
        handles = [self.submit(tasks.apply_chunk, fn, chunk) for chunk in _chunks(items, chunksize)]
        for chunk_result in self.gather(handles, deadline):
            yield from chunk_result


async def _await_in_order(states: list[Any]) -> None:
    """Wait until every dask future state is finished (done or failed), on the client's loop."""
    for state in states:
        await state.wait()


def _dask_distributed() -> Any:
    """dask.distributed, typed Any: its functions are untyped (mypy --strict), and it is optional."""
    import dask.distributed

    return dask.distributed


# --- Ray (optional) --------------------------------------------------------------------------


class RayBackend(Backend):
    """A local Ray instance with `slots` CPUs; tasks are plain remote functions (num_cpus=1 each).

    Ray runs each task in one of its worker processes, `slots` at a time; its other processes (GCS,
    raylet, agents) start with ray.init and are waited for at shutdown, so none outlive the sample.
    """

    name = "ray"

    def __init__(self, setup: Setup, *, cluster_logs: bool = False):
        super().__init__(setup, cluster_logs=cluster_logs)
        self._ray: Any = None
        self._remotes: dict[Callable[..., Any], Any] = {}
        self._session_dir: str | None = None

    def _start(self, stack: contextlib.ExitStack) -> None:
        import ray

        self._ray = ray
        stack.callback(self._shutdown)  # before init: a half-started instance is stopped too
        ray.init(
            num_cpus=self.setup.slots,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=self.cluster_logs,
            # ERROR, not WARNING: every ray.init warns that token authentication is on.
            logging_level=logging.INFO if self.cluster_logs else logging.ERROR,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}},
        )
        self._session_dir = _ray_session_dir(ray)

    def _shutdown(self) -> None:
        ray = self._ray
        if ray is None:
            return
        # Wait for Ray's processes to exit, so none of them still runs (or dies) in the next sample.
        ray.shutdown(wait_for_processes=True)
        self._remotes.clear()
        session = self._session_dir
        if session and not self.failed and not self.cluster_logs:
            shutil.rmtree(session, ignore_errors=True)  # its logs; kept after a failure, to read

    def health(self) -> str | None:
        ray = self._ray
        if ray is None or self.failed:
            return None
        if not ray.is_initialized():
            return "Ray is no longer initialized"
        return None

    def _remote(self, fn: Callable[..., Any]) -> Any:
        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = self._ray.remote(fn)
        return remote

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._remote(fn).remote(*args)

    def result(self, handle: Any, deadline: Deadline) -> Any:
        return self._get(handle, deadline)

    def gather(self, handles: list[Any], deadline: Deadline) -> list[Any]:
        return self._get(handles, deadline)  # type: ignore[no-any-return]

    def _get(self, refs: Any, deadline: Deadline) -> Any:
        try:
            return self._ray.get(refs, timeout=deadline.remaining())
        except self._ray.exceptions.GetTimeoutError as exc:  # a TimeoutError; say which deadline
            raise TimeoutError(f"the sample did not finish within {deadline.seconds:g} s") from exc

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int, deadline: Deadline) -> Iterator[Any]:
        handles = [self.submit(tasks.apply_chunk, fn, chunk) for chunk in _chunks(items, chunksize)]
        for chunk_result in self.gather(handles, deadline):
            yield from chunk_result


def _ray_session_dir(ray: Any) -> str | None:
    """This instance's /tmp/ray/session_* directory (logs), or None if Ray does not say."""
    try:
        node = ray._private.worker._global_node
        path = node.get_session_dir_path() if node is not None else None
    except Exception:
        return None
    return str(path) if path and os.path.basename(str(path)).startswith("session_") else None


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


def backend_specs(names: list[str] | None = None) -> list[BackendSpec]:
    """Every backend, or the ones named; an optional one is imported (seconds for Ray) only if asked."""
    import conveyor

    specs = [
        BackendSpec("conveyor", "Conveyor", ConveyorBackend, version=conveyor.__version__),
        BackendSpec("conveyor_threads", "Conveyor threads", ConveyorThreadsBackend, version=conveyor.__version__),
        BackendSpec("conveyor_pair", "Conveyor pair", ConveyorPairBackend, version=conveyor.__version__),
        BackendSpec("process_pool", "ProcessPool", PoolBackend, version=f"python {sys.version.split()[0]}"),
        BackendSpec("dask", "dask.distributed", DaskBackend, module="dask.distributed"),
        BackendSpec("ray", "Ray", RayBackend, module="ray"),
    ]
    specs = [s for s in specs if not names or s.name in names]
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

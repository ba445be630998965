"""Client: the Python API, for threads and plain scripts (aio.py is the asyncio twin, executor.py the
concurrent.futures.Executor).

    with Client("tcp://127.0.0.1:5555") as client:
        fut = client.submit(fn, *args, **kwargs)     # a concurrent.futures.Future (JobFuture)
        for r in client.map(fn, items, chunksize=256): ...
        client.options(mode="asyncio", retries=2, timeout=30, tags=["gpu"]).submit(fn, x)

With no address and no CONVEYOR_DISPATCHER, a Client starts a private local cluster and stops it
when it closes.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import msgspec

from conveyor.client.connection import Connection
from conveyor.client.future import JobFuture
from conveyor.client.local import LocalCluster
from conveyor.errors import ConveyorError
from conveyor.protocol import Cmd
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.protocol.commands import MODE_NAMES
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE, check_frames
from conveyor.protocol.payload import decode_value, encode_call, encode_chunk, encode_function
from conveyor.security.keys import ENV_KEYS, load_peer_credentials

ENV_DISPATCHER = "CONVEYOR_DISPATCHER"
_OPTION_NAMES = ("mode", "tags", "retries", "retry_backoff", "timeout", "retry_on", "keep")


def _wire_options(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in _OPTION_NAMES:
            raise TypeError(f"unknown task option {key!r}; known: {', '.join(_OPTION_NAMES)}")
        if value is None:
            continue
        if key == "tags":
            value = [value] if isinstance(value, str) else list(value)
        elif key == "retry_on":
            names = value if isinstance(value, list | tuple) else [value]
            value = [v if isinstance(v, str) else perr.type_name(v) for v in names]
        elif key == "mode" and value not in MODE_NAMES:
            raise ValueError(f"unknown mode {value!r}: choose one of {', '.join(MODE_NAMES)}")
        out[key] = value
    return out


class Client:
    def __init__(
        self,
        address: str | None = None,
        *,
        connect_timeout: float = 10.0,
        max_pending: int = 100_000,
        reconnect_timeout: float = 60.0,
        local_workers: int = 1,
        local_mode: str = "processes",
        local_concurrency: int | None = None,
        context: Any = None,
        keys: str | os.PathLike[str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        **options: Any,
    ):
        address = address or os.environ.get(ENV_DISPATCHER) or None
        keys = keys or os.environ.get(ENV_KEYS) or None  # a key directory (docs/security.md)
        credentials = load_peer_credentials(keys, "client") if keys is not None else None
        self._max_message_size = max_message_size
        self._cluster: LocalCluster | None = None
        if address is None:
            self._cluster = LocalCluster(
                workers=local_workers, mode=local_mode, concurrency=local_concurrency,
                keys=None if keys is None else str(keys),
            )
            address = self._cluster.start()
        self.address = address
        self._options = _wire_options(options)
        self._task_opts: dict[str, msgspec.Raw] = {}  # per function name: its options, checked and encoded once
        self._owner = True
        try:
            self._conn = Connection(
                address, max_pending=max_pending, reconnect_timeout=reconnect_timeout, context=context,
                credentials=credentials, max_message_size=max_message_size,
            )
            self._conn.connect(connect_timeout)
            if self._cluster is not None:
                self.wait_for_workers(local_workers)
        except BaseException:
            if hasattr(self, "_conn"):
                self._conn.close()
            if self._cluster is not None:
                self._cluster.stop()
            raise

    # --- submitting ---------------------------------------------------------------------------------

    def options(self, **options: Any) -> Client:
        """A view of this client whose tasks carry these options (mode, tags, retries, timeout, ...)."""
        view = object.__new__(Client)
        view.__dict__.update(self.__dict__)
        view._options = {**self._options, **_wire_options(options)}
        view._task_opts = {}
        view._owner = False
        return view

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> JobFuture:
        """Run fn(*args, **kwargs) on a worker. fn may be a function or a 'module:function' string."""
        name, blob = encode_function(fn)
        frames = encode_call(name, blob, args, kwargs)
        return self._submit(name, frames)

    def _submit(self, name: str, frames: list[Any]) -> JobFuture:
        check_frames(frames, self._max_message_size)  # a larger frame would cut the connection
        # One options map per function, shared by its tasks (nothing changes it once built).
        opts = self._task_opts.get(name)
        if opts is None:
            if len(self._task_opts) >= 1024:
                self._task_opts.clear()
            opts = self._task_opts[name] = c.raw_options(c.options(**self._options, fn=name))
        return self._conn.submit(self._conn.new_job_id(), opts, frames)

    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        chunksize: int = 1,
        timeout: float | None = None,
        window: int | None = None,
        progress: bool = False,
    ) -> Iterator[Any]:
        """Results of fn over the items, in input order, streamed: at most `window` tasks are in flight.

        chunksize > 1 sends that many calls in one task (far less overhead for small functions);
        timeout bounds the whole iteration, as in concurrent.futures.Executor.map. progress=True shows a
        progress bar with rate and ETA on stderr when it is a terminal (nothing otherwise).
        """
        return self.starmap(
            fn, zip(*iterables, strict=False), chunksize=chunksize, timeout=timeout, window=window,
            progress=progress, total=_common_length(iterables) if progress else None,
        )

    def starmap(
        self,
        fn: Callable[..., Any] | str,
        calls: Iterable[Iterable[Any]],
        *,
        chunksize: int = 1,
        timeout: float | None = None,
        window: int | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[Any]:
        """Like map, but each item is the argument list of one call: fn(*args) (as itertools.starmap).

        `total` (the number of calls, when known) lets the progress bar show an ETA."""
        if chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        name, blob = encode_function(fn)
        limit = window or max(8, 65536 // chunksize)
        args = (tuple(a) for a in calls)
        results = self._map_results(name, blob, args, chunksize, limit, deadline)
        if progress:
            from conveyor.client.progress import track

            return track(results, total, name)
        return results

    def _map_results(
        self,
        name: str,
        blob: bytes | None,
        calls: Iterator[tuple[Any, ...]],
        chunksize: int,
        limit: int,
        deadline: float | None,
    ) -> Iterator[Any]:
        in_flight: deque[JobFuture] = deque()

        def fill() -> None:
            while len(in_flight) < limit:
                if chunksize == 1:
                    args = next(calls, None)
                    if args is None:
                        return
                    in_flight.append(self._submit(name, encode_call(name, blob, args, {})))
                else:
                    chunk = list(itertools.islice(calls, chunksize))
                    if not chunk:
                        return
                    in_flight.append(self._submit(name, encode_chunk(name, blob, [(a, {}) for a in chunk])))

        try:
            fill()
            while in_flight:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                value = in_flight[0].result(remaining)
                in_flight.popleft()
                fill()
                if chunksize == 1:
                    yield value
                else:
                    yield from value
        finally:
            for fut in in_flight:
                fut.cancel()

    # --- jobs by id (the CLI uses these) ------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for a job submitted by anyone and return its result (or raise its error)."""
        record, data = self.wait_record(job_id, timeout)
        if record["state"] == "succeeded":
            return decode_value(data)
        raise perr.rebuild_exception(record.get("error") or {}, data)

    def wait_record(self, job_id: str, timeout: float | None = None) -> tuple[dict[str, Any], list[Any]]:
        """(job record, result frames) once the job has finished."""
        return self._conn.watch(job_id).result(timeout)  # type: ignore[no-any-return]

    def job_info(self, *job_ids: str, timeout: float = 10.0) -> list[dict[str, Any] | None]:
        reply = self._conn.request(Cmd.JOB_INFO, {"ids": list(job_ids)}, timeout)
        return reply["jobs"]  # type: ignore[no-any-return]

    def cancel(self, *jobs: JobFuture | str, timeout: float = 10.0) -> list[str]:
        """Cancel queued or running jobs; returns the ids that were cancelled (not already finished)."""
        ids = []
        for job in jobs:
            if isinstance(job, JobFuture):
                Future_cancel = concurrent.futures.Future.cancel
                Future_cancel(job)  # resolve locally without a second CANCEL message
                ids.append(job.job_id)
            else:
                ids.append(job)
        reply = self._conn.request(Cmd.CANCEL_JOBS, {"ids": ids}, timeout)
        return reply["cancelled"]  # type: ignore[no-any-return]

    def jobs(
        self,
        states: Iterable[str] | None = None,
        since: float | None = None,
        fn: str | None = None,
        limit: int = 100,
        timeout: float = 10.0,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Recent jobs (running, queued, then finished, newest first): (summaries, truncated).

        `since` keeps jobs submitted (or finished) in the last that many seconds; `fn` one function."""
        body: dict[str, Any] = {"limit": limit}
        if states is not None:
            body["states"] = list(states)
        if since is not None:
            body["since"] = since
        if fn is not None:
            body["fn"] = fn
        reply = self._conn.request(Cmd.JOBS, body, timeout)
        return reply["jobs"], bool(reply.get("truncated"))

    def logs(self, job_id: str, offsets: dict[str, int] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """A job's captured output: {state, streams: {name: {start, end, text}}, progress?}, from offsets."""
        reply = self._conn.request(Cmd.LOGS, {"id": job_id, "offsets": offsets or {}}, timeout)
        reply.pop("req", None)
        return reply  # type: ignore[no-any-return]

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        reply = self._conn.request(Cmd.STATUS, {}, timeout)
        reply.pop("req", None)
        return reply  # type: ignore[no-any-return]

    def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> None:
        """Block until at least n workers are registered (useful right after starting a cluster)."""
        deadline = time.monotonic() + timeout
        while len(self.status()["workers"]) < n:
            if time.monotonic() > deadline:
                raise ConveyorError(f"fewer than {n} worker(s) registered after {timeout:g} s")
            time.sleep(0.05)

    # --- lifecycle ----------------------------------------------------------------------------------

    @property
    def duplicate_results(self) -> int:
        """Outcomes that arrived for jobs already resolved (after a re-send) and were dropped."""
        return self._conn.duplicate_results

    def pending(self) -> list[JobFuture]:
        return self._conn.pending_futures()

    def close(self) -> None:
        if not self._owner:
            return
        self._conn.close()
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _common_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls zip(*iterables) makes, if every iterable knows its length."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None

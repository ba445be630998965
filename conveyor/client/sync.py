"""Client: the Python API, for threads and plain scripts (aio.py is the asyncio twin, executor.py the
concurrent.futures.Executor).

    with Client("tcp://127.0.0.1:5555") as client:
        fut = client.submit(fn, *args, **kwargs)     # a concurrent.futures.Future (JobFuture)
        for r in client.map(fn, items): ...          # chunked automatically, in input order, streamed
        client.options(mode="asyncio", retries=2, timeout=30, tags=["gpu"]).submit(fn, x)

With no address and no CONVEYOR_DISPATCHER, a Client starts a private local cluster and stops it
when it closes. Timeouts are in seconds, `max_message_size` in bytes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

from conveyor.client import schedules as sched
from conveyor.client import states
from conveyor.client.base import REQUEST_TIMEOUT_S, ClientBase, common_length, limit_list, limit_of, limits_body
from conveyor.client.connection import outcome_error
from conveyor.client.future import JobFuture
from conveyor.client.mapping import SLOTS_WAIT_S, MapRun
from conveyor.errors import ConveyorError
from conveyor.protocol import Cmd
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.protocol.payload import decode_value

__all__ = ["Client"]

WORKERS_POLL_S = 0.01  # wait_for_workers asks for STATUS this often (a round trip each: cheap)


class Client(ClientBase):
    def __init__(
        self,
        address: str | Sequence[str] | None = None,
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
        super().__init__(
            address, connect_timeout=connect_timeout, max_pending=max_pending, reconnect_timeout=reconnect_timeout,
            local_workers=local_workers, local_mode=local_mode, local_concurrency=local_concurrency,
            context=context, keys=keys, max_message_size=max_message_size, options=options,
        )
        try:
            if self.address is None:
                self._start_cluster()
            self._new_connection().connect(connect_timeout)
            if self._cluster is not None:
                self.wait_for_workers(local_workers)
        except BaseException:
            if self._conn is not None:
                self._conn.close()
            if self._cluster is not None:
                self._cluster.stop()
            raise

    # --- submitting ---------------------------------------------------------------------------------

    def options(self, **options: Any) -> Client:
        """A view of this client whose tasks carry these options (mode, tags, retries, timeout, ...)."""
        self._open_conn()
        return self._view(options)

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> JobFuture:
        """Run fn(*args, **kwargs) on a worker. fn may be a function or a 'module:function' string."""
        return self._submit_call(fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        timeout: float | None = None,
        window: int | None = None,
        progress: bool = False,
    ) -> Iterator[Any]:
        """Results of fn over the items, in input order, streamed, with a bounded number in flight.

        chunksize=None (the default) sizes chunks by itself: tiny tasks travel up to a thousand to a
        job, tasks of 5 ms or more one each (see mapping.py); an int sends exactly that many calls per
        job. A task's exception is raised at its item's position, after the results before it. timeout
        bounds the whole iteration (seconds, as in concurrent.futures.Executor.map); window caps the
        jobs in flight. progress=True shows a progress bar with rate and ETA on stderr when it is a
        terminal (nothing otherwise).
        """
        return self.starmap(
            fn, zip(*iterables, strict=False), chunksize=chunksize, timeout=timeout, window=window,
            progress=progress, total=common_length(iterables) if progress else None,
        )

    def starmap(
        self,
        fn: Callable[..., Any] | str,
        calls: Iterable[Iterable[Any]],
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
        window: int | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[Any]:
        """Like map, but each item is the argument list of one call: fn(*args) (as itertools.starmap).

        `total` (the number of calls, when known) lets the progress bar show an ETA."""
        deadline = None if timeout is None else time.monotonic() + timeout
        name, run = self._map_run(fn, calls, chunksize, window)
        results = self._map_results(run, deadline)
        if progress:
            from conveyor.client.progress import track

            return track(results, total, name)
        return results

    def _map_results(self, run: MapRun, deadline: float | None) -> Iterator[Any]:
        try:
            run.fill()
            slots = run.awaiting_slots()
            if slots is not None:
                with contextlib.suppress(Exception):
                    slots.result(SLOTS_WAIT_S)
                run.fill()
            while run.in_flight:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                run.head().exception(remaining)  # wait (TimeoutError past the deadline)
                values = run.take()
                if values is None:  # a failed chunk, split: its items run one by one
                    continue
                run.fill()
                # Popped one by one: what was yielded is no longer held here (nor by the future).
                values.reverse()
                while values:
                    yield values.pop()
        finally:
            if run.in_flight and self._conn is not None:
                states.cancel_jobs(self._conn, run.jobs())  # stopped early: what is still in flight is not wanted

    # --- jobs by id (the CLI uses these) ------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for a job submitted by anyone and return its result (or raise its error)."""
        record, data = self.wait_record(job_id, timeout)
        if record["state"] == "succeeded":
            return decode_value(data)
        raise outcome_error(record, data)

    def wait_record(self, job_id: str, timeout: float | None = None) -> tuple[dict[str, Any], list[Any]]:
        """(job record, result frames) once the job has finished."""
        return self._open_conn().watch(job_id).result(timeout)  # type: ignore[no-any-return]

    def job_info(self, *job_ids: str, timeout: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any] | None]:
        """A snapshot of each job (state, attempts, worker, progress, output), None for an unknown id."""
        reply = self._open_conn().request(Cmd.JOB_INFO, {"ids": list(job_ids)}, timeout)
        return reply["jobs"]  # type: ignore[no-any-return]

    def cancel(self, *jobs: JobFuture | str, timeout: float = REQUEST_TIMEOUT_S) -> list[str]:
        """Cancel queued or running jobs; returns the ids that were cancelled (not already finished)."""
        conn = self._open_conn()
        reply = conn.request(Cmd.CANCEL_JOBS, {"ids": self._cancel_ids(jobs)}, timeout)
        return reply["cancelled"]  # type: ignore[no-any-return]

    def jobs(
        self,
        states: Iterable[str] | None = None,
        since: float | None = None,
        fn: str | None = None,
        limit: int = 100,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Recent jobs (running, queued, then finished, newest first): (summaries, truncated).

        `since` keeps jobs submitted (or finished) in the last that many seconds; `fn` one function."""
        reply = self._open_conn().request(Cmd.JOBS, self._jobs_body(states, since, fn, limit), timeout)
        return reply["jobs"], bool(reply.get("truncated"))

    def logs(
        self, job_id: str, offsets: dict[str, int] | None = None, timeout: float = REQUEST_TIMEOUT_S
    ) -> dict[str, Any]:
        """A job's captured output: {state, streams: {name: {start, end, text}}, progress?}, from offsets."""
        reply = self._open_conn().request(Cmd.LOGS, {"id": job_id, "offsets": offsets or {}}, timeout)
        reply.pop("req", None)
        return reply  # type: ignore[no-any-return]

    def status(self, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Workers, queues and totals, as the dispatcher sees them (docs/protocol.md, STATUS_REPLY)."""
        reply = self._open_conn().request(Cmd.STATUS, {}, timeout)
        reply.pop("req", None)
        return reply  # type: ignore[no-any-return]

    # --- limits (rate and concurrency keys, enforced by the dispatcher) -----------------------------

    def set_limit(self, key: str, rule: str | None, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any] | None:
        """Declare (or, with rule=None, remove) limit `key` at run time: '100/s,burst=20', 'concurrency:4'.

        Returns the key as the dispatcher now shows it (None once removed); ValueError if it refused the rule."""
        body = limits_body({key: rule})  # a bad key is refused before any connection is made
        reply = self._open_conn().request(Cmd.LIMITS, body, timeout)
        return limit_of(reply, key)

    def limits(self, timeout: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every limit key: its rule, tokens (rate) or running (concurrency), waiting jobs, oldest wait."""
        reply = self._open_conn().request(Cmd.LIMITS, limits_body({}), timeout)
        return limit_list(reply)

    def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> None:
        """Block until at least n workers are registered (useful right after starting a cluster)."""
        deadline = time.monotonic() + timeout
        while len(self.status()["workers"]) < n:
            if time.monotonic() > deadline:
                raise ConveyorError(f"fewer than {n} worker(s) registered after {timeout:g} s")
            failed = self._cluster.failure() if self._cluster is not None else None
            if failed is not None:
                raise ConveyorError(failed)
            time.sleep(WORKERS_POLL_S)

    # --- lifecycle ----------------------------------------------------------------------------------

    def pending(self) -> list[JobFuture]:
        """The futures of this client's jobs that have no outcome yet."""
        return self._open_conn().pending_futures()

    def close(self) -> None:
        """Close the connection (pending futures fail) and stop the local cluster, if any. Idempotent."""
        if not self._owner:
            return
        if self._conn is not None:
            self._conn.close()
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- schedules (conveyor/client/schedules.py builds the requests; docs/schedules.md) ------------

    def schedule(
        self, name: str, fn: Callable[..., Any] | str, /, *args: Any, cron: str | None = None,
        every: sched.Duration | None = None, offset: sched.Duration | None = None, tz: str = "UTC",
        misfire: str = "once", overlap: str = "skip", jitter: sched.Duration | None = None,
        catchup_window: sched.Duration | None = None, max_catchup: int = sched.DEFAULT_MAX_CATCHUP,
        pause_on_failure: bool = False, **kwargs: Any,
    ) -> dict[str, Any]:
        """Create or change schedule `name`: fn(*args, **kwargs) at every slot of `cron` (in zone `tz`) or
        `every` (from the Unix epoch, plus `offset`), with this client's task options. Returns the schedule."""
        when = sched.spec(cron=cron, every=every, offset=offset, tz=tz, misfire=misfire, overlap=overlap,
                          jitter=jitter, catchup_window=catchup_window, max_catchup=max_catchup,
                          pause_on_failure=pause_on_failure)
        body, frames = sched.upsert(name, fn, args, kwargs, self._options, when)
        return sched.one(self._open_conn().request(Cmd.SCHEDULE, body, REQUEST_TIMEOUT_S, frames))

    def schedules(self, timeout: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every schedule: its spec, next run, last slot, last job and outcome, fired and skipped counts."""
        return sched.many(self._open_conn().request(Cmd.SCHEDULE, {"op": "list"}, timeout))

    def schedule_info(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        return sched.one(self._open_conn().request(Cmd.SCHEDULE, sched.request("show", name), timeout))

    def preview(
        self, name_or_spec: str | dict[str, Any], n: int = 10, timeout: float = REQUEST_TIMEOUT_S
    ) -> list[dt.datetime]:
        """The next n slots of a schedule, or of a spec ({'cron': ..., 'tz': ...}), in its zone."""
        body = sched.preview_request(name_or_spec, n)
        return sched.slots(self._open_conn().request(Cmd.SCHEDULE, body, timeout), name_or_spec)

    def pause(
        self, name: str, until: dt.datetime | dt.timedelta | float | str | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Pause a schedule for good, or until an aware datetime or for a duration (seconds, '2h')."""
        body = sched.request("pause", name, until=sched.pause_until(until))
        return sched.one(self._open_conn().request(Cmd.SCHEDULE, body, timeout))

    def resume(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Resume a paused schedule; the slots missed meanwhile follow its misfire policy."""
        return sched.one(self._open_conn().request(Cmd.SCHEDULE, sched.request("resume", name), timeout))

    def trigger(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> str:
        """One extra run now (its slots are untouched); returns its job id, sched:NAME:manual:N."""
        return sched.job_ids(self._open_conn().request(Cmd.SCHEDULE, sched.request("trigger", name), timeout))[0]

    def backfill(
        self, name: str, start: dt.datetime, end: dt.datetime, timeout: float = REQUEST_TIMEOUT_S
    ) -> list[str]:
        """Run the slots in [start, end] (at most max_catchup, oldest first, through the overlap policy);
        returns the ids of the jobs created (a slot that already has its job is not run again)."""
        body = sched.backfill_request(name, start, end)
        return sched.job_ids(self._open_conn().request(Cmd.SCHEDULE, body, timeout))

    def unschedule(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        """Delete a schedule (the jobs it created stay)."""
        sched.deleted(self._open_conn().request(Cmd.SCHEDULE, sched.request("delete", name), timeout))

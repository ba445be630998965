"""AsyncClient: the Client's API for asyncio programs, native: every call awaits the connection's own
futures (no thread per call, none per result of a map).

    async with AsyncClient("tcp://127.0.0.1:5555") as c:
        value = await c.submit(fn, x)                # an AsyncJobFuture: await it, or cancel it
        async for r in c.map(fn, items): ...         # chunked automatically, in input order, streamed
        print(await c.status(), await c.jobs(states=["failed"]))

It has every public method of Client, under the same names and parameters (tests/test_async_client.py
checks that they do not drift). Cancellation is asyncio's: cancelling an awaited submit, or a task
iterating a map, raises CancelledError there and cancels the jobs still in flight, queued or running
(as cancelling a task stops its coroutine).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from conveyor.client import schedules as sched
from conveyor.client import states
from conveyor.client.base import REQUEST_TIMEOUT_S, ClientBase, common_length, limit_list, limit_of, limits_body
from conveyor.client.connection import Connection, outcome_error
from conveyor.client.future import JobFuture
from conveyor.client.mapping import SLOTS_WAIT_S, MapRun
from conveyor.client.sync import WORKERS_POLL_S
from conveyor.errors import ConveyorError
from conveyor.protocol import Cmd
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.protocol.payload import decode_value

CLOSE_TIMEOUT_S = 5.0  # close() waits this long at most for the I/O thread to end


class AsyncJobFuture(asyncio.Future[Any]):
    """A job's asyncio future: awaiting it gives the job's result (or raises its error); cancelling it
    cancels the job, queued or running. `job` is the JobFuture behind it (`info` once done)."""

    job: JobFuture

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def info(self) -> dict[str, Any]:
        return self.job.info

    def then(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> AsyncJobFuture:
        """Run fn(this job's result, *args, **kwargs) once it has succeeded: a new job (JobFuture.then)."""
        return self.job.then(fn, *args, **kwargs)  # type: ignore[no-any-return]


class AsyncClient(ClientBase):
    """The Client's API for asyncio programs: `await c.submit(fn, x)` gives the result."""

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

    async def __aenter__(self) -> AsyncClient:
        if self._conn is not None:
            raise RuntimeError("an AsyncClient opens once: create a new one")
        try:
            if self.address is None:
                await asyncio.to_thread(self._start_cluster)  # starts processes: once, in a thread
            conn = self._new_connection()
            try:
                await asyncio.wait_for(asyncio.wrap_future(conn.welcome), self._connect_timeout_s)
            except TimeoutError:
                raise conn.no_answer(self._connect_timeout_s) from None
            if self._cluster is not None:
                await self.wait_for_workers(self._local[0])
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- submitting ---------------------------------------------------------------------------------

    def options(self, **options: Any) -> AsyncClient:
        """A view of this client whose tasks carry these options (mode, tags, retries, timeout, ...)."""
        self._open_conn()
        return self._view(options)

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> AsyncJobFuture:
        """Run fn(*args, **kwargs) on a worker; await the returned future for its result."""
        conn = self._open_conn()
        loop = asyncio.get_running_loop()
        job = self._submit_call(fn, args, kwargs)
        return _bridge(job, conn, loop)

    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        timeout: float | None = None,
        window: int | None = None,
        progress: bool = False,
    ) -> AsyncIterator[Any]:
        """Results of fn over the items, in input order, streamed: `async for r in c.map(fn, items)`.

        The same parameters as Client.map; `timeout` (seconds) bounds the whole iteration and raises
        TimeoutError. Cancelling the iterating task cancels what is still in flight."""
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
    ) -> AsyncIterator[Any]:
        """Like map, but each item is the argument list of one call: fn(*args)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        name, run = self._map_run(fn, calls, chunksize, window)
        results = self._map_results(run, deadline)
        if progress:
            from conveyor.client.progress import atrack

            return atrack(results, total, name)
        return results

    async def _map_results(self, run: MapRun, deadline: float | None) -> AsyncIterator[Any]:
        try:
            run.fill()
            slots = run.awaiting_slots()
            if slots is not None:
                with contextlib.suppress(Exception):  # the STATUS is shared: shielded from the timeout
                    await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(slots)), SLOTS_WAIT_S)
                run.fill()
            while run.in_flight:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await _done(run.head(), remaining)
                values = run.take()
                if values is None:  # a failed chunk, split: its items run one by one
                    continue
                run.fill()
                values.reverse()
                while values:
                    yield values.pop()
        finally:
            if run.in_flight and self._conn is not None:
                states.cancel_jobs(self._conn, run.jobs())  # cancelled, or stopped early: not wanted any more

    # --- jobs by id ---------------------------------------------------------------------------------

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for a job submitted by anyone and return its result (or raise its error)."""
        record, data = await self.wait_record(job_id, timeout)
        if record["state"] == "succeeded":
            return decode_value(data)
        raise outcome_error(record, data)

    async def wait_record(self, job_id: str, timeout: float | None = None) -> tuple[dict[str, Any], list[Any]]:
        """(job record, result frames) once the job has finished."""
        watch = asyncio.wrap_future(self._open_conn().watch(job_id))
        return await asyncio.wait_for(watch, timeout)

    async def job_info(self, *job_ids: str, timeout: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any] | None]:
        """A snapshot of each job (state, attempts, worker, progress, output), None for an unknown id."""
        reply = await self._request(Cmd.JOB_INFO, {"ids": list(job_ids)}, timeout)
        return reply["jobs"]  # type: ignore[no-any-return]

    async def cancel(self, *jobs: JobFuture | AsyncJobFuture | str, timeout: float = REQUEST_TIMEOUT_S) -> list[str]:
        """Cancel queued or running jobs; returns the ids that were cancelled (not already finished)."""
        self._open_conn()
        plain = tuple(job.job if isinstance(job, AsyncJobFuture) else job for job in jobs)
        reply = await self._request(Cmd.CANCEL_JOBS, {"ids": self._cancel_ids(plain)}, timeout)
        return reply["cancelled"]  # type: ignore[no-any-return]

    async def jobs(
        self,
        states: Iterable[str] | None = None,
        since: float | None = None,
        fn: str | None = None,
        limit: int = 100,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Recent jobs (running, queued, then finished, newest first): (summaries, truncated)."""
        reply = await self._request(Cmd.JOBS, self._jobs_body(states, since, fn, limit), timeout)
        return reply["jobs"], bool(reply.get("truncated"))

    async def logs(
        self, job_id: str, offsets: dict[str, int] | None = None, timeout: float = REQUEST_TIMEOUT_S
    ) -> dict[str, Any]:
        """A job's captured output: {state, streams: {name: {start, end, text}}, progress?}, from offsets."""
        reply = await self._request(Cmd.LOGS, {"id": job_id, "offsets": offsets or {}}, timeout)
        reply.pop("req", None)
        return reply  # type: ignore[no-any-return]

    async def status(self, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Workers, queues and totals, as the dispatcher sees them (docs/protocol.md, STATUS_REPLY)."""
        reply = await self._request(Cmd.STATUS, {}, timeout)
        reply.pop("req", None)
        return reply  # type: ignore[no-any-return]

    # --- limits (rate and concurrency keys, enforced by the dispatcher) -----------------------------

    async def set_limit(self, key: str, rule: str | None, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any] | None:
        """Declare (or, with rule=None, remove) limit `key` at run time; see Client.set_limit."""
        body = limits_body({key: rule})  # a bad key is refused before any connection is made
        reply = await self._request(Cmd.LIMITS, body, timeout)
        return limit_of(reply, key)

    async def limits(self, timeout: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every limit key: its rule, tokens (rate) or running (concurrency), waiting jobs, oldest wait."""
        reply = await self._request(Cmd.LIMITS, limits_body({}), timeout)
        return limit_list(reply)

    async def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> None:
        """Wait until at least n workers are registered."""
        deadline = time.monotonic() + timeout
        while len((await self.status())["workers"]) < n:
            if time.monotonic() > deadline:
                raise ConveyorError(f"fewer than {n} worker(s) registered after {timeout:g} s")
            failed = self._cluster.failure() if self._cluster is not None else None
            if failed is not None:
                raise ConveyorError(failed)
            await asyncio.sleep(WORKERS_POLL_S)

    async def _request(self, cmd: Cmd, body: dict[str, Any], timeout_s: float) -> Any:
        conn = self._open_conn()
        req, reply = conn.start_request(cmd, body)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(reply), timeout_s)
        except TimeoutError:
            raise conn.no_reply(timeout_s) from None
        finally:
            conn.end_request(req)

    # --- lifecycle ----------------------------------------------------------------------------------

    async def pending(self) -> list[JobFuture]:
        """The futures of this client's jobs that have no outcome yet."""
        return self._open_conn().pending_futures()

    async def close(self) -> None:
        """Close the connection (pending futures fail) and stop the local cluster, if any. Idempotent."""
        if not self._owner:
            return
        conn = self._conn
        if conn is not None and not conn.closed.done():
            conn.begin_close()
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(conn.closed)), CLOSE_TIMEOUT_S)
            except TimeoutError:
                pass
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)


    # --- schedules (conveyor/client/schedules.py builds the requests; docs/schedules.md) ------------

    async def schedule(
        self, name: str, fn: Callable[..., Any] | str, /, *args: Any, cron: str | None = None,
        every: sched.Duration | None = None, offset: sched.Duration | None = None, tz: str = "UTC",
        misfire: str = "once", overlap: str = "skip", jitter: sched.Duration | None = None,
        catchup_window: sched.Duration | None = None, max_catchup: int = sched.DEFAULT_MAX_CATCHUP,
        pause_on_failure: bool = False, **kwargs: Any,
    ) -> dict[str, Any]:
        """Create or change schedule `name` (as Client.schedule)."""
        when = sched.spec(cron=cron, every=every, offset=offset, tz=tz, misfire=misfire, overlap=overlap,
                          jitter=jitter, catchup_window=catchup_window, max_catchup=max_catchup,
                          pause_on_failure=pause_on_failure)
        body, frames = sched.upsert(name, fn, args, kwargs, self._options, when)
        return sched.one(await self._schedule_request(body, REQUEST_TIMEOUT_S, frames))

    async def schedules(self, timeout: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
        return sched.many(await self._schedule_request({"op": "list"}, timeout))

    async def schedule_info(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        return sched.one(await self._schedule_request(sched.request("show", name), timeout))

    async def preview(
        self, name_or_spec: str | dict[str, Any], n: int = 10, timeout: float = REQUEST_TIMEOUT_S
    ) -> list[dt.datetime]:
        body = sched.preview_request(name_or_spec, n)
        return sched.slots(await self._schedule_request(body, timeout), name_or_spec)

    async def pause(
        self, name: str, until: dt.datetime | dt.timedelta | float | str | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> dict[str, Any]:
        body = sched.request("pause", name, until=sched.pause_until(until))
        return sched.one(await self._schedule_request(body, timeout))

    async def resume(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        return sched.one(await self._schedule_request(sched.request("resume", name), timeout))

    async def trigger(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> str:
        return sched.job_ids(await self._schedule_request(sched.request("trigger", name), timeout))[0]

    async def backfill(
        self, name: str, start: dt.datetime, end: dt.datetime, timeout: float = REQUEST_TIMEOUT_S
    ) -> list[str]:
        body = sched.backfill_request(name, start, end)
        return sched.job_ids(await self._schedule_request(body, timeout))

    async def unschedule(self, name: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        sched.deleted(await self._schedule_request(sched.request("delete", name), timeout))

    async def _schedule_request(self, body: dict[str, Any], timeout_s: float, frames: Sequence[Any] = ()) -> Any:
        conn = self._open_conn()
        req, reply = conn.start_request(Cmd.SCHEDULE, body, frames)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(reply), timeout_s)
        except TimeoutError:
            raise conn.no_reply(timeout_s) from None
        finally:
            conn.end_request(req)

def _bridge(job: JobFuture, conn: Connection, loop: asyncio.AbstractEventLoop) -> AsyncJobFuture:
    """An asyncio future that follows a JobFuture; cancelling it cancels the job wherever it is."""
    future = AsyncJobFuture(loop=loop)
    future.job = job

    def job_done(_: Future[Any]) -> None:  # on the client's I/O thread, or here if already done
        try:
            loop.call_soon_threadsafe(_copy_outcome, job, future)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def future_done(f: asyncio.Future[Any]) -> None:
        if f.cancelled() and not job.done():
            states.cancel_jobs(conn, [job])

    future.add_done_callback(future_done)
    job.add_done_callback(job_done)
    return future


def _copy_outcome(job: JobFuture, future: asyncio.Future[Any]) -> None:
    if future.done():
        return
    if job.cancelled():
        future.cancel()
        return
    exc = job.exception()
    if exc is not None:
        future.set_exception(exc)
    elif job.withheld:  # its result is in the dispatcher: fetched in a thread (result() waits for it)
        fetch = asyncio.get_running_loop().run_in_executor(None, job.result)
        fetch.add_done_callback(lambda f: _copy_fetched(f, future))
    else:
        future.set_result(job.result())


def _copy_fetched(fetch: asyncio.Future[Any], future: asyncio.Future[Any]) -> None:
    if future.done():
        return
    exc = None if fetch.cancelled() else fetch.exception()
    if fetch.cancelled():
        future.cancel()
    elif exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(fetch.result())


async def _done(job: JobFuture, timeout_s: float | None) -> None:
    """Wait until the job's future is done (TimeoutError after timeout_s); cancelling the wait leaves the job."""
    if job.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: Future[Any]) -> None:
        try:
            loop.call_soon_threadsafe(_set_done, waiter)
        except RuntimeError:  # the loop is closed
            pass

    job.add_done_callback(wake)
    if timeout_s is None:
        await waiter
    else:
        await asyncio.wait_for(waiter, timeout_s)


def _set_done(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

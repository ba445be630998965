"""Whether a job has started, and the two ways to cancel one.

concurrent.futures' contract in Conveyor's terms: a job is *started* once the dispatcher has assigned it
to a worker (as a future in a process pool's call queue counts as running). The client is not told of
assignments, so it asks (JOB_INFO), and asks only once the dispatcher has accepted the job (ACCEPTED):
by then the dispatcher has had a scheduling turn in which a free slot would have taken it.

    job_states(conn, jobs)        the dispatcher's state of each job; marks the assigned ones running
    cancel_unstarted(conn, jobs)  JobFuture.cancel(), Executor.shutdown(cancel_futures=True): only what
                                  no worker was assigned, asked first
    cancel_jobs(conn, jobs)       Client.map's early stop, asyncio cancellation: wherever the jobs are,
                                  at once, without asking

A job the dispatcher assigns between its answer and the CANCEL_JOBS that follows is still cancelled
(CANCEL_JOBS cancels running jobs too); closing that window needs a CANCEL_JOBS that cancels only queued
jobs, which the protocol does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from conveyor.protocol import Cmd

if TYPE_CHECKING:
    from conveyor.client.connection import Connection
    from conveyor.client.future import JobFuture

ACCEPT_WAIT_S = 2.0  # wait this long at most for the dispatcher to accept a job before asking about it
STATE_TIMEOUT_S = 5.0  # and this long at most for its answer
JOB_INFO_BATCH = 4096  # ids per JOB_INFO request at most
STARTED = frozenset({"running", "succeeded", "failed", "cancelled"})  # states of a job a worker was assigned


def job_states(conn: Connection, jobs: Sequence[JobFuture]) -> dict[str, str] | None:
    """The dispatcher's state of each job (queued, running, ...), once it has accepted them; jobs it does
    not know are left out, and those a worker was assigned are marked running. None if the dispatcher
    cannot be asked now: on the client's I/O thread (it would wait for itself), while the dispatcher is
    unreachable, or when it does not answer within STATE_TIMEOUT_S."""
    if conn.on_io_thread() or not conn.dispatcher_reachable():
        return None
    conn.wait_accepted(jobs, ACCEPT_WAIT_S)
    ids = [job.job_id for job in jobs if not job.done()]
    asked: list[tuple[list[str], int, Future[Any]]] = []
    states: dict[str, str] = {}
    try:
        for i in range(0, len(ids), JOB_INFO_BATCH):
            chunk = ids[i : i + JOB_INFO_BATCH]
            asked.append((chunk, *conn.start_request(Cmd.JOB_INFO, {"ids": chunk})))
        for chunk, _, reply in asked:
            views = reply.result(STATE_TIMEOUT_S)["jobs"]
            for job_id, view in zip(chunk, views, strict=False):
                if isinstance(view, dict) and isinstance(view.get("state"), str):
                    states[job_id] = view["state"]
    except Exception:  # no answer in time, or the connection closed or failed meanwhile
        return None
    finally:
        for _, req, _ in asked:
            conn.end_request(req)
    for job in jobs:
        if states.get(job.job_id) in STARTED:
            job._mark_running()
    return states


def cancel_unstarted(conn: Connection, jobs: Sequence[JobFuture]) -> set[JobFuture]:
    """Cancel those of the jobs no worker was assigned yet; returns the ones cancelled.

    Where the dispatcher cannot be asked (job_states returns None) they are cancelled wherever they are."""
    cancelled = {job for job in conn.take_unsent(jobs) if job._cancel_locally()}  # never left: not started
    asked = [job for job in jobs if not job.done()]
    if not asked:
        return cancelled
    states = job_states(conn, asked)
    if states is None:
        cancel_jobs(conn, asked)
        return cancelled | {job for job in asked if job.cancelled()}
    queued = [
        job for job in asked
        if states.get(job.job_id) == "queued" or (job.job_id not in states and not job._accepted)
    ]
    ids = [job.job_id for job in queued if job._cancel_locally()]
    if ids:
        conn.queue_command(Cmd.CANCEL_JOBS, {"ids": ids, "req": None})
    return cancelled | {job for job in queued if job.cancelled()}


def cancel_jobs(conn: Connection, jobs: Iterable[JobFuture]) -> None:
    """Cancel the jobs wherever they are, queued or running, without waiting: each future at once (one a
    worker was assigned ends with JobCancelled instead), the jobs by CANCEL_JOBS."""
    jobs = [job for job in jobs if not job.done()]
    unsent = set(conn.take_unsent(jobs))
    ids = [job.job_id for job in jobs if job not in unsent]
    if ids:
        conn.queue_command(Cmd.CANCEL_JOBS, {"ids": ids, "req": None})
    for job in jobs:  # outside the connection's lock: this runs the futures' done-callbacks
        job._cancel_locally()

"""Dependencies from the client's side: futures as arguments, `after`, `allow_failure`, batches.

A JobFuture anywhere in a call's arguments (inside lists, tuples and dicts too) becomes a parent: the
call is encoded with `ParentRef(i)` in its place and the SUBMIT entry names the parent's id, nothing
more. The dispatcher holds the job until its parents have finished, then attaches their stored result
frames to its ASSIGN, and the worker puts each value where its reference was (docs/workflows.md).

A parent whose outcome this client already has is passed by value instead: the dispatcher may have
forgotten it once this client acknowledged its JOB_DONE. That is decided twice: when the call is
encoded (the future is done), and again on the I/O thread right before the SUBMIT leaves (`entry`),
because an outcome can arrive, and be acknowledged, in between. Before its ACK, never after, so a
reference sent by id always reaches a dispatcher that still holds the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any

from conveyor.client.future import JobFuture
from conveyor.errors import DependencyCancelled, DependencyFailed, JobCancelled, JobExpired
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.protocol.payload import ParentRange, ParentRef, encode_call
from conveyor.task import Failed

if TYPE_CHECKING:
    from conveyor.client.connection import Connection

DEP_OPTIONS = ("after", "allow_failure")  # options of a view that are edges, not TaskOptions
SCALARS = frozenset({int, float, str, bytes, bool, type(None)})
RANGE_MIN = 16  # a list of at least this many futures goes as one reference (ParentRange)


class JobRef(JobFuture):
    """A job submitted elsewhere (another client, the CLI), named by id: `conveyor.ref(job_id)`. Pass it
    as an argument or in `after`; wait for its result with `client.result(job_id)`."""

    def result(self, timeout: float | None = None) -> Any:
        raise RuntimeError(f"{self.job_id} is a reference: wait for it with client.result({self.job_id!r})")

    def exception(self, timeout: float | None = None) -> BaseException | None:
        raise RuntimeError(f"{self.job_id} is a reference: wait for it with client.result({self.job_id!r})")

    def __repr__(self) -> str:
        return f"<JobRef {self.job_id}>"


def ref(job_id: str) -> JobRef:
    """A job submitted elsewhere, to be passed as an argument (its result) or named in `after`."""
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"a job id must be a non-empty string, not {job_id!r}")
    return JobRef(job_id, None)


class Deps:
    """A job's parents, as the client keeps them until its SUBMIT has left (or been re-sent)."""

    __slots__ = ("after", "allow", "args", "blob", "kwargs", "name", "parents")

    def __init__(self, name: str, blob: bytes | None, args: Any, kwargs: Any, parents: list[JobFuture],
                 after: list[JobFuture], allow: frozenset[str]):
        self.name, self.blob, self.args, self.kwargs = name, blob, args, kwargs  # with ParentRef in place
        self.parents = parents  # ParentRef(i) refers to parents[i]
        self.after = after
        self.allow = allow  # ids whose failure the job accepts

    def entry(self, conn: Connection, future: JobFuture) -> c.SubmitEntry | dict[str, Any]:
        """The SUBMIT entry (I/O thread, right before it leaves), or the error record of a job that
        cannot run: a parent whose outcome arrived here meanwhile ended badly."""
        maybe = [p for p in (*self.parents, *self.after) if p._connection is conn and p.job_id not in conn._pending]
        if maybe:
            conn._settle_outcomes()  # outcomes taken off _pending this turn reach their futures now
            # Not done: a batch of another thread, not sent yet. Withheld: the dispatcher keeps it (result TTL).
            arrived = [p for p in maybe if p.done() and not p.withheld]
            index = {p.job_id: i for i, p in enumerate(self.parents)}
            values: dict[int, Any] = {}
            for p in arrived:
                value = _value(p, p.job_id in self.allow)
                if _is_blocked(value):
                    return value.record  # type: ignore[no-any-return]
                if p.job_id in index:
                    values[index[p.job_id]] = value
            if values:
                self._inline(values)
                future._frames = tuple(encode_call(self.name, self.blob, self.args, self.kwargs, refs=True))
            gone = {p.job_id for p in arrived}
            self.after = [p for p in self.after if p.job_id not in gone]
        data = future._frames or ()
        ids = {p.job_id for p in (*self.parents, *self.after)}
        return c.SubmitEntry(
            future.job_id, future._opts or _NIL, len(data), tuple(p.job_id for p in self.parents),
            tuple(p.job_id for p in self.after), tuple(i for i in self.allow if i in ids), future._batch,
        )

    def _inline(self, values: dict[int, Any]) -> None:
        """Put these parents' values in place of their references, and number the rest again."""
        keep = [i for i in range(len(self.parents)) if i not in values]
        renumber = {old: new for new, old in enumerate(keep)}

        def swap(ref: ParentRef) -> Any:
            return values[ref.index] if ref.index in values else ParentRef(renumber[ref.index])

        self.args = _map_refs(self.args, swap)
        self.kwargs = _map_refs(self.kwargs, swap)
        self.parents = [self.parents[i] for i in keep]


_NIL = c.raw_options(c.DEFAULT_OPTIONS)


def find(
    fn_name: str, blob: bytes | None, args: tuple[Any, ...], kwargs: dict[str, Any],
    after: Iterable[Any], allow: Any,
) -> tuple[list[Any], Deps | None, _Blocked | None]:
    """(call frames, its parents or None, None), or ([], None, why: its error record and cause) if a
    parent whose outcome this client already has ended badly (and the edge does not allow it)."""
    parents: list[JobFuture] = []
    index: dict[str, int] = {}
    blocked: list[_Blocked] = []
    allowed = _allowed(allow)

    def swap(job: JobFuture) -> Any:
        if job.done() and not isinstance(job, JobRef) and not job.withheld:  # its outcome is here: by value
            value = _value(job, allowed is True or job.job_id in allowed)
            if _is_blocked(value):
                blocked.append(value)
            return value
        i = index.get(job.job_id)
        if i is None:
            i = index[job.job_id] = len(parents)
            parents.append(job)
        return ParentRef(i)

    def swap_list(items: list[Any]) -> Any:
        """A list of nothing but new, distinct, pending futures: one reference to all their results."""
        if len(items) < RANGE_MIN:
            return None
        jobs: list[JobFuture] = []
        seen: set[str] = set()
        for x in items:
            job = as_job(x)
            if job is None or job.job_id in index or job.job_id in seen or (
                job.done() and not isinstance(job, JobRef) and not job.withheld
            ):
                return None
            seen.add(job.job_id)
            jobs.append(job)
        start = len(parents)
        for job in jobs:
            index[job.job_id] = len(parents)
            parents.append(job)
        return ParentRange(start, len(parents))

    new_args = _map_futures(list(args), swap, swap_list)
    new_kwargs = _map_futures(kwargs, swap, swap_list)
    after_jobs: list[JobFuture] = []
    after_ids: set[str] = set()
    for a in after:
        job = as_job(a) or (ref(a) if isinstance(a, str) else None)
        if job is None:
            raise TypeError(f"after= takes futures of jobs (or job ids), not {a!r}")
        if job.done() and not isinstance(job, JobRef) and not job.withheld:
            value = _value(job, allowed is True or job.job_id in allowed)
            if _is_blocked(value):
                blocked.append(value)
        elif job.job_id not in index and job.job_id not in after_ids:
            after_jobs.append(job)
            after_ids.add(job.job_id)
    if blocked:
        return [], None, blocked[0]
    if not parents and not after_jobs:
        return encode_call(fn_name, blob, tuple(new_args), new_kwargs), None, None
    ids = {p.job_id for p in (*parents, *after_jobs)}
    allow_ids = frozenset(ids) if allowed is True else frozenset(i for i in allowed if i in ids)
    deps = Deps(fn_name, blob, new_args, new_kwargs, parents, after_jobs, allow_ids)
    return encode_call(fn_name, blob, tuple(new_args), new_kwargs, refs=True), deps, None


def has_futures(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call's arguments hold a future anywhere (the common case, none, is checked fast)."""
    scalars = SCALARS
    for a in args:
        if type(a) not in scalars and _holds(a):
            return True
    if kwargs:
        for v in kwargs.values():
            if type(v) not in scalars and _holds(v):
                return True
    return False


class _Blocked:
    """In place of a parent's value: it ended badly, and `record` is its dependant's error record;
    `cause` the root's exception as its own future raised it (for a failure)."""

    __slots__ = ("cause", "record")

    def __init__(self, record: dict[str, Any], cause: BaseException | None = None):
        self.record = record
        self.cause = cause


def _is_blocked(value: Any) -> bool:
    return type(value) is _Blocked


def _holds(obj: Any) -> bool:
    t = type(obj)
    if t in SCALARS:
        return False
    if t is list or t is tuple:
        return any(_holds(x) for x in obj)
    if t is dict:
        return any(_holds(v) for v in obj.values())
    return as_job(obj) is not None


def as_job(obj: Any) -> JobFuture | None:
    if isinstance(obj, JobFuture):
        return obj
    if isinstance(obj, asyncio.Future):  # AsyncJobFuture: its JobFuture
        job = getattr(obj, "job", None)
        if isinstance(job, JobFuture):
            return job
    return None


def _map_futures(obj: Any, swap: Any, swap_list: Any) -> Any:
    t = type(obj)
    if t in SCALARS:
        return obj
    if t is list:
        whole = swap_list(obj)
        return whole if whole is not None else [_map_futures(x, swap, swap_list) for x in obj]
    if t is tuple:
        return tuple(_map_futures(x, swap, swap_list) for x in obj)
    if t is dict:
        return {k: _map_futures(v, swap, swap_list) for k, v in obj.items()}
    job = as_job(obj)
    return obj if job is None else swap(job)


def _map_refs(obj: Any, swap: Any) -> Any:
    t = type(obj)
    if t is list:
        return [_map_refs(x, swap) for x in obj]
    if t is tuple:
        return tuple(_map_refs(x, swap) for x in obj)
    if t is dict:
        return {k: _map_refs(v, swap) for k, v in obj.items()}
    if t is ParentRange:  # some of them are inlined now: one reference each
        return [swap(ParentRef(i)) for i in range(obj.start, obj.stop)]
    return swap(obj) if t is ParentRef else obj


def _allowed(allow: Any) -> Any:
    """allow_failure as True (every parent) or a set of ids."""
    if allow is True:
        return True
    if allow is None or allow is False:
        return frozenset()
    items = [allow] if isinstance(allow, str | JobFuture | asyncio.Future) else list(allow)
    out = set()
    for item in items:
        job = as_job(item)
        out.add(job.job_id if job is not None else str(item))
    return frozenset(out)


def _value(job: JobFuture, allowed: bool) -> Any:
    """A finished parent's value for its dependant: its result, Failed(error), or (not allowed) the
    dependant's own error record (DependencyFailed or DependencyCancelled), wrapped in _Blocked."""
    try:
        exc = job.exception(0)
    except CancelledError:
        exc = JobCancelled("the job was cancelled")
    except TimeoutError:  # not settled: only a bug of ours gets here
        raise RuntimeError(f"parent {job.job_id} has no outcome yet") from None
    if exc is None:
        return job.result(0)
    state = "cancelled" if isinstance(exc, JobCancelled | DependencyCancelled) else (
        "expired" if isinstance(exc, JobExpired) else "failed")
    if allowed:
        return Failed(exc, job.job_id, state)
    cause = exc.__cause__ if isinstance(exc, DependencyFailed) else exc if state == "failed" else None
    return _Blocked(blocked_record(job, exc, state), cause)


def blocked_record(job: JobFuture, exc: BaseException, state: str) -> dict[str, Any]:
    """The error record of a job whose parent `job` ended badly, as the dispatcher would write it."""
    error = (job.info or {}).get("error") or perr.error_info(perr.EXCEPTION, perr.type_name(type(exc)), str(exc))
    if isinstance(exc, DependencyFailed | DependencyCancelled):
        root, root_fn = exc.root, getattr(exc, "root_fn", "")
        root_error = error.get("root_error")
    else:
        root, root_fn, root_error = job.job_id, str(error.get("fn", "")) or _fn_of(job), error
    if state == "failed":
        info = perr.error_info(perr.DEPENDENCY_FAILED, "DependencyFailed",
                               f"job {root} ({root_fn}) failed: {perr.describe(root_error or {})}")
        info.update(root=root, root_fn=root_fn, root_error=root_error)
        return info
    info = perr.error_info(perr.DEPENDENCY_CANCELLED, "DependencyCancelled", f"job {root} was {state}")
    info.update(root=root, root_fn=root_fn)
    return info


def _fn_of(job: JobFuture) -> str:
    opts = job._opts
    if opts is None:
        return "?"
    try:
        return c.options_from_raw(opts).fn
    except ValueError:
        return "?"


def failed_future(conn: Connection, blocked: _Blocked) -> JobFuture:
    """The future of a job that never left: a parent it needs already ended badly."""
    future = JobFuture(conn.new_job_id(), None)
    future.info = {"id": future.job_id, "state": "failed", "error": blocked.record}
    exc = perr.rebuild_exception(blocked.record, [])
    if blocked.cause is not None:
        exc.__cause__ = blocked.cause  # the root's own exception, of its own type where it could be rebuilt
    future.set_exception(exc)
    return future


# --- batches ------------------------------------------------------------------------------------------


class Batch:
    """The jobs submitted inside `with client.batch():`, sent as one SUBMIT: accepted all or none."""

    def __init__(self, batch_id: str):
        self.id = batch_id
        self.futures: list[JobFuture] = []

    def __iter__(self) -> Iterator[JobFuture]:
        return iter(self.futures)

    def __len__(self) -> int:
        return len(self.futures)


class Batching(threading.local):
    """The batch this thread is filling on a connection, if any."""

    batch: Batch | None = None


@contextlib.contextmanager
def batch(conn: Connection) -> Iterator[Batch]:
    """Collect this thread's submissions on conn; send them as one SUBMIT when the block ends without error."""
    local = conn.batching
    if local.batch is not None:
        raise RuntimeError("batches do not nest")
    b = local.batch = Batch(f"b-{conn.new_job_id()}")
    try:
        yield b
    except BaseException:
        local.batch = None
        for f in b.futures:  # nothing of it was sent
            f._opts = f._frames = None
            f._cancel_locally()
        raise
    local.batch = None
    conn.submit_batch(b.futures)


# --- children of a task -------------------------------------------------------------------------------

_current: tuple[int, Any] | None = None  # (pid, Client): one per process, made on first use
_current_lock = threading.Lock()


def current_client() -> Any:
    """Inside a task: a Client of the dispatcher this worker serves, to submit children and wait for
    them (`conveyor.current_client().submit(f, x).result()`), one per worker process.

    A task blocked on one of its futures (result(), exception(), concurrent.futures.wait() or
    as_completed(), or `await fut` in asyncio mode) lends its slot meanwhile (docs/workflows.md), so a
    one-slot worker can run the child it waits for. On a worker with keys, only if its key directory
    holds a client key pair too (the worker's own keys are a worker's, and a client needs a client's).
    Not in interpreters mode (a subinterpreter cannot load a client)."""
    global _current
    from conveyor import task
    from conveyor.client import future as future_module
    from conveyor.client.sync import Client

    if not task.in_task():
        raise RuntimeError("conveyor.current_client() is for code running as a task on a worker")
    if task.no_client is not None:
        raise RuntimeError(task.no_client)
    address = os.environ.get(task.TASK_DISPATCHER_ENV)
    if not address:
        raise RuntimeError(
            "this worker gives its tasks no client: it has keys, and its key directory holds no client key "
            "pair (`conveyor keys add-client DIR NAME` makes one; docs/workflows.md)"
        )
    keys = os.environ.get(task.TASK_KEYS_ENV) or None
    with _current_lock:
        if _current is None or _current[0] != os.getpid() or _current[1].address != address:
            client = Client(address, keys=keys)
            client.lends_slot = True
            future_module.lending = True
            _current = (os.getpid(), client)
        return _current[1]

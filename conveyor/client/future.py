"""JobFuture: a concurrent.futures.Future for one job, made cheap enough for a million of them.

The speed trick lives here and only here: a standard Future costs the garbage collector 11 tracked
objects, 7 of them in its Condition; with thousands of futures pending, collecting them was most of
the client's CPU per task. JobFuture sets Future's fields itself with a lighter condition. That
depends on Future's private fields: `LIGHT_INIT` says whether this Python's Future has exactly the
fields expected, and tests/test_client_future.py fails if the fallback (the standard __init__) is
ever taken, so a Python upgrade that changes them is noticed rather than silently slower.

What "running" means for a job (concurrent.futures' contract, in Conveyor's terms): a job is
*started* once the dispatcher has assigned it to a worker, as a future in a process pool's call queue
counts as running. `running()` and `cancel()` ask the dispatcher (states.py), so they agree with each
other and with `Executor.shutdown(cancel_futures=True)`: only jobs not assigned yet are cancelled;
assigned ones run to completion.
"""

from __future__ import annotations

import threading
from _thread import allocate_lock as _allocate_lock
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any

import msgspec

from conveyor import task
from conveyor.client import states

if TYPE_CHECKING:
    from conveyor.client.connection import Connection


class _FutureCondition(threading.Condition):
    """threading.Condition on a plain lock, without the bound methods Condition.__init__ stores.

    A standard Future costs the garbage collector 11 tracked objects, 7 of them in its Condition (the
    RLock's five bound methods, the RLock and a deque); with thousands of futures pending, collecting
    them was most of the client's CPU per task. Here the deque of waiters exists only once a thread
    waits. A Future never acquires its own condition twice, so a plain lock is enough, and the
    wait/notify logic is threading.Condition's own.
    """

    _waiters: Any = ()  # no waiter yet: notify() finds nothing to do; wait() installs a deque

    def __init__(self) -> None:  # no super().__init__(): it stores the bound methods
        self._lock = _allocate_lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if type(self._waiters) is not deque:  # called with the lock held, as notify() is
            self._waiters = deque()
        return super().wait(timeout)

    def notify(self, n: int = 1) -> None:
        if self._waiters:  # the usual case is nobody waiting: skip the ownership check
            super().notify(n)

    def notify_all(self) -> None:
        if self._waiters:
            super().notify(len(self._waiters))

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()  # type: ignore[attr-defined]
        self._waiters = ()


class _Withheld:
    """The result of a job whose JOB_DONE came without it (a large result its dependants use)."""

    def __repr__(self) -> str:
        return "WITHHELD"


WITHHELD = _Withheld()  # fetched from the dispatcher (WATCH) when result() is first called


# Set once this process made a conveyor.current_client() (inside a task): only then can a future lend a slot.
lending = False


class _LendingEvent(threading.Event):
    """The event concurrent.futures.wait() and as_completed() block on, for a waiter on a future of
    conveyor.current_client(): a task blocked there lends its worker slot, as in result()."""

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        with task.slot_lent():
            return super().wait(timeout)


class _LendingWaiters(list[Any]):
    """Future._waiters of a future of conveyor.current_client(): a waiter of wait() or as_completed() put
    here blocks on a _LendingEvent. It is swapped in as the waiter is installed, while every future it
    waits for is locked (concurrent.futures._AcquireFutures), so nothing has set its event yet."""

    def append(self, waiter: Any) -> None:
        event = getattr(waiter, "event", None)
        if type(event) is threading.Event and not event.is_set():
            waiter.event = _LendingEvent()
        super().append(waiter)


# Future.__init__'s fields, set directly below (with the lighter condition); if a Python version has
# other fields, JobFuture falls back to Future.__init__ with the standard condition.
_PENDING_STATE = Future()._state
LIGHT_INIT = set(vars(Future())) == {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}


def _settle(ended: Any) -> None:
    if not ended.done():
        ended.set_result(None)


class JobFuture(Future[Any]):
    """A concurrent.futures.Future for one job, with its id and, once done, where and how it ran.

    `cancel()` cancels the job only if no worker was assigned it yet, and `running()` is true once one
    was (both ask the dispatcher); `Client.cancel(future)` cancels a job wherever it is.
    """

    def __init__(
        self, job_id: str, connection: Connection | None, opts: msgspec.Raw | None = None,
        frames: Sequence[Any] | None = None,
    ):
        if LIGHT_INIT:
            self._condition = _FutureCondition()
            self._state = _PENDING_STATE
            self._result = None
            self._exception = None
            self._waiters = []
            self._done_callbacks: list[Callable[[Future[Any]], object]] = []
        else:
            super().__init__()
        self.job_id = job_id
        self.info: dict[str, Any] = {}
        self._connection = connection
        if lending and self._lends_slot():  # inside a task: wait() and as_completed() lend its slot too
            self._waiters = _LendingWaiters()
        # What the connection (re-)sends while the job is pending; dropped once it is resolved.
        self._opts = opts
        self._frames = frames
        self._sent = False  # a SUBMIT for it may have left (set by the connection, under its lock)
        self._shm_sent = False  # its large arguments went once through shared memory (connection.py)
        self._accepted = False  # the dispatcher's ACCEPTED named it

    # Set only on the futures that need them (most jobs have no parents and are in no batch).
    _deps: Any = None  # its parents (deps.Deps), until it is resolved
    _batch = ""  # the id of the batch (one SUBMIT, all or none) it belongs to
    _submitter: Any = None  # the view of a client (options(...)) that submitted it, if not the client itself

    def then(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """Run fn(this job's result, *args, **kwargs) once this job has succeeded: a new job, its future.

        It is submitted as this one was: by the same client, or view of it (`options(...)`), so with the
        same options (priority, mode, tags...)."""
        submitter = self._submitter or getattr(self._connection, "submitter", None)
        if submitter is None:
            raise RuntimeError(f"{self.job_id} has no client to chain with: use client.submit(fn, future)")
        return submitter.submit(fn, self, *args, **kwargs)

    @property
    def withheld(self) -> bool:
        """Done, and its result still in the dispatcher: result() fetches it (docs/workflows.md)."""
        return self._result is WITHHELD

    def result(self, timeout: float | None = None) -> Any:
        if self._state in (PENDING, RUNNING) and self._lends_slot():
            with task.slot_lent():  # a task waiting on its child: its worker slot is lent meanwhile
                return self._result_now(timeout)
        return self._result_now(timeout)

    def _result_now(self, timeout: float | None) -> Any:
        value = super().result(timeout)
        if value is WITHHELD:
            return self._fetch(timeout)
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state in (PENDING, RUNNING) and self._lends_slot():
            with task.slot_lent():
                return super().exception(timeout)
        return super().exception(timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        """`await fut` in a coroutine: its result, without blocking the event loop. In an asyncio-mode task
        awaiting a future of conveyor.current_client() lends the task's slot meanwhile."""
        return self._wait_async().__await__()

    async def _wait_async(self) -> Any:
        import asyncio

        if not self.done():
            loop = asyncio.get_running_loop()
            ended = loop.create_future()

            def wake(_: Future[Any]) -> None:  # on the client's I/O thread
                try:
                    loop.call_soon_threadsafe(_settle, ended)
                except RuntimeError:
                    pass  # that loop has closed: nobody awaits any more

            self.add_done_callback(wake)
            if self._lends_slot():
                with task.slot_lent(blocking=False):
                    await ended  # (cancelling the awaiting coroutine leaves the job alone)
            else:
                await ended
        if self.withheld:
            return await asyncio.to_thread(self.result)  # a round trip, off the loop
        return self.result(0)

    def _lends_slot(self) -> bool:
        """Submitted through conveyor.current_client(), so possibly waited on by a task of a worker."""
        return getattr(getattr(self._connection, "submitter", None), "lends_slot", False) is True

    def _fetch(self, timeout: float | None) -> Any:
        """The withheld result, asked for now (a round trip; not from the client's I/O thread)."""
        connection = self._connection
        if connection is None or connection.on_io_thread():
            raise RuntimeError(f"the result of {self.job_id} is in the dispatcher: call result() from another thread")
        from conveyor.protocol import failures as perr
        from conveyor.protocol.payload import decode_value

        record, data = connection.watch(self.job_id).result(timeout)
        if record.get("state") != "succeeded":
            raise perr.rebuild_exception(record.get("error") or {}, data)
        value = decode_value(data)
        with self._condition:
            self._result = value
        return value

    def cancel(self) -> bool:
        """Cancel the job if it has not started (no worker was assigned it); False if it has, or is done.

        Asks the dispatcher, once it has accepted the job (a round trip). Called from a done-callback,
        which runs on the client's I/O thread and cannot wait for an answer, or while the dispatcher is
        unreachable, it cancels the job wherever it is, as Client.cancel does."""
        connection = self._connection
        if connection is None or self.done():
            return super().cancel()
        return self in states.cancel_unstarted(connection, [self])

    def running(self) -> bool:
        """True once a worker was assigned the job (asks the dispatcher while the job is pending)."""
        connection = self._connection
        if connection is not None and self._state == PENDING:
            states.job_states(connection, [self])
        return super().running()

    def __repr__(self) -> str:
        return f"<JobFuture {self.job_id} {self._state.lower()}>"

    # --- for the connection ---------------------------------------------------------------------------

    def _mark_running(self) -> None:
        """The dispatcher assigned the job: running from now on (it cannot be cancelled any more)."""
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING

    def _begin_settle(self) -> bool:
        """Before setting the outcome: True if it may be set; False if the future was cancelled (whose
        waiters are then told, as set_running_or_notify_cancel does) or is already done."""
        with self._condition:
            state = self._state
            if state == PENDING:
                self._state = RUNNING  # from here on cancel() cannot slip in before the outcome
                return True
            if state == RUNNING:
                return True
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
            return False

    def _cancel_locally(self) -> bool:
        """Cancel the future (not the job) if it is pending, and tell wait() and as_completed() at once."""
        if not Future.cancel(self):
            return False
        self._begin_settle()
        return True

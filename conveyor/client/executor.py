"""Executor: a concurrent.futures.Executor on a Conveyor cluster, with the standard library's semantics.

- A job is *started* once the dispatcher has assigned it to a worker (as a future in a process pool's
  call queue counts as running): `Future.running()` is true from then on, `Future.cancel()` and
  `shutdown(cancel_futures=True)` cancel only jobs that are not started, and started ones run to
  completion (see future.py).
- `map(fn, *iterables, timeout=None, chunksize=1)` submits every call at once, as
  concurrent.futures does (one job per call, or per chunk of `chunksize` calls), and yields the
  results in order without keeping a reference to what it yielded. `timeout` counts from the call to
  map. (Client.map is the streamed, windowed one, with automatic chunks.)
- `shutdown(wait=False)` returns at once; the connection closes once the last pending job is done.

CPython's own tests for concurrent.futures run against this class: tests/test_executor_conformance.py.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from conveyor.client import states
from conveyor.client.base import ClientState
from conveyor.client.future import JobFuture
from conveyor.client.sync import Client
from conveyor.protocol.payload import encode_call, encode_chunk, encode_function


class Executor(concurrent.futures.Executor):
    """A concurrent.futures.Executor on a Conveyor cluster: swap it in for ProcessPoolExecutor.

    `Executor()` with no address (and no CONVEYOR_DISPATCHER) runs a local cluster of
    `max_workers` slots in processes mode.
    """

    def __init__(
        self, address: str | Sequence[str] | None = None, max_workers: int | None = None, **client_options: Any
    ):
        if max_workers is not None:
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            client_options.setdefault("local_concurrency", max_workers)
        self._client = Client(address, **client_options)
        self._shutdown = False
        self._shutdown_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> JobFuture:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            return self._client.submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        name, blob = encode_function(fn)  # once, not per call
        client = self._client
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            calls = zip(*iterables, strict=False)
            templated = client._templated()
            if templated:  # template limit keys: each call its own job, with its own keys
                futures = [client._submit_call(fn, args, {}) for args in calls]
            elif chunksize == 1:
                futures = [client._submit_frames(name, encode_call(name, blob, args, {})) for args in calls]
            else:
                futures = []
                while chunk := list(itertools.islice(calls, chunksize)):
                    futures.append(client._submit_frames(name, encode_chunk(name, blob, [(a, {}) for a in chunk])))
        return self._results(futures, chunksize > 1 and not templated, end_time)

    def _results(self, futures: list[JobFuture], chunked: bool, end_time: float | None) -> Iterator[Any]:
        """Yield the results in order, popping each future first, so that nothing here keeps what was
        yielded alive; on an error, a timeout or an early close, cancel what has not started."""
        futures.reverse()
        failed = True
        try:
            while futures:
                timeout = None if end_time is None else end_time - time.monotonic()
                if not chunked:
                    yield _result(futures, timeout)
                    continue
                values = _result(futures, timeout)
                values.reverse()
                while values:
                    yield values.pop()
            failed = False
        finally:
            if failed and futures and self._client.state is ClientState.OPEN:
                states.cancel_unstarted(self._client._open_conn(), futures)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            first = not self._shutdown
            self._shutdown = True
        if not first:
            return
        client = self._client
        pending = client.pending() if client.state is ClientState.OPEN else []
        if cancel_futures and pending:
            states.cancel_unstarted(client._open_conn(), pending)
        if wait:
            concurrent.futures.wait(pending)
            client.close()
        else:
            _close_when_done(client, pending)


def _result(futures: list[JobFuture], timeout: float | None) -> Any:
    """The last future's result, popped off the list (cancelled, and raising, if it does not come in time)."""
    future = futures.pop()
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        futures.append(future)  # cancelled with the others
        raise


def _close_when_done(client: Client, pending: list[JobFuture]) -> None:
    """Close the client once every pending future is done (shutdown(wait=False))."""
    left = [f for f in pending if not f.done()]
    if not left:
        client.close()
        return
    count = [len(left)]
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        with lock:
            count[0] -= 1
            last = count[0] == 0
        if last:
            client.close()  # on the client's I/O thread: it only asks the thread to stop

    for f in left:
        f.add_done_callback(one_done)

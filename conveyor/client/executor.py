"""Executor: a concurrent.futures.Executor on a Conveyor cluster."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from conveyor.client.future import JobFuture
from conveyor.client.sync import Client


class Executor(concurrent.futures.Executor):
    """A concurrent.futures.Executor on a Conveyor cluster: swap it in for ProcessPoolExecutor.

    `Executor()` with no address (and no CONVEYOR_DISPATCHER) runs a local cluster of
    `max_workers` slots in processes mode.
    """

    def __init__(self, address: str | None = None, max_workers: int | None = None, **client_options: Any):
        if max_workers is not None:
            client_options.setdefault("local_concurrency", max_workers)
        self._client = Client(address, **client_options)
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> JobFuture:
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
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._client.map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        pending = self._client.pending()
        if cancel_futures and pending:
            self._client.cancel(*[f for f in pending if not f.done()])
        if wait:
            concurrent.futures.wait(pending)
        self._client.close()

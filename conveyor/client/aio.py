"""AsyncClient: the Client's API for asyncio programs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

from conveyor.client.future import JobFuture
from conveyor.client.sync import Client


class AsyncClient:
    """The Client's API for asyncio programs: `await c.submit(fn, x)` gives the result.

        async with AsyncClient("tcp://127.0.0.1:5555") as c:
            value = await c.submit(fn, x)
            async for r in c.map(fn, items): ...
    """

    def __init__(self, address: str | None = None, **client_options: Any):
        self._address = address
        self._client_options = client_options
        self._client: Client | None = None

    async def __aenter__(self) -> AsyncClient:
        self._client = await asyncio.to_thread(Client, self._address, **self._client_options)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("use `async with AsyncClient(...)` first")
        return self._client

    def options(self, **options: Any) -> AsyncClient:
        view = AsyncClient(self._address, **self._client_options)
        view._client = self.client.options(**options)
        return view

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return asyncio.wrap_future(self.client.submit(fn, *args, **kwargs))

    async def map(
        self, fn: Callable[..., Any] | str, *iterables: Iterable[Any], chunksize: int = 1
    ) -> AsyncIterator[Any]:
        iterator = self.client.map(fn, *iterables, chunksize=chunksize)
        sentinel = object()
        try:
            while True:
                value = await asyncio.to_thread(next, iterator, sentinel)
                if value is sentinel:
                    return
                yield value
        finally:
            await asyncio.to_thread(iterator.close)  # type: ignore[attr-defined]

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        return await asyncio.to_thread(self.client.result, job_id, timeout)

    async def cancel(self, *jobs: JobFuture | str) -> list[str]:
        return await asyncio.to_thread(self.client.cancel, *jobs)

    async def status(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.status)

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

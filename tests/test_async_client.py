"""AsyncClient: the same public methods as Client, native (awaiting the connection's futures), and
cancellation that raises CancelledError and cancels the jobs in flight."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import AsyncClient, Client
from conveyor.client import AsyncJobFuture, ClientState
from tests import client_tasks, tasks
from tests.conftest import Cluster

SLOTS = 4
# The methods that talk to the dispatcher: coroutines in AsyncClient.
COROUTINES = {"result", "wait_record", "job_info", "cancel", "jobs", "logs", "status", "wait_for_workers",
              "pending", "close"}


def _public(cls: type) -> dict[str, Any]:
    return {name: value for name, value in inspect.getmembers(cls) if not name.startswith("_")}


def _parameters(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_async_client_has_every_public_method_of_client_with_the_same_parameters() -> None:
    sync, aio = _public(Client), _public(AsyncClient)
    assert sorted(sync) == sorted(aio), "Client and AsyncClient drifted apart"
    for name, member in sync.items():
        if callable(member):
            assert _parameters(member) == _parameters(aio[name]), f"{name}() differs"
        else:  # a property
            assert isinstance(aio[name], type(member)), name
    for name in COROUTINES:
        assert inspect.iscoroutinefunction(aio[name]), f"AsyncClient.{name} is not a coroutine function"
    assert not any(inspect.iscoroutinefunction(m) for m in sync.values()), "a blocking method became async"


@pytest.fixture(scope="module")
def threads_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("async-cluster")))
    c.start_dispatcher()
    try:
        c.wait_for_workers(c.start_worker("threads", SLOTS))
        yield c
    finally:
        c.stop()


@pytest.fixture
async def client(threads_cluster: Cluster) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(threads_cluster.address) as c:
        yield c


async def _states(c: AsyncClient, ids: list[str]) -> list[str | None]:
    return [None if view is None else view["state"] for view in await c.job_info(*ids)]


async def _until(predicate: Any, what: str, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_cancelling_a_task_mid_map_raises_cancelled_error_and_cancels_the_jobs(client: AsyncClient) -> None:
    first = asyncio.Event()
    got: list[int] = []

    async def consume() -> None:
        async for value in client.map(client_tasks.sleep_then, [0.3] * 40, range(40)):
            got.append(value)
            first.set()

    threads_before = threading.active_count()
    succeeded_before = (await client.status())["totals"]["succeeded"]
    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 20)
    assert await client.pending(), "the map should still have jobs in flight"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got == list(range(len(got)))
    assert not await client.pending()
    assert threading.active_count() <= threads_before  # no thread per result, none left behind

    async def quiet() -> bool:
        status = await client.status()
        return bool(status["queued"] == 0 and status["running"] == 0)

    await _until(quiet, "the dispatcher to hold none of the map's jobs")
    # Only what had started could still finish: the rest of the 40 was cancelled, or never sent.
    succeeded = (await client.status())["totals"]["succeeded"] - succeeded_before
    assert succeeded <= len(got) + SLOTS, (succeeded, len(got))


async def test_cancelling_an_awaited_submit_cancels_its_running_job(client: AsyncClient) -> None:
    fut = client.submit(client_tasks.sleep_then, 30, "never")
    assert isinstance(fut, AsyncJobFuture)

    async def running() -> bool:
        return (await _states(client, [fut.job_id]))[0] == "running"

    await _until(running, "the job to start")
    fut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fut

    async def cancelled() -> bool:
        return (await _states(client, [fut.job_id]))[0] in (None, "cancelled")

    await _until(cancelled, "the job to be cancelled on the dispatcher")


async def test_every_method_as_an_awaitable(client: AsyncClient, threads_cluster: Cluster) -> None:
    assert await client.submit(tasks.add, 2, 3) == 5
    f = client.submit(tasks.noop, "x")
    assert await f == "x" and f.info["state"] == "succeeded" and f.job_id
    assert [r async for r in client.starmap(tasks.add, [(i, i) for i in range(300)])] == [2 * i for i in range(300)]
    assert [r async for r in client.map(tasks.noop, range(2000), window=3)] == list(range(2000))
    assert [r async for r in client.map(tasks.noop, range(100), chunksize=7)] == list(range(100))
    with pytest.raises(TimeoutError):
        async for _ in client.map(client_tasks.sleep_then, [2.0] * 2, range(2), timeout=0.2):
            pass
    with pytest.raises(ValueError):
        await client.options(retries=0).submit(tasks.fail, "async")
    kept = client.options(keep=True).submit(tasks.noop, 11)
    await kept
    assert await client.result(kept.job_id, timeout=10) == 11
    record, _ = await client.wait_record(kept.job_id, timeout=10)
    assert record["state"] == "succeeded"
    (view,) = await client.job_info(kept.job_id)
    assert view is not None and view["state"] == "succeeded"
    summaries, _ = await client.jobs(states=["succeeded"], limit=5)
    assert 1 <= len(summaries) <= 5 and all(s["state"] == "succeeded" for s in summaries)
    assert (await client.logs(kept.job_id))["state"] == "succeeded"
    assert len((await client.status())["workers"]) == 1
    await client.wait_for_workers(1, timeout=10)
    slow = client.submit(client_tasks.sleep_then, 30, 0)
    assert slow.job in await client.pending()
    assert await client.cancel(slow) == [slow.job_id]
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert client.duplicate_results == 0


async def test_the_lifecycle_is_checked_at_the_api(threads_cluster: Cluster) -> None:
    c = AsyncClient(threads_cluster.address)
    assert c.state is ClientState.UNOPENED
    with pytest.raises(RuntimeError, match="not open"):
        c.submit(tasks.noop, 1)
    with pytest.raises(RuntimeError, match="not open"):
        await c.status()
    async with c:
        assert c.state is ClientState.OPEN
        view = c.options(retries=1)
        await view.close()  # a view does not close the client
        assert await view.submit(tasks.noop, 1) == 1
    assert c.state is ClientState.CLOSED
    with pytest.raises(RuntimeError, match="closed"):
        await c.status()
    with pytest.raises(RuntimeError, match="closed"):
        [r async for r in c.map(tasks.noop, range(3))]
    await c.close()  # twice is fine

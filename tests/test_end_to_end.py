"""Tier 3: a real dispatcher and real worker processes on 127.0.0.1, driven through the Python API."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time

import psutil
import pytest

from conveyor import (
    AsyncClient,
    Client,
    DispatcherUnavailable,
    Executor,
    FunctionNotFound,
    JobCancelled,
    RemoteError,
    TaskTimeout,
    WorkerCrashed,
)
from conveyor.errors import RemoteTraceback
from tests import tasks
from tests.conftest import Cluster, stop_process, wait_until


def test_threads_mode_runs_in_a_thread_of_the_worker(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 2)
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        info = client.submit(tasks.whoami).result(20)
    assert info["pid"] == cluster.worker_pid(name)
    assert not info["main_thread"]
    assert info["thread"].startswith("conveyor-task")


def test_processes_mode_runs_in_a_child_of_the_worker(cluster: Cluster) -> None:
    name = cluster.start_worker("processes", 2)
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        infos = [f.result(30) for f in [client.submit(tasks.whoami) for _ in range(4)]]
    worker = psutil.Process(cluster.worker_pid(name))
    descendants = {p.pid for p in worker.children(recursive=True)}
    for info in infos:
        assert info["pid"] != worker.pid
        assert info["pid"] in descendants


def test_asyncio_mode_runs_inside_an_event_loop(cluster: Cluster) -> None:
    name = cluster.start_worker("asyncio", 100)
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        info = client.submit(tasks.async_whoami).result(20)
        plain = client.submit(tasks.add, 2, 3).result(20)  # a plain function goes to a thread, not the loop
    assert info["in_loop"] and info["pid"] == cluster.worker_pid(name)
    assert info["thread"] == "conveyor-asyncio"
    assert plain == 5


def test_asyncio_mode_waits_concurrently(cluster: Cluster) -> None:
    name = cluster.start_worker("asyncio", 1000)
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        started = time.monotonic()
        results = list(client.map(tasks.async_sleep, [0.5] * 500))
        elapsed = time.monotonic() - started
    assert results == [0.5] * 500
    assert elapsed < 0.5 * 500 / 10  # far from serial: the waits overlap on one loop


def test_submit_map_and_functions_by_value(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 2))
    with cluster.client() as client:
        assert client.submit(tasks.add, 1, b=2).result(20) == 3
        assert client.submit(lambda x: x * 2, 21).result(20) == 42  # a lambda travels by value
        offset = 10
        assert client.submit(lambda x: x + offset, 1).result(20) == 11  # a closure too
        assert list(client.map(tasks.add, range(100), range(100))) == [2 * i for i in range(100)]
        assert list(client.map(tasks.noop, range(1000), chunksize=64)) == list(range(1000))
        assert client.submit("tests.tasks:add", 4, 5).result(20) == 9  # by name, as the CLI does
        big = b"x" * 3_000_000
        assert client.submit(len, big).result(20) == len(big)
        assert client.submit(tasks.noop, (1, {"a": {2, 3}})).result(20) == (1, {"a": {2, 3}})


def test_task_exceptions_are_reraised_with_type_and_traceback(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("processes", 1))
    with cluster.client() as client:
        with pytest.raises(ValueError, match="bad input") as info:
            client.submit(tasks.fail, "bad input").result(30)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "tests/tasks.py" in info.value.__cause__.tb and "raise ValueError" in info.value.__cause__.tb
        with pytest.raises(tasks.CustomError):
            client.submit(tasks.fail_custom).result(30)

        with pytest.raises(RemoteError, match="Unpicklable") as remote:
            client.submit(tasks.fail_unpicklable).result(30)  # the type cannot travel back
        assert remote.value.type_name == "tests.tasks.Unpicklable"
        assert "fail_unpicklable" in remote.value.remote_traceback
        with pytest.raises(FunctionNotFound, match="nosuch"):
            client.submit("nosuch.module:fn").result(30)
        with pytest.raises(FunctionNotFound, match="has no attribute"):
            client.submit("tests.tasks:missing").result(30)


def test_dispatcher_not_there_is_a_clear_error_not_a_hang() -> None:
    started = time.monotonic()
    with pytest.raises(DispatcherUnavailable, match="no Conveyor dispatcher"):
        Client("tcp://127.0.0.1:1", connect_timeout=1.0)
    assert time.monotonic() - started < 5
    with pytest.raises(DispatcherUnavailable, match="bad dispatcher address"):
        Client("nonsense://x", connect_timeout=1.0)


def test_routing_by_mode_and_tags(cluster: Cluster) -> None:
    t = cluster.start_worker("threads", 2, tags=["gpu", "big"], name="gpu-threads")
    p = cluster.start_worker("processes", 1, name="plain-processes")
    cluster.wait_for_workers(t, p)
    with cluster.client() as client:
        gpu = [client.options(tags=["gpu"]).submit(tasks.whoami) for _ in range(6)]
        procs = [client.options(mode="processes").submit(tasks.whoami) for _ in range(6)]
        for f in gpu:
            f.result(30)
            assert f.info["worker"] == "gpu-threads"
        for f in procs:
            f.result(30)
            assert f.info["worker"] == "plain-processes"
        nowhere = client.options(tags=["tpu"]).submit(tasks.noop, 1)
        with pytest.raises(concurrent.futures.TimeoutError):
            nowhere.result(1.0)  # no worker has the tag: it waits in the queue
        assert client.status()["queued"] == 1
        name = cluster.start_worker("threads", 1, tags=["tpu"], name="tpu")
        assert nowhere.result(30) == 1 and nowhere.info["worker"] == name


def test_credit_keeps_a_slow_worker_from_hoarding(cluster: Cluster) -> None:
    slow = cluster.start_worker("threads", 1, name="slow")
    fast = cluster.start_worker("threads", 1, name="fast")
    cluster.wait_for_workers(slow, fast)
    with cluster.client() as client:
        blocker = client.submit(tasks.sleep, 3.0)
        wait_until(lambda: client.status()["running"] == 1, what="the long task to start")
        quick = [client.submit(tasks.sleep, 0.01) for _ in range(40)]
        for f in quick:
            f.result(30)
        ran_on = {f.info["worker"] for f in quick}
        assert blocker.result(30) == 3.0
    # every quick task ran on whichever worker was not busy with the long one
    assert len(ran_on) == 1 and blocker.info["worker"] not in ran_on


def test_cancel_a_queued_job(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 1))
    with cluster.client() as client:
        busy = client.submit(tasks.sleep, 1.0)
        queued = client.submit(tasks.noop, "never")
        assert client.cancel(queued) == [queued.job_id]
        assert queued.cancelled()
        assert busy.result(20) == 1.0
        info = client.job_info(queued.job_id)[0]
        assert info is None or info["state"] == "cancelled"
        assert client.status()["totals"]["succeeded"] == 1  # the cancelled job never ran


@pytest.mark.parametrize("mode", ["asyncio", "processes", "threads"])
def test_cancel_a_running_job(cluster: Cluster, mode: str) -> None:
    name = cluster.start_worker(mode, 1)
    cluster.wait_for_workers(name)
    fn = tasks.async_sleep if mode == "asyncio" else tasks.spin
    with cluster.client() as client:
        before = {p.pid for p in psutil.Process(cluster.worker_pid(name)).children(recursive=True)}
        fut = client.options(keep=True).submit(fn, 60)  # keep: its outcome can be read by id afterwards
        wait_until(lambda: client.status()["running"] == 1, what="the task to start")
        assert client.cancel(fut.job_id) == [fut.job_id]  # by id, as another client or the CLI would
        with pytest.raises(JobCancelled):
            fut.result(10)
        with pytest.raises(JobCancelled):
            client.result(fut.job_id, timeout=10)
        # the worker frees the slot and keeps serving
        assert client.submit(tasks.noop, "after").result(20) == "after"
        wait_until(lambda: client.status()["workers"][0]["running"] == 0, what="the slot to be free")
        if mode == "processes":  # the child running it was terminated and replaced
            after = {p.pid for p in psutil.Process(cluster.worker_pid(name)).children(recursive=True)}
            assert before - after, "the cancelled task's child process should be gone"


@pytest.mark.parametrize("mode", ["asyncio", "processes", "threads"])
def test_timeouts(cluster: Cluster, mode: str) -> None:
    cluster.wait_for_workers(cluster.start_worker(mode, 2))
    fn = tasks.async_sleep if mode == "asyncio" else tasks.spin
    with cluster.client() as client:
        started = time.monotonic()
        with pytest.raises(TaskTimeout):
            client.options(timeout=0.5).submit(fn, 30).result(20)
        assert time.monotonic() - started < 10
        assert client.submit(tasks.noop, 7).result(20) == 7


def test_a_crashing_child_fails_only_its_task(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("processes", 2))
    with cluster.client() as client:
        neighbour = client.submit(tasks.sleep, 1.0)
        crash = client.submit(tasks.crash)
        with pytest.raises(WorkerCrashed, match="exit code 13"):
            crash.result(60)
        assert crash.info["attempts"] == 4  # retried as an infrastructure failure, then failed
        assert neighbour.result(30) == 1.0
        assert client.submit(tasks.noop, 1).result(30) == 1


def test_killed_worker_tasks_run_elsewhere(cluster: Cluster) -> None:
    doomed = cluster.start_worker("processes", 2, name="doomed")
    cluster.wait_for_workers(doomed)
    with cluster.client() as client:
        futs = [client.submit(tasks.sleep, 0.5) for _ in range(4)]
        wait_until(lambda: client.status()["running"] >= 2, what="tasks to start on the doomed worker")
        cluster.workers["doomed"].send_signal(signal.SIGKILL)
        cluster.workers["doomed"].wait()
        survivor = cluster.start_worker("threads", 4, name="survivor")
        assert [f.result(60) for f in futs] == [0.5] * 4
        assert any(f.info["worker"] == survivor and f.info["attempts"] >= 2 for f in futs)
        assert all(w["name"] != "doomed" for w in client.status()["workers"])


def test_worker_sigterm_drains_and_exits_zero(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 2)
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        started = cluster.tmp / "started"
        fut = client.submit(tasks.sleep_marked, str(started), 1.0)
        wait_until(started.exists, what="the task to start")  # assigned is not enough: unstarted jobs go back
        assert stop_process(cluster.workers[name]) == 0
        assert fut.result(10) == 1.0  # finished during the drain, not lost
        wait_until(lambda: not client.status()["workers"], what="the worker to deregister")


def test_dispatcher_sigterm_exits_zero(cluster: Cluster) -> None:
    assert cluster.dispatcher is not None
    assert stop_process(cluster.dispatcher) == 0


def test_executor_is_a_drop_in_for_process_pool(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("processes", 2))
    with Executor(cluster.address) as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        futs = [ex.submit(tasks.add, i, i) for i in range(20)]
        _done, not_done = concurrent.futures.wait(futs, timeout=30)
        assert not not_done
        assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=30)) == [
            2 * i for i in range(20)
        ]
        assert list(ex.map(tasks.add, range(50), range(50), chunksize=8, timeout=30)) == [2 * i for i in range(50)]
        slow = [ex.submit(tasks.sleep, 5) for _ in range(6)]
        ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in slow)
    assert any(f.cancelled() for f in slow)
    with pytest.raises(RuntimeError):
        ex.submit(tasks.noop, 1)


async def test_async_client(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("asyncio", 100))
    async with AsyncClient(cluster.address) as c:
        assert await c.submit(tasks.async_sleep, 0.01) == 0.01
        results = await asyncio.gather(*(c.submit(tasks.add, i, 1) for i in range(50)))
        assert results == [i + 1 for i in range(50)]
        assert [r async for r in c.map(tasks.noop, range(20))] == list(range(20))
        with pytest.raises(ValueError):
            await c.options(retries=0).submit(tasks.fail, "async")
        status = await c.status()
        assert status["workers"][0]["mode"] == "asyncio"


def test_client_without_address_starts_a_local_cluster() -> None:
    with Client(local_mode="threads", local_concurrency=2) as client:
        assert client.submit(tasks.add, 20, 22).result(30) == 42
        workers = client.status()["workers"]
        assert len(workers) == 1 and workers[0]["mode"] == "threads"
    # the no_leaked_processes fixture checks the local cluster is gone


def test_retries_with_a_flaky_task(cluster: Cluster, tmp_path: object) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 1))
    marker = f"{tmp_path}/flaky"
    with cluster.client() as client:
        fut = client.options(retries=3, retry_backoff=0.05, retry_on=[OSError]).submit(tasks.flaky, marker, 2)
        assert fut.result(30) == 3
        assert fut.info["attempts"] == 3
        with pytest.raises(OSError):  # retry_on does not cover it: no retry
            client.options(retries=3, retry_on=["KeyError"]).submit(tasks.flaky, marker + "2", 1).result(30)


def test_auto_prefetch_hands_back_jobs_stuck_behind_a_slow_task(cluster: Cluster) -> None:
    """Tiny tasks open a worker's prefetch window; a slow one then stalls its only slot, and the jobs
    queued behind it go back to the dispatcher and run on another worker instead of waiting."""
    first = cluster.start_worker("threads", 1, name="first")
    cluster.wait_for_workers(first)
    with cluster.client() as client:
        warm = [client.submit(tasks.noop, i) for i in range(300)]
        assert [f.result(30) for f in warm] == list(range(300))  # durations known: its window opens
        slow = client.submit(tasks.sleep, 5.0)
        behind = [client.submit(tasks.noop, i) for i in range(50)]
        wait_until(lambda: client.status()["running"] == 51, what="the first worker to hold all 51")
        second = cluster.start_worker("threads", 1, name="second")
        cluster.wait_for_workers(second)
        assert [f.result(4.0) for f in behind] == list(range(50))  # well before the slow task ends
        assert {f.info["worker"] for f in behind} == {"second"}
        assert slow.result(20) == 5.0 and slow.info["worker"] == "first"


def test_a_prefetched_task_with_a_timeout_is_timed_from_when_a_thread_takes_it(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 1, None, None, "--prefetch", "5")
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        slow = client.submit(tasks.sleep, 1.0)
        quick = client.options(timeout=0.5).submit(tasks.noop, "on time")  # held behind the slow one
        assert quick.result(20) == "on time" and slow.result(20) == 1.0


def test_prefetch_holds_jobs_beyond_the_slots_and_still_cancels_and_drains(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 1, None, None, "--prefetch", "3")
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        first = client.submit(tasks.sleep, 1.0)
        held = [client.options(keep=True).submit(tasks.noop, i) for i in range(3)]
        status = wait_until(lambda: (s := client.status())["running"] == 4 and s, what="4 jobs on the worker")
        assert status["workers"][0]["prefetch"] == 3 and status["queued"] == 0
        assert client.cancel(held[0].job_id) == [held[0].job_id]  # prefetched, not started: never runs
        with pytest.raises(JobCancelled):
            held[0].result(10)
        assert first.result(20) == 1.0
        assert [f.result(20) for f in held[1:]] == [1, 2]
        started = cluster.tmp / "slow-started"
        slow = [client.submit(tasks.sleep_marked, str(started), 2.0) for _ in range(4)]  # one runs, three wait
        wait_until(lambda: client.status()["running"] == 4 and started.exists(), what="the worker to hold all four")
        assert stop_process(cluster.workers[name]) == 0  # drain: the running one finishes, the rest go back
        cluster.start_worker("threads", 4, name="after")
        assert [f.result(30) for f in slow] == [2.0] * 4
        assert sum(f.info["worker"] == "after" for f in slow) == 3

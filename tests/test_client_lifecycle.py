"""A client's lifecycle (a closed or broken client fails at the API, clearly), and what "started" means
for a job's future: assigned to a worker. cancel(), running() and Executor.shutdown(cancel_futures=True)
agree on it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from conveyor import Client, ConveyorError, DispatcherUnavailable, Executor
from conveyor.client import ClientState
from tests import client_tasks, tasks
from tests.conftest import Cluster, stop_process, wait_until


def test_a_closed_client_says_so_at_the_api(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 1))
    client = Client(cluster.address)
    assert client.state is ClientState.OPEN
    view = client.options(retries=1)
    view.close()  # a view does not close the client it came from
    assert client.submit(tasks.noop, 1).result(10) == 1
    client.close()
    assert client.state is ClientState.CLOSED and view.state is ClientState.CLOSED
    for call in (lambda: client.submit(tasks.noop, 1), lambda: client.status(), lambda: client.pending(),
                 lambda: client.map(tasks.noop, range(3)), lambda: view.job_info("x"), lambda: client.options()):
        with pytest.raises(RuntimeError, match="is closed") as excinfo:
            call()
        assert excinfo.traceback[-1].path.name == "base.py", "raised deep inside, not at the API"
    client.close()  # twice is fine


def test_a_client_that_lost_its_dispatcher_is_broken(cluster: Cluster) -> None:
    client = Client(cluster.address, reconnect_timeout=0.5)
    fut = client.submit(client_tasks.sleep_then, 30, 0)  # no worker: it waits
    assert cluster.dispatcher is not None
    stop_process(cluster.dispatcher)
    wait_until(lambda: client.state is ClientState.BROKEN, timeout=20, what="the client to give up")
    assert isinstance(fut.exception(10), DispatcherUnavailable)
    with pytest.raises(DispatcherUnavailable):
        client.submit(tasks.noop, 1)
    client.close()
    assert client.state is ClientState.CLOSED


def test_started_means_assigned_for_cancel_and_running(cluster: Cluster, tmp_path: Path) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 1, None, None, "--prefetch", "0"))
    client = cluster.client()
    marker = tmp_path / "started"
    blocker = client.submit(tasks.sleep_marked, str(marker), 1.0)
    wait_until(marker.exists, what="the first task to start")
    queued = client.submit(tasks.noop, "never")
    assert blocker.running()  # its worker runs it
    assert not queued.running()  # the only slot is busy: it waits in the dispatcher's queue
    assert not blocker.cancel()  # started: it runs to completion
    assert queued.cancel() and queued.cancelled() and queued.done()
    assert not queued.running()
    assert blocker.result(20) == 1.0
    wait_until(lambda: not client.pending(), what="the cancelled job to be settled")
    assert client.status()["totals"]["cancelled"] == 1


def test_executor_shutdown_cancels_only_what_has_not_started(cluster: Cluster, tmp_path: Path) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 2, None, None, "--prefetch", "0"))
    marker = tmp_path / "started"
    ex = Executor(cluster.address)
    running = [ex.submit(tasks.sleep_marked, f"{marker}-{i}", 0.5) for i in range(2)]
    wait_until(lambda: all(Path(f"{marker}-{i}").exists() for i in range(2)), what="both slots to be busy")
    waiting = [ex.submit(tasks.noop, i) for i in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert [f.result(0) for f in running] == [0.5, 0.5]
    assert all(f.cancelled() for f in waiting)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.noop, 1)


def test_executor_map_submits_at_once_as_concurrent_futures_does(cluster: Cluster, tmp_path: Path) -> None:
    """map() starts every call before the first result is asked for, and shutdown(wait=True) waits for them."""
    cluster.wait_for_workers(cluster.start_worker("threads", 2))
    ex = Executor(cluster.address)
    results = ex.map(tasks.sleep_marked, [str(tmp_path / f"m{i}") for i in range(6)], [0.01] * 6)
    ex.shutdown(wait=True)
    assert all((tmp_path / f"m{i}").exists() for i in range(6))
    assert list(results) == [0.01] * 6


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="this Python can run interpreters mode: nothing is refused")
def test_a_local_worker_that_cannot_start_fails_the_client_at_once_with_its_reason() -> None:
    """Client() with a mode this Python refuses: the worker's one-line reason, in seconds, and no leftovers."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    with pytest.raises(ConveyorError, match=r"local worker exited \(code 2\).*interpreters mode needs Python >= 3\.12"):
        Client(local_mode="interpreters")
    assert time.monotonic() - started < 15  # not the 30 s wait for a worker that will never register
    wait_until(lambda: {p.pid for p in psutil.Process().children(recursive=True)} <= before, 10,
               what="the local dispatcher to be stopped")

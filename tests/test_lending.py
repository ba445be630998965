"""Ray's rule in every mode that can keep it: a task blocked on its own child lends its slot while it waits,
so a one-slot worker runs a task, the child it waits for and that child's children (docs/workflows.md).
Real dispatcher, real workers, real child processes; the pool's size is checked with psutil."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

import conveyor
from conveyor import TaskTimeout
from tests import graph_tasks as g
from tests import lending_tasks as t
from tests.conftest import Cluster, wait_until


def _worker(client: conveyor.Client) -> dict[str, Any]:
    return client.status()["workers"][0]  # type: ignore[no-any-return]


def _pool(cluster: Cluster, name: str) -> list[psutil.Process]:
    """A processes-mode worker's task children: the children of its fork server."""
    worker = psutil.Process(cluster.worker_pid(name))
    servers = [p for p in worker.children() if "forkserver" in " ".join(p.cmdline())]
    assert len(servers) == 1, servers
    return [p for p in servers[0].children() if p.status() != psutil.STATUS_ZOMBIE]


def _pool_is(cluster: Cluster, name: str, n: int) -> None:
    wait_until(lambda: len(_pool(cluster, name)) == n, 10, what=f"the pool of {name} to have {n} children")


def _slot_back(client: conveyor.Client) -> dict[str, Any]:
    return wait_until(lambda: (w := _worker(client))["running"] == 0 and w["lent"] == 0 and w, 10,  # type: ignore[no-any-return]
                      what="the slot back")


@pytest.mark.parametrize("prefetch", ["0", "auto"])
def test_a_one_slot_processes_worker_lends_its_slot_and_the_pool_shrinks_back(cluster: Cluster, prefetch: str) -> None:
    cluster.wait_for_workers(cluster.start_worker("processes", 1, None, "one", "--prefetch", prefetch))
    client = cluster.clients[0]
    _pool_is(cluster, "one", 1)
    assert client.submit(g.with_grandchild, 1).result(30) == 1102  # two levels of waiting, one slot
    fan = client.submit(g.with_children, [1, 2, 3], 0.5)  # a fan-out waited on child by child
    lent = wait_until(lambda: _worker(client)["lent"] == 1 and _worker(client), 10, what="the slot to be lent")
    assert lent["concurrency"] == 1
    if prefetch == "0":  # (auto prefetch may hold a second child too, waiting for a slot)
        assert lent["running"] == 2  # the waiting task and its child, on one slot
    _pool_is(cluster, "one", 2)  # one child process more while the slot is lent
    assert fan.result(30) == [1, 2, 3]
    assert _slot_back(client)["done"] >= 7
    _pool_is(cluster, "one", 1)  # the surplus child is gone: nothing leaks
    assert client.submit(t.returns_child, 41).result(30) == 42  # a returned future: its result, the slot lent
    _slot_back(client)
    _pool_is(cluster, "one", 1)
    assert client.submit(g.inc, 1).result(10) == 2  # and the worker takes work as before


def test_without_lending_a_one_slot_worker_cannot_run_the_child_its_task_waits_on(cluster: Cluster) -> None:
    """The deadlock lending prevents: a wait in a thread the task starts lends nothing (docs/workflows.md)."""
    cluster.wait_for_workers(cluster.start_worker("processes", 1, None, "one", "--prefetch", "0"))
    client = cluster.clients[0]
    assert client.submit(t.wait_in_a_thread, 1, 1.5).result(30) == "the child never started"
    assert _slot_back(client)["done"] == 2  # the child ran once its parent gave up and ended
    _pool_is(cluster, "one", 1)


def test_a_child_process_killed_or_a_task_timed_out_while_lending_leaves_the_pool_at_its_size(
    cluster: Cluster, tmp_path: Path,
) -> None:
    cluster.wait_for_workers(cluster.start_worker("processes", 1, None, "one", "--prefetch", "0"))
    client = cluster.clients[0]
    pid_file = tmp_path / "pid"
    killed = client.submit(t.lend_and_record, str(pid_file), 1.0)
    wait_until(lambda: pid_file.exists() and _worker(client)["lent"] == 1, 10, what="the slot to be lent")
    first = int(pid_file.read_text())
    os.kill(first, signal.SIGKILL)
    assert killed.result(20) == "child"  # a crash is retried at once (infra_retries): it lends again, and ends
    assert int(pid_file.read_text()) != first
    _slot_back(client)  # its children ran on the lent slot and ended
    _pool_is(cluster, "one", 1)

    pid_file.unlink()
    timed_out = client.options(timeout=1.0).submit(t.lend_and_record, str(pid_file), 2.0)
    with pytest.raises(TaskTimeout):
        timed_out.result(20)
    _slot_back(client)
    _pool_is(cluster, "one", 1)
    assert client.submit(g.with_child, 5).result(20) == 106  # lending works as before
    _pool_is(cluster, "one", 1)


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_wait_and_as_completed_inside_a_task_lend_the_slot(cluster: Cluster, mode: str) -> None:
    cluster.wait_for_workers(cluster.start_worker(mode, 1, None, "one", "--prefetch", "0"))
    client = cluster.clients[0]
    assert client.submit(t.wait_for_all, [1, 2, 3], 0.05).result(30) == [1, 2, 3]
    assert client.submit(t.as_they_complete, [4, 5, 6], 0.05).result(30) == [4, 5, 6]
    _slot_back(client)
    if mode == "processes":
        _pool_is(cluster, "one", 1)


def test_an_asyncio_task_awaits_its_children_on_a_one_slot_worker(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("asyncio", 1, None, "one", "--prefetch", "0"))
    client = cluster.clients[0]
    assert client.submit(t.await_child, 1).result(30) == 1103  # awaits a child that awaits its own
    assert client.submit(g.with_grandchild, 1).result(30) == 1102  # plain functions (in a thread) lend too
    message = client.submit(t.blocks_the_loop, 1).result(30)
    assert "await" in message, message  # a blocking wait on the task loop: a clear error, not a hang
    _slot_back(client)


def test_an_interpreters_mode_task_gets_a_clear_error_not_a_client(cluster: Cluster) -> None:
    """A subinterpreter cannot load a client (pyzmq and msgspec refuse them): one clear error, no hang."""
    from conveyor.worker.modes.interpreters import missing_reason

    if missing_reason() is not None and os.environ.get("CONVEYOR_REQUIRE_INTERPRETERS") != "1":
        pytest.skip(missing_reason() or "")
    cluster.wait_for_workers(cluster.start_worker("interpreters", 1, None, "one"))
    message = cluster.clients[0].submit(t.client_or_why).result(60)
    assert message.startswith("conveyor.current_client() is not available in interpreters mode"), message


def test_a_worker_with_keys_gives_its_tasks_a_client_only_with_a_client_pair(tmp_path: Path) -> None:
    """CurveZMQ: the tasks' client is the client whose key pair is in the worker's key directory."""
    from tests.test_cli import assert_ok, run_cli

    keys = tmp_path / "keys"
    assert_ok(run_cli("keys", "init", str(keys)))  # dispatcher, worker and client pairs in one directory
    assert_ok(run_cli("keys", "add-worker", str(keys), "bare"))  # hosts/bare: a worker pair only
    c = Cluster(tmp_path)
    c.start_dispatcher("--keys", str(keys))
    try:
        client = c.client(keys=keys)
        c.start_worker("processes", 1, None, "both", "--keys", str(keys), "--prefetch", "0")
        c.wait_for_workers("both")
        assert client.submit(g.with_grandchild, 1).result(30) == 1102  # and it lends its slot, over CURVE
        c.start_worker("threads", 1, ["bare"], "bare", "--keys", str(keys / "hosts" / "bare"))
        c.wait_for_workers("bare")
        message = client.options(tags=["bare"]).submit(t.client_or_why).result(30)
        assert "holds no client key pair" in message, message
    finally:
        c.stop()

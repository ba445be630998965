"""Tier 2: dispatcher, worker and client in one process, talking over inproc:// sockets of one context."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from conveyor import Client, JobCancelled
from conveyor.dispatcher import Dispatcher
from conveyor.errors import RemoteTraceback
from conveyor.protocol import SIGNATURE, Cmd, decode
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import wait_until

HEARTBEAT = 0.2


def _join(thread: threading.Thread, timeout: float, what: str) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} did not stop within {timeout} s"


class InprocCluster:
    """A Dispatcher and a threads-mode Worker, each on its own thread, plus a Client: all in this process."""

    def __init__(self, concurrency: int = 2):
        self.address = f"inproc://conveyor-{uuid.uuid4().hex}"
        self.concurrency = concurrency
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.dispatcher = Dispatcher(self.address, heartbeat_interval=HEARTBEAT, context=self.ctx)
        self.worker = Worker(
            self.address,
            mode="threads",
            concurrency=concurrency,
            name="inproc-worker",
            heartbeat_interval=HEARTBEAT,
            drain_timeout=5.0,
            context=self.ctx,
        )
        self.errors: list[BaseException] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._dispatcher_thread = threading.Thread(
            target=self._guard, args=(self.dispatcher.run,), name="test-dispatcher"
        )
        self._worker_thread = threading.Thread(
            target=self._guard, args=(lambda: asyncio.run(self._run_worker()),), name="test-worker"
        )
        self.client: Client | None = None
        self._stopped = False

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)

    async def _run_worker(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_ready.set()
        await self.worker.run()

    def start(self) -> Client:
        assert self.dispatcher.bind() == self.address
        self._dispatcher_thread.start()
        self._worker_thread.start()
        assert self._loop_ready.wait(10), "the worker's event loop did not start"
        self.client = Client(self.address, context=self.ctx, connect_timeout=10)
        wait_until(lambda: self.client is not None and self.client.status()["workers"], 10, what="the worker")
        return self.client

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.client is not None:
            self.client.close()
        if self._loop is not None and self._worker_thread.is_alive():
            self._loop.call_soon_threadsafe(self.worker.request_stop)
        if self._worker_thread.ident is not None:
            _join(self._worker_thread, 15, "the worker")
        self.dispatcher.stop()
        if self._dispatcher_thread.ident is not None:
            _join(self._dispatcher_thread, 10, "the dispatcher")
        # every socket on the context is closed by now, so term() returns at once
        terminator = threading.Thread(target=self.ctx.term, name="test-ctx-term")
        terminator.start()
        _join(terminator, 10, "zmq context termination (a socket was left open)")
        assert not self.errors, f"a thread failed: {self.errors!r}"


def _threads_now() -> set[threading.Thread]:
    return set(threading.enumerate())


def _assert_no_threads_left(before: set[threading.Thread]) -> None:
    def leftovers() -> list[str]:
        return sorted(t.name for t in set(threading.enumerate()) - before if t.is_alive())

    try:
        wait_until(lambda: not leftovers(), 10, what="threads to finish")
    except AssertionError:
        raise AssertionError(f"threads left behind: {leftovers()}") from None


@pytest.fixture
def inproc() -> Iterator[InprocCluster]:
    before = _threads_now()
    cluster = InprocCluster(concurrency=2)
    try:
        cluster.start()
        yield cluster
    finally:
        for gate in list(tasks._gates):
            tasks.open_gate(gate)  # nothing may stay blocked on a gate
        cluster.stop()
        tasks._gates.clear()
    _assert_no_threads_left(before)


def _client(c: InprocCluster) -> Client:
    assert c.client is not None
    return c.client


def test_submit_and_result(inproc: InprocCluster) -> None:
    client = _client(inproc)
    assert client.submit(tasks.add, 2, 3).result(10) == 5
    assert client.submit(tasks.add, 1, b=2).result(10) == 3
    assert client.submit("tests.tasks:noop", (1, {2})).result(10) == (1, {2})
    assert client.submit(lambda x: x * 2, 21).result(10) == 42

    fut = client.submit(tasks.whoami)
    info = fut.result(10)
    assert info["pid"] == os.getpid() and info["thread"].startswith("conveyor-task")
    assert fut.info["worker"] == "inproc-worker" and fut.info["attempts"] == 1

    with pytest.raises(ValueError, match="inproc failure") as failure:
        client.submit(tasks.fail, "inproc failure").result(10)
    assert isinstance(failure.value.__cause__, RemoteTraceback)
    assert "raise ValueError" in failure.value.__cause__.tb


def test_map_with_chunksize(inproc: InprocCluster) -> None:
    client = _client(inproc)
    before = client.status()["totals"].get("submitted", 0)
    n, chunksize = 100, 7
    assert list(client.map(tasks.add, range(n), range(n), chunksize=chunksize)) == [2 * i for i in range(n)]
    assert client.status()["totals"]["submitted"] - before == math.ceil(n / chunksize)  # one job per chunk
    assert list(client.map(tasks.noop, range(50))) == list(range(50))
    assert list(client.map(tasks.noop, [], chunksize=4)) == []
    with pytest.raises(ValueError):
        client.map(tasks.noop, range(3), chunksize=0)


def test_status(inproc: InprocCluster) -> None:
    client = _client(inproc)
    assert client.submit(tasks.noop, 1).result(10) == 1
    status = client.status()
    assert status["dispatcher"]["endpoint"] == inproc.address
    assert status["dispatcher"]["pid"] == os.getpid()
    assert status["queued"] == 0 and status["running"] == 0
    assert status["totals"]["succeeded"] >= 1
    [worker] = status["workers"]
    assert worker["name"] == "inproc-worker"
    assert worker["mode"] == "threads" and worker["concurrency"] == 2
    assert worker["pid"] == os.getpid() and worker["running"] == 0 and not worker["draining"]

    gate = f"status-{uuid.uuid4().hex}"
    running = [client.submit(tasks.wait_gate, gate) for _ in range(2)]
    queued = client.submit(tasks.noop, "later")
    # Durations are known, so the worker's prefetch window is open and may take the third job too, until
    # its stalled slots hand it back (after STALL_AFTER): wait for that settled state, not the first glimpse.
    status = wait_until(lambda: (s := client.status())["running"] == 2 and s["queued"] == 1 and s, 10,
                        what="both slots busy and the third job queued")
    assert status["workers"][0]["running"] == 2
    tasks.open_gate(gate)
    assert [f.result(10) for f in running] == [gate, gate]
    assert queued.result(10) == "later"


def test_cancel_queued_and_running_jobs(inproc: InprocCluster) -> None:
    client = _client(inproc)
    gate = f"cancel-{uuid.uuid4().hex}"
    watcher = client.options(keep=True)  # kept after delivery: can be looked up by id afterwards
    blockers = [watcher.submit(tasks.wait_gate, gate) for _ in range(2)]
    wait_until(lambda: client.status()["running"] == 2, 10, what="both slots to be busy")
    queued = client.submit(tasks.noop, "never")
    wait_until(lambda: client.status()["queued"] == 1, 10, what="the job to be queued")

    assert client.cancel(queued) == [queued.job_id]
    assert queued.cancelled()
    info = client.job_info(queued.job_id)[0]
    assert info is None or info["state"] == "cancelled"
    assert client.status()["queued"] == 0

    assert client.cancel(blockers[0].job_id) == [blockers[0].job_id]  # by id: the future learns it from the dispatcher
    with pytest.raises(JobCancelled):
        blockers[0].result(10)
    with pytest.raises(JobCancelled):
        watcher.result(blockers[0].job_id, timeout=10)
    assert client.cancel(blockers[0].job_id) == []  # already finished
    assert client.cancel("no-such-job") == []

    # the worker replaced the cancelled task's slot and keeps serving
    assert client.submit(tasks.add, 40, 2).result(10) == 42
    tasks.open_gate(gate)
    assert blockers[1].result(10) == gate
    wait_until(lambda: client.status()["workers"][0]["running"] == 0, 10, what="the slots to be free")
    assert client.status()["totals"]["cancelled"] == 2


def test_shutdown_leaves_no_threads_behind() -> None:
    before = _threads_now()
    cluster = InprocCluster(concurrency=3)
    try:
        client = cluster.start()
        assert list(client.map(tasks.add, range(30), range(30), chunksize=4)) == [2 * i for i in range(30)]
        started = {t.name for t in set(threading.enumerate()) - before}
        assert {"test-dispatcher", "test-worker", "conveyor-client-io"} <= started
        assert sum(name.startswith("conveyor-task") for name in started) == 3
    finally:
        cluster.stop()
    _assert_no_threads_left(before)


def test_version_mismatch_gets_an_error_and_the_dispatcher_keeps_serving(inproc: InprocCluster) -> None:
    client = _client(inproc)
    raw = inproc.ctx.socket(zmq.DEALER)
    try:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(inproc.address)
        raw.send_multipart([b"CNV9", b"\x20", msgpack.packb({})])
        assert raw.poll(10_000), "no answer to a message of another protocol version"
        msg = decode(raw.recv_multipart())
        assert msg.cmd is Cmd.ERROR
        assert msg.body["code"] == "version"
        assert "CNV9" in msg.body["message"]

        malformed = inproc.dispatcher.malformed
        raw.send_multipart([b"garbage"])  # not even a Conveyor message: dropped and counted, no answer
        raw.send_multipart([SIGNATURE, b"\x21", msgpack.packb("not a batch")])  # a SUBMIT with a bad body
        wait_until(lambda: inproc.dispatcher.malformed == malformed + 2, 10, what="the malformed messages")
        assert not raw.poll(100)
    finally:
        raw.close()
    assert client.submit(tasks.add, 1, 1).result(10) == 2
    assert list(client.map(tasks.noop, range(10), chunksize=3)) == list(range(10))


def test_a_task_abandoned_at_shutdown_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled threads-mode task stuck in a blocking call outlives the worker; when it ends it must not blow up."""
    thread_errors: list[str] = []

    def record(args: threading.ExceptHookArgs) -> None:
        thread_errors.append(f"{args.thread}: {args.exc_type.__name__}: {args.exc_value}")

    monkeypatch.setattr(threading, "excepthook", record)
    before = _threads_now()
    gate = f"abandoned-{uuid.uuid4().hex}"
    cluster = InprocCluster(concurrency=1)
    try:
        client = cluster.start()
        stuck = client.submit(tasks.wait_gate, gate)
        wait_until(lambda: client.status()["running"] == 1, 10, what="the task to start")
        assert client.cancel(stuck) == [stuck.job_id]
        assert client.submit(tasks.noop, "next").result(10) == "next"  # a replacement thread took the slot
    finally:
        cluster.stop()
        tasks.open_gate(gate)  # the abandoned task's blocking call returns only now, after the worker is gone
        tasks._gates.pop(gate, None)
    _assert_no_threads_left(before)
    assert not thread_errors, thread_errors

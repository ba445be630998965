"""The batching paths (issue 6): SUBMIT, ASSIGN, RESULTS and JOB_DONE carry arrays of entries.

Correctness only, no timing: results land on the right futures in the right order, one bad entry of a
batch does not spoil the others, a batch held by a worker that dies is run again exactly once, and a
RESULTS batch mixing current, stale and unknown outcomes applies only the current one.

Real dispatcher and worker processes on 127.0.0.1 (tests/conftest.py), plus raw DEALER sockets that
speak `conveyor.protocol` by hand where a test must control exactly what is in one message.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import zmq

from conveyor import AsyncClient, JobFuture
from conveyor.protocol import Cmd, Message, decode, encode, split_frames
from conveyor.protocol import failures as perr
from conveyor.protocol.payload import decode_call, decode_value, encode_call, encode_value
from tests import tasks
from tests.conftest import Cluster, wait_until

MODES = ["threads", "processes", "asyncio"]


async def async_square(x: int) -> int:
    """Imported by reference on asyncio-mode workers (tests.test_batching:async_square)."""
    await asyncio.sleep(0)
    return x * x


def square(x: int) -> int:
    return tasks.square_after(x, 0)


def square_fn(mode: str) -> Callable[[int], Any]:
    return async_square if mode == "asyncio" else square


# --- a raw peer: one DEALER socket, owned by one thread, speaking the protocol by hand ---------------


class RawPeer:
    """A client or worker built from a bare DEALER socket, to put exactly what a test wants in a message.

    A background thread owns the socket (ZeroMQ sockets are not thread-safe): it sends what `send`
    queues, files every message it receives in `inbox`, and, for a worker, beats HEARTBEAT so the
    dispatcher (0.2 s heartbeats in these tests) does not declare it lost between two steps of a test.
    """

    def __init__(self, address: str, role: str, beat: float = 0.05):
        self.address = address
        self.role = role
        prefix = "w-" + uuid.uuid4().hex[:12] if role == "worker" else "c-" + uuid.uuid4().hex[:20]
        self.routing_id = prefix.encode()
        self.beat = beat
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.received: list[Message] = []  # everything taken out of the inbox, in order
        self._unclaimed: list[Message] = []  # received, and not yet returned by expect() or drain()
        self._out: queue.Queue[list[Any]] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"raw-{role}", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "raw peer socket did not start"

    def _run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._ready.set()
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        frames = self._out.get_nowait()
                    except queue.Empty:
                        break
                    sock.send_multipart(frames)
                if self.role == "worker" and time.monotonic() >= next_beat:
                    sock.send_multipart(encode(Cmd.HEARTBEAT, {"role": "worker"}))
                    next_beat = time.monotonic() + self.beat
                if sock.poll(10):
                    while True:
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.inbox.put(decode(parts))
        except BaseException as exc:  # surfaced by expect()
            self._error = exc
        finally:
            sock.close(linger=0)
            ctx.term()

    def send(self, cmd: Cmd, body: Any, frames: list[Any] | None = None) -> None:
        self._out.put(encode(cmd, body, [bytes(f) for f in frames or []]))

    def expect(self, cmd: Cmd, timeout: float = 15.0, where: Callable[[Message], bool] | None = None) -> Message:
        """The oldest received message of this command (that `where` accepts) not yet taken by a test."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self._unclaimed):
                if msg.cmd == cmd and (where is None or where(msg)):
                    return self._unclaimed.pop(i)
            if self._error is not None:
                raise AssertionError(f"raw {self.role} socket failed: {self._error!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [m.cmd.name for m in self.received[-20:]]
                raise AssertionError(f"raw {self.role}: no {cmd.name} within {timeout:g} s (last seen: {seen})")
            try:
                msg = self.inbox.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            self.received.append(msg)
            self._unclaimed.append(msg)

    def drain(self, cmd: Cmd) -> list[Message]:
        """The messages of this command received so far and not yet taken, without waiting."""
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            self.received.append(msg)
            self._unclaimed.append(msg)
        out = [m for m in self._unclaimed if m.cmd == cmd]
        self._unclaimed = [m for m in self._unclaimed if m.cmd != cmd]
        return out

    def request(self, cmd: Cmd, body: dict[str, Any], reply: Cmd) -> dict[str, Any]:
        """A request with a fresh req id; also a barrier: whatever the dispatcher sent before is received."""
        req = uuid.uuid4().int & 0xFFFFFFFF
        self.send(cmd, {**body, "req": req})
        body_out: dict[str, Any] = self.expect(reply, where=lambda m: m.body.get("req") == req).body
        return body_out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def raw_peers() -> Iterator[Callable[[str, str], RawPeer]]:
    peers: list[RawPeer] = []

    def make(address: str, role: str) -> RawPeer:
        peer = RawPeer(address, role)
        peers.append(peer)
        return peer

    yield make
    for p in peers:
        p.close()


def submit_entry(job_id: str, frames: list[Any], opts: dict[str, Any] | None = None) -> tuple[list[Any], list[Any]]:
    return [job_id, {"fn": "tests.tasks:add"} if opts is None else opts, len(frames)], frames


def add_call(a: int, b: int) -> list[Any]:
    return encode_call("tests.tasks:add", None, (a, b), {})


Outcome = tuple[str, dict[str, Any], Any]  # state, info, decoded value (None unless succeeded)


def done_entries(peer: RawPeer, ids: set[str], timeout: float = 30.0) -> dict[str, list[Outcome]]:
    """JOB_DONE entries received for these ids until each has arrived (duplicates kept, to be counted)."""
    got: dict[str, list[Outcome]] = collections.defaultdict(list)
    deadline = time.monotonic() + timeout
    while not ids <= set(got):
        msg = peer.expect(Cmd.JOB_DONE, timeout=max(0.1, deadline - time.monotonic()))
        jobs = msg.body["jobs"]
        per_entry = split_frames([e[3] for e in jobs], msg.frames)
        for (job_id, state, info, *_), data in zip(jobs, per_entry, strict=True):
            got[job_id].append((state, info, decode_value(data) if state == "succeeded" else None))
    return got


class Tally:
    """How many times each future resolves: exactly once is the contract."""

    def __init__(self) -> None:
        self.resolved: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def watch(self, fut: JobFuture) -> JobFuture:
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[Any]) -> None:
        assert isinstance(fut, JobFuture)
        with self._lock:
            self.resolved[fut.job_id] += 1


# --- 1. ordering ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_map_with_a_ragged_last_chunk_keeps_input_order(cluster: Cluster, mode: str) -> None:
    cluster.wait_for_workers(cluster.start_worker(mode, 2 if mode != "asyncio" else 50))
    items = list(range(1003))  # 100 chunks of 10 and one of 3
    with cluster.client() as client:
        results = list(client.map(square_fn(mode), items, chunksize=10, timeout=60))
        # a window smaller than the number of chunks: chunks are submitted while earlier ones stream back
        windowed = list(client.map(square_fn(mode), items[::-1], chunksize=7, window=5, timeout=60))
        status = client.status()
    assert len(results) == 1003
    assert results == [i * i for i in items]
    assert windowed == [i * i for i in items[::-1]]
    assert status["totals"]["succeeded"] == 101 + 144  # ceil(1003 / 10) + ceil(1003 / 7) tasks
    assert status["totals"]["failed"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_one_by_one_submits_each_get_their_own_result(cluster: Cluster, mode: str) -> None:
    n = 5000
    cluster.wait_for_workers(cluster.start_worker(mode, 4 if mode != "asyncio" else 200))
    fn = square_fn(mode)
    tally = Tally()
    with cluster.client() as client:
        # distinct arguments per job, submitted from two threads at once so SUBMIT batches interleave
        def submit_range(start: int) -> list[JobFuture]:
            return [tally.watch(client.submit(fn, i)) for i in range(start, n, 2)]

        holder: dict[int, list[JobFuture]] = {}
        threads = [threading.Thread(target=lambda s=s: holder.__setitem__(s, submit_range(s))) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        by_arg = dict(zip(range(0, n, 2), holder[0], strict=True))
        by_arg.update(zip(range(1, n, 2), holder[1], strict=True))
        results = {i: f.result(90) for i, f in by_arg.items()}
        assert client.duplicate_results == 0
    futs = list(by_arg.values())
    assert len(futs) == n and len({f.job_id for f in futs}) == n
    assert all(results[i] == i * i for i in range(n)), [i for i in range(n) if results[i] != i * i][:10]
    assert all(f.info["id"] == f.job_id and f.info["state"] == "succeeded" for f in futs)
    assert len(tally.resolved) == n and set(tally.resolved.values()) == {1}


@pytest.mark.parametrize("mode", MODES)
async def test_async_client_gathers_each_its_own_result(cluster: Cluster, mode: str) -> None:
    cluster.wait_for_workers(cluster.start_worker(mode, 4 if mode != "asyncio" else 200))
    n = 2000
    async with AsyncClient(cluster.address) as c:
        results = await asyncio.wait_for(asyncio.gather(*(c.submit(square_fn(mode), i) for i in range(n))), 90)
        streamed = [r async for r in c.map(square_fn(mode), range(53), chunksize=10)]
    assert results == [i * i for i in range(n)]
    assert streamed == [i * i for i in range(53)]


# --- 2. partial batches -----------------------------------------------------------------------------


def test_one_submit_with_valid_invalid_and_duplicate_entries(
    cluster: Cluster, raw_peers: Callable[[str, str], RawPeer]
) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 2))
    client = raw_peers(cluster.address, "client")
    client.send(Cmd.HELLO, {"client": "raw", "pid": os.getpid()})
    client.expect(Cmd.WELCOME)
    before = client.request(Cmd.STATUS, {}, Cmd.STATUS_REPLY)["totals"]

    ok_ids = [f"batch-ok-{i}" for i in range(5)]
    parts = [
        submit_entry(ok_ids[0], add_call(0, 100)),
        submit_entry("batch-no-frames", []),  # a task needs its call frames
        submit_entry(ok_ids[1], add_call(1, 100)),
        submit_entry("batch-bad-retries", add_call(7, 7), {"fn": "tests.tasks:add", "retries": -1}),
        submit_entry(ok_ids[2], add_call(2, 100)),
        submit_entry(ok_ids[1], add_call(999, 0)),  # the same id again: not queued twice, frames ignored
        submit_entry("batch-bad-options", add_call(7, 7), "not a map"),  # type: ignore[arg-type]
        submit_entry(ok_ids[3], add_call(3, 100)),
        submit_entry("batch-bad-timeout", add_call(7, 7), {"timeout": 0}),
        submit_entry(ok_ids[4], add_call(4, 100)),
    ]
    entries = [e for e, _ in parts]
    frames = [f for _, fs in parts for f in fs]
    client.send(Cmd.SUBMIT, entries, frames)

    accepted = client.expect(Cmd.ACCEPTED).body
    assert accepted["accepted"] == [ok_ids[0], ok_ids[1], ok_ids[2], ok_ids[1], ok_ids[3], ok_ids[4]]
    assert accepted["busy"] == []
    reasons = dict(accepted["rejected"])
    assert list(reasons) == ["batch-no-frames", "batch-bad-retries", "batch-bad-options", "batch-bad-timeout"]
    assert reasons["batch-no-frames"] == "a task needs its call frames"
    assert "retries" in reasons["batch-bad-retries"]
    assert "map" in reasons["batch-bad-options"]
    assert "timeout" in reasons["batch-bad-timeout"]

    done = done_entries(client, set(ok_ids))
    after = client.request(Cmd.STATUS, {}, Cmd.STATUS_REPLY)  # a barrier: every earlier JOB_DONE is in
    for m in client.received:
        if m.cmd == Cmd.JOB_DONE:
            assert {e[0] for e in m.body["jobs"]} <= set(ok_ids), m.body
    assert {job_id: [(s, v) for s, _, v in outs] for job_id, outs in done.items()} == {
        job_id: [("succeeded", i + 100)] for i, job_id in enumerate(ok_ids)
    }
    assert all(outs[0][1]["attempts"] == 1 for outs in done.values())
    totals = after["totals"]
    assert totals["submitted"] - before["submitted"] == 5  # the duplicate and the rejected ones stored nothing
    assert totals["succeeded"] - before["succeeded"] == 5
    assert totals["failed"] == before["failed"] and totals["malformed"] == before["malformed"]
    rejected_ids = list(reasons)
    info = client.request(Cmd.JOB_INFO, {"ids": rejected_ids}, Cmd.JOB_INFO_REPLY)
    assert info["jobs"] == [None] * len(rejected_ids)


@pytest.mark.parametrize("valid, invalid", [(1, 1.0), (0, 0.0)])
def test_an_entry_is_judged_on_its_own_options_not_its_neighbours(
    cluster: Cluster, raw_peers: Callable[[str, str], RawPeer], valid: int, invalid: float
) -> None:
    """`retries` must be an integer: 1.0 is rejected alone, and still so right after an entry with retries=1."""
    cluster.wait_for_workers(cluster.start_worker("threads", 2))
    client = raw_peers(cluster.address, "client")
    client.send(Cmd.HELLO, {"client": "raw", "pid": os.getpid()})
    client.expect(Cmd.WELCOME)
    alone = add_call(5, 5)
    client.send(Cmd.SUBMIT, [["alone", {"fn": "tests.tasks:add", "retries": invalid}, len(alone)]], alone)
    assert client.expect(Cmd.ACCEPTED).body["rejected"] == [["alone", "retries must be a non-negative integer"]]

    parts = [
        submit_entry("neighbour-ok", add_call(1, 1), {"fn": "tests.tasks:add", "retries": valid}),
        submit_entry("neighbour-bad", add_call(2, 2), {"fn": "tests.tasks:add", "retries": invalid}),
    ]
    client.send(Cmd.SUBMIT, [e for e, _ in parts], [f for _, fs in parts for f in fs])
    accepted = client.expect(Cmd.ACCEPTED).body
    info = client.request(Cmd.JOB_INFO, {"ids": ["neighbour-bad"]}, Cmd.JOB_INFO_REPLY)["jobs"]
    assert accepted["rejected"] == [["neighbour-bad", "retries must be a non-negative integer"]], (
        "an invalid entry was accepted because its options compare equal to the previous entry's "
        f"({valid!r} == {invalid!r}); it is journaled as sent. ACCEPTED: {accepted}, stored: {info}"
    )
    assert accepted["accepted"] == ["neighbour-ok"]
    assert info == [None]
    assert done_entries(client, {"neighbour-ok"})["neighbour-ok"][0][2] == 2


@pytest.fixture
def small_queue(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_dispatcher("--max-queued", "5")
    try:
        yield c
    finally:
        c.stop()


def test_excess_of_a_batch_is_busy_and_the_client_resends_it(
    small_queue: Cluster, raw_peers: Callable[[str, str], RawPeer]
) -> None:
    raw = raw_peers(small_queue.address, "client")
    raw.send(Cmd.HELLO, {"client": "raw", "pid": os.getpid()})
    raw.expect(Cmd.WELCOME)
    ids = [f"mq-{i}" for i in range(12)]
    parts = [submit_entry(job_id, add_call(i, 1000)) for i, job_id in enumerate(ids)]
    raw.send(Cmd.SUBMIT, [e for e, _ in parts], [f for _, fs in parts for f in fs])
    accepted = raw.expect(Cmd.ACCEPTED).body
    assert accepted["accepted"] == ids[:5]  # no worker yet: five fill the queue
    assert accepted["busy"] == ids[5:]
    assert accepted["rejected"] == []
    assert raw.request(Cmd.JOB_INFO, {"ids": ids[5:]}, Cmd.JOB_INFO_REPLY)["jobs"] == [None] * 7  # nothing stored

    n = 40
    with small_queue.client() as client:
        futs = [client.submit(tasks.square_after, i, 0) for i in range(n)]
        # the STATUS goes after that SUBMIT on the same socket: every one of the 40 was answered busy
        status = client.status()
        assert status["queued"] == 5 and status["totals"]["submitted"] == 5
        assert not any(f.done() for f in futs)
        small_queue.wait_for_workers(small_queue.start_worker("threads", 2))
        assert [f.result(60) for f in futs] == [i * i for i in range(n)]
        assert client.duplicate_results == 0
        done = done_entries(raw, set(ids[:5]))
        assert {k: [v for _, _, v in outs] for k, outs in done.items()} == {
            job_id: [i + 1000] for i, job_id in enumerate(ids[:5])
        }
        totals = client.status()["totals"]
    assert totals["submitted"] == 5 + n and totals["succeeded"] == 5 + n and totals["failed"] == 0


# --- 3. a batch spanning a worker failure -----------------------------------------------------------


def test_worker_killed_while_holding_a_prefetched_batch(cluster: Cluster) -> None:
    hoarder = cluster.start_worker("threads", 2, None, "hoarder", "--prefetch", "64")
    cluster.wait_for_workers(hoarder)
    n = 300
    tally = Tally()
    with cluster.client() as client:
        futs = [tally.watch(client.submit(tasks.square_after, i, 0.02)) for i in range(n)]

        def holding() -> dict[str, Any] | None:
            status = client.status()
            w = next((w for w in status["workers"] if w["name"] == hoarder), None)
            # well beyond its 2 slots: prefetched jobs wait on the worker, and some already finished
            return w if w is not None and w["running"] >= 30 and w["done"] >= 2 else None

        held = wait_until(holding, 30, what="the worker to hold a prefetched batch")
        assert held["prefetch"] == 64 and held["concurrency"] == 2
        cluster.workers[hoarder].send_signal(signal.SIGKILL)
        cluster.workers[hoarder].wait()
        assert not all(f.done() for f in futs)
        rescuer = cluster.start_worker("threads", 4, None, "rescuer")
        results = [f.result(90) for f in futs]
        status = client.status()
        assert client.duplicate_results == 0
    assert results == [i * i for i in range(n)]
    assert len(tally.resolved) == n and set(tally.resolved.values()) == {1}
    rerun = [f for f in futs if f.info["attempts"] > 1]
    assert len(rerun) >= 10, "the jobs the killed worker held must have run again"
    for f in rerun:
        assert f.info["worker"] == rescuer
        first = f.info["history"][0]
        assert first["worker"] == hoarder and "WorkerLost" in first.get("error", ""), f.info["history"]
    assert all(f.info["worker"] in (hoarder, rescuer) for f in futs)
    assert status["totals"]["succeeded"] == n and status["totals"]["failed"] == 0
    assert [w["name"] for w in status["workers"]] == [rescuer]


def test_assign_batches_stay_within_credit_and_results_batches_map_back(
    cluster: Cluster, raw_peers: Callable[[str, str], RawPeer]
) -> None:
    """A raw worker with 2 slots and prefetch 64 answers in shuffled RESULTS batches of mixed frame counts."""
    n, capacity = 200, 66
    with cluster.client() as client:
        on_raw = client.options(tags=["raw"])
        futs = {f.job_id: f for f in (on_raw.submit(tasks.add, i, 1) for i in range(n))}
        wait_until(lambda: client.status()["queued"] == n, what="the jobs to be queued")
        worker = raw_peers(cluster.address, "worker")
        ready = {**_ready("session-1", capacity, []), "prefetch": 64}
        worker.send(Cmd.READY, ready)
        held: dict[str, int] = {}  # job id -> its argument a of add(a, 1)
        sizes: list[int] = []

        def take(msg: Message) -> None:
            tasks_ = msg.body["tasks"]
            sizes.append(len(tasks_))
            for entry, frames in zip(tasks_, split_frames([e[4] for e in tasks_], msg.frames), strict=True):
                assert entry[1] == 1 and entry[0] not in held and entry[0] in futs, entry
                held[entry[0]] = decode_call(frames).args[0]

        while len(held) < capacity:
            take(worker.expect(Cmd.ASSIGN))
        assert max(sizes) > 2, f"prefetched jobs come in batches, got ASSIGN sizes {sizes}"
        status = client.status()
        [w] = status["workers"]
        assert (w["running"], status["queued"]) == (capacity, n - capacity)  # never beyond its credit
        answered: set[str] = set()
        seq = 0  # RESULTS are numbered (protocol §5)
        while len(answered) < n:
            # When to refill is the dispatcher's policy: only once everything held is answered must more come.
            for msg in worker.drain(Cmd.ASSIGN) if len(held) > len(answered) else [worker.expect(Cmd.ASSIGN)]:
                take(msg)
            assert len(held) - len(answered) <= capacity, "assigned beyond the worker's credit"
            # newest first, 7 at a time; every third result is large bytes, which travels as a frame of its own
            batch = [j for j in reversed(held) if j not in answered][:7]
            entries, frames = [], []
            for job_id in batch:
                a = held[job_id]
                value: Any = a + 1 if a % 3 else [a + 1, bytes([a % 256]) * 70_000]
                data = [bytes(f) for f in encode_value(value)]
                entries.append([job_id, 1, True, {"duration": 0.001}, len(data)])
                frames.extend(data)
            seq += 1
            worker.send(Cmd.RESULTS, {"seq": seq, "outcomes": entries}, frames)
            answered.update(batch)
        for job_id, fut in futs.items():
            a = held[job_id]
            assert fut.result(20) == (a + 1 if a % 3 else [a + 1, bytes([a % 256]) * 70_000]), job_id
        assert sorted(held.values()) == list(range(n))
        status = client.status()
        assert status["totals"]["succeeded"] == n and status["totals"]["fenced"] == 0
        assert client.duplicate_results == 0


# --- 4. a RESULTS batch mixing current, stale and unknown outcomes ----------------------------------


def _ready(session: str, credit: int, running: list[list[Any]]) -> dict[str, Any]:
    return {
        "name": "raw", "host": "127.0.0.1", "pid": os.getpid(), "mode": "threads", "concurrency": 2,
        "prefetch": 0, "tags": ["raw"], "session": session, "credit": credit, "running": running,
    }


def _assigned(peer: RawPeer, want: set[tuple[str, int]]) -> dict[tuple[str, int], list[Any]]:
    """Collect ASSIGN entries until these (job_id, attempt) pairs have arrived; their call frames."""
    got: dict[tuple[str, int], list[Any]] = {}
    while not want <= set(got):
        msg = peer.expect(Cmd.ASSIGN)
        tasks_ = msg.body["tasks"]
        for (job_id, attempt, _timeout, _retry_on, _n, *_), frames in zip(
            tasks_, split_frames([e[4] for e in tasks_], msg.frames), strict=True
        ):
            got[(job_id, attempt)] = frames
    return got


def test_results_batch_mixing_current_stale_and_unknown_outcomes(
    cluster: Cluster, raw_peers: Callable[[str, str], RawPeer]
) -> None:
    worker = raw_peers(cluster.address, "worker")
    worker.send(Cmd.READY, _ready("session-1", 2, []))
    worker.expect(Cmd.HEARTBEAT, where=lambda m: m.body.get("role") == "dispatcher")
    with cluster.client() as client:
        cluster.wait_for_workers("raw")
        on_raw = client.options(tags=["raw"])
        a, b = on_raw.submit(tasks.add, 1, 2), on_raw.submit(tasks.add, 3, 4)
        first = _assigned(worker, {(a.job_id, 1), (b.job_id, 1)})
        call = decode_call(first[(b.job_id, 1)])
        assert (call.name, list(call.args), call.chunk) == ("tests.tasks:add", [3, 4], False)

        # A new connection that still holds a but not b: b's attempt 1 is lost, and b comes back as attempt 2
        worker.send(Cmd.READY, _ready("session-2", 1, [[a.job_id, 1]]))
        second = _assigned(worker, {(b.job_id, 2)})
        assert second[(b.job_id, 2)] == first[(b.job_id, 1)]  # the same call frames
        before = client.status()["totals"]

        def ok(value: Any) -> tuple[dict[str, Any], list[bytes]]:
            return {"duration": 0.01}, [bytes(f) for f in encode_value(value)]

        outcomes: list[tuple[str, int, bool, dict[str, Any], list[bytes]]] = [
            (a.job_id, 1, True, *ok(3)),  # current: applied
            (b.job_id, 1, False, perr.error_info("exception", "ValueError", "stale"), []),  # fenced off
            ("no-such-job", 1, True, *ok("junk")),  # unknown: ignored
            (a.job_id, 1, True, *ok(999)),  # the job has just finished: ignored
        ]
        entries = [[j, att, okay, info, len(fs)] for j, att, okay, info, fs in outcomes]
        worker.send(Cmd.RESULTS, {"seq": 1, "outcomes": entries}, [f for *_, fs in outcomes for f in fs])

        assert a.result(20) == 3
        assert a.info["worker"] == "raw" and a.info["attempts"] == 1
        status = client.status()
        totals = status["totals"]
        assert totals["fenced"] - before["fenced"] == 3
        assert totals["malformed"] == before["malformed"] and totals["failed"] == before["failed"]
        assert totals["succeeded"] - before["succeeded"] == 1
        [raw] = status["workers"]
        assert raw["name"] == "raw" and raw["running"] == 1  # still registered, still holding b
        [b_info] = client.job_info(b.job_id)
        assert b_info is not None and b_info["state"] == "running" and b_info["attempts"] == 2
        assert not b.done()

        value, data = ok(7)
        worker.send(Cmd.RESULTS, {"seq": 2, "outcomes": [[b.job_id, 2, True, value, len(data)]]}, data)
        assert b.result(20) == 7
        assert b.info["attempts"] == 2 and "WorkerLost" in b.info["history"][0]["error"]
        assert client.status()["totals"]["fenced"] == totals["fenced"]

        worker.send(Cmd.GOODBYE, {})
        wait_until(lambda: not client.status()["workers"], what="the raw worker to leave")
        cluster.wait_for_workers(cluster.start_worker("threads", 2))
        assert client.submit(tasks.add, 20, 22).result(20) == 42  # the dispatcher carries on
        assert client.duplicate_results == 0
    assert cluster.dispatcher is not None and cluster.dispatcher.poll() is None

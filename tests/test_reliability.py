"""Faults injected for real: kill -9, SIGSTOP, crashes, leaks, dispatcher restarts on the journal."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest

from conveyor import JobFuture, WorkerCrashed
from tests import tasks
from tests.conftest import ROOT, Cluster, stop_process, wait_until


class Tally:
    """Counts how many times each future resolves: exactly once is the contract."""

    def __init__(self) -> None:
        self.resolved: collections.Counter[str] = collections.Counter()

    def watch(self, fut: JobFuture) -> JobFuture:
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[Any]) -> None:
        assert isinstance(fut, JobFuture)
        self.resolved[fut.job_id] += 1


def test_kill_9_of_a_worker_and_of_a_child_mid_run(cluster: Cluster) -> None:
    doomed = cluster.start_worker("processes", 2, name="doomed")
    steady = cluster.start_worker("threads", 2, name="steady")
    cluster.wait_for_workers(doomed, steady)
    tally = Tally()
    with cluster.client() as client:
        futs = [tally.watch(client.submit(tasks.square_after, i, 0.002)) for i in range(3000)]
        wait_until(lambda: sum(f.done() for f in futs) > 300, what="the run to get going")
        worker_pid = cluster.worker_pid(doomed)
        children = psutil.Process(worker_pid).children(recursive=True)
        busy_child = next(p for p in children if p.ppid() != worker_pid)  # forked by the forkserver
        busy_child.kill()  # one child: only its task is affected, and it is retried
        wait_until(lambda: sum(f.done() for f in futs) > 1000, what="more progress")
        cluster.workers[doomed].send_signal(signal.SIGKILL)  # the whole worker
        results = [f.result(120) for f in futs]
    assert results == [i * i for i in range(3000)]
    assert set(tally.resolved.values()) == {1} and len(tally.resolved) == 3000
    assert any(f.info["attempts"] > 1 for f in futs), "some tasks must have been re-run"


def test_dispatcher_kill_9_and_restart_on_the_journal(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    tally = Tally()
    client = cluster.client(reconnect_timeout=60)
    keep = client.options(keep=True)
    kept = keep.submit(tasks.add, 40, 2)
    assert kept.result(20) == 42  # finished before the crash: its result must survive it
    before = time.time()
    retried = keep.options(retries=1, retry_on=["OSError"]).submit(tasks.flaky, str(cluster.tmp / "flaky"), 1)
    assert retried.result(30) == 2
    after = time.time()
    history = retried.info["history"]  # wall-clock times, for people and for the journal
    assert [h["attempt"] for h in history] == [1, 2], history
    assert all(before <= h["started"] <= h["finished"] <= after for h in history), (before, history, after)
    futs = [tally.watch(client.submit(tasks.square_after, i, 0.01)) for i in range(600)]
    wait_until(lambda: sum(f.done() for f in futs) > 100, what="progress before the crash")
    assert cluster.dispatcher is not None
    cluster.dispatcher.send_signal(signal.SIGKILL)
    cluster.dispatcher.wait()
    cluster.start_dispatcher()  # same port, same journal
    assert [f.result(120) for f in futs] == [i * i for i in range(600)]
    assert set(tally.resolved.values()) == {1}
    # a finished job's result is still there after the restart, for anyone who asks
    assert client.result(kept.job_id, timeout=20) == 42
    [info] = client.job_info(retried.job_id)  # its attempts keep their real times across the restart
    assert info is not None and before <= info["submitted_at"] <= after + 1.0, (before, info, after)
    assert [t for h in info["history"] for t in (h["started"], h["finished"])] == pytest.approx(
        [t for h in history for t in (h["started"], h["finished"])], abs=0.05)
    with subprocess.Popen(
        [sys.executable, "-m", "conveyor", "result", kept.job_id, "--wait", "--json", "-d", cluster.address],
        stdout=subprocess.PIPE, cwd=ROOT,
    ) as proc:
        out, _ = proc.communicate(timeout=30)
    assert json.loads(out)["result"] == 42


def test_cli_result_wait_across_a_dispatcher_restart(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 1))
    submit = subprocess.run(
        [sys.executable, "-m", "conveyor", "submit", "tests.tasks:square_after", "7", "3", "-d", cluster.address],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=True,
    )
    job_id = submit.stdout.strip()
    waiter = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "result", job_id, "--wait", "-d", cluster.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        with cluster.client() as client:
            wait_until(lambda: client.status()["running"] == 1, what="the job to start")
        assert cluster.dispatcher is not None
        cluster.dispatcher.send_signal(signal.SIGKILL)
        cluster.dispatcher.wait()
        cluster.start_dispatcher()
        out, err = waiter.communicate(timeout=60)
    finally:
        stop_process(waiter)
    assert waiter.returncode == 0, err
    assert out.strip() == "49"


def test_frozen_worker_is_declared_lost_and_its_late_results_are_fenced(cluster: Cluster) -> None:
    frozen = cluster.start_worker("threads", 2, name="frozen")
    cluster.wait_for_workers(frozen)
    tally = Tally()
    with cluster.client() as client:
        futs = [tally.watch(client.submit(tasks.square_after, i, 1.0)) for i in range(2)]
        wait_until(lambda: client.status()["running"] == 2, what="both tasks to start on the frozen worker")
        os.kill(cluster.worker_pid(frozen), signal.SIGSTOP)
        try:
            wait_until(lambda: not client.status()["workers"], what="the frozen worker to be declared lost")
            rescuer = cluster.start_worker("threads", 2, name="rescuer")
            assert [f.result(30) for f in futs] == [0, 1]
            assert {f.info["worker"] for f in futs} == {rescuer}
        finally:
            os.kill(cluster.worker_pid(frozen), signal.SIGCONT)
        # the thawed worker reconnects and reports its stale attempts: they are fenced off
        wait_until(lambda: client.status()["totals"]["fenced"] >= 2, what="the stale outcomes to arrive")
        assert set(tally.resolved.values()) == {1}
        assert client.status()["totals"]["succeeded"] == 2
        assert client.duplicate_results == 0


def test_segfault_is_a_crash_of_one_child(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("processes", 2))
    with cluster.client() as client:
        with pytest.raises(WorkerCrashed, match="signal 11"):
            client.submit(tasks.segfault).result(60)
        assert client.submit(tasks.add, 1, 1).result(30) == 2


def test_a_leaking_task_is_killed_at_the_memory_limit(cluster: Cluster) -> None:
    name = cluster.start_worker("processes", 1, None, None, "--max-child-memory", "200")
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        fut = client.submit(tasks.leak, 20, 100)  # would reach 2 GB
        with pytest.raises(WorkerCrashed, match="over the worker's 200 MiB limit"):
            fut.result(120)
        assert fut.info["attempts"] == 4  # a poison task: retried to the limit, then failed
        assert client.submit(tasks.add, 2, 2).result(30) == 4


def test_rolling_restart_of_workers_under_load(cluster: Cluster) -> None:
    names = [cluster.start_worker("threads", 2, name=f"gen1-{i}") for i in range(2)]
    cluster.wait_for_workers(*names)
    tally = Tally()
    with cluster.client() as client:
        futs = [tally.watch(client.submit(tasks.square_after, i, 0.02)) for i in range(400)]
        for i, old in enumerate(names):
            new = cluster.start_worker("threads", 2, name=f"gen2-{i}")
            cluster.wait_for_workers(new)
            assert stop_process(cluster.workers[old]) == 0  # SIGTERM: drain, hand back, exit 0
        assert [f.result(60) for f in futs] == [i * i for i in range(400)]
    assert set(tally.resolved.values()) == {1}
    assert client.duplicate_results == 0


def test_journal_stays_bounded_and_results_expire(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.start_dispatcher("--result-ttl", "1")
    try:
        c.wait_for_workers(c.start_worker("threads", 4))
        client = c.client()
        assert list(client.map(tasks.add, range(2000), range(2000))) == [2 * i for i in range(2000)]
        kept = client.options(keep=True).submit(tasks.add, 1, 1)
        assert kept.result(20) == 2
        db = tmp_path / "journal.db"

        def rows() -> int:
            with sqlite3.connect(db) as conn:
                return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])

        def kept_rows() -> int:
            with sqlite3.connect(db) as conn:
                return int(conn.execute("SELECT count(*) FROM jobs WHERE id=?", (kept.job_id,)).fetchone()[0])

        # The kept result is written by the group commit, within a few ms of its delivery ...
        wait_until(lambda: kept_rows() == 1, timeout=20, what="the kept job's row in the journal")
        # ... delivered jobs leave the journal; the kept one stays until its TTL passes
        wait_until(lambda: rows() == 0, timeout=20, what="the journal to empty after the TTL")
        assert client.job_info(kept.job_id)[0] is None
    finally:
        c.stop()


@pytest.mark.timeout(300)
def test_chaos(cluster: Cluster) -> None:
    """Random kill -9 and restarts of workers and the dispatcher under continuous load."""
    seconds = float(os.environ.get("CONVEYOR_CHAOS_SECONDS", "20"))
    rng = random.Random(int(os.environ.get("CONVEYOR_CHAOS_SEED", "1234")))
    modes = ["threads", "processes", "asyncio"]
    for i in range(3):
        cluster.start_worker(modes[i], 2, name=f"w{i}")
    cluster.wait_for_workers("w0", "w1", "w2")
    tally = Tally()
    client = cluster.client(reconnect_timeout=120)
    futs: list[tuple[int, JobFuture]] = []
    faults: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    n = 0
    generation = 3
    while time.monotonic() < deadline:
        for _ in range(50):  # continuous load
            futs.append((n, tally.watch(client.submit(tasks.square_after, n, rng.choice([0, 0.001, 0.01])))))
            n += 1
        fault = rng.random()
        alive = [name for name, p in cluster.workers.items() if p.poll() is None]
        if fault < 0.15 and alive:
            victim = rng.choice(alive)
            cluster.workers[victim].send_signal(signal.SIGKILL)
            cluster.workers[victim].wait()
            faults["worker kill -9"] += 1
        elif fault < 0.22 and alive:
            victim = rng.choice(alive)
            stop_process(cluster.workers[victim])
            faults["worker SIGTERM"] += 1
        elif fault < 0.27:
            assert cluster.dispatcher is not None
            cluster.dispatcher.send_signal(signal.SIGKILL)
            cluster.dispatcher.wait()
            cluster.start_dispatcher()
            faults["dispatcher kill -9 + restart"] += 1
        alive = [name for name, p in cluster.workers.items() if p.poll() is None]
        while len(alive) < 2:
            name = cluster.start_worker(modes[generation % 3], 2, name=f"w{generation}")
            generation += 1
            alive.append(name)
            faults["worker started"] += 1
        time.sleep(rng.uniform(0.05, 0.3))  # the pace of the chaos, not a wait for a condition
    results = [(i, f.result(180)) for i, f in futs]
    lost = sum(1 for i, r in results if r != i * i)
    twice = sum(1 for c in tally.resolved.values() if c != 1)
    print(f"\nchaos: {seconds:.0f} s, {len(futs)} jobs, faults {dict(faults)}, lost {lost}, resolved twice {twice}, "
          f"duplicate outcomes dropped by the client {client.duplicate_results}")
    assert lost == 0 and twice == 0 and len(tally.resolved) == len(futs)


def test_worker_adopts_a_faster_dispatcher_heartbeat(cluster: Cluster) -> None:
    """Dispatcher at 0.2 s, worker left at its 1 s default: the worker must not be declared lost."""
    name = cluster.start_worker("threads", 1, None, "slow-beat")
    cluster.wait_for_workers(name)
    proc = cluster.workers[name]
    stop_process(proc)  # restart it without the fast heartbeat the fixture passes
    args = [sys.executable, "-m", "conveyor", "worker", "-c", cluster.address, "--mode", "threads",
            "-n", "1", "--name", "default-beat"]
    cluster.workers["default-beat"] = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    cluster.wait_for_workers("default-beat")
    with cluster.client() as client:
        fut = client.submit(tasks.sleep, 2.5)  # twelve of the dispatcher's heartbeat intervals
        assert fut.result(30) == 2.5
        assert fut.info["attempts"] == 1

"""Work that waits from the Python client: bad values are ValueErrors before anything is sent, and real
runs over real processes (priority overtaking, a delayed job across a dispatcher kill -9, expiry, a
global rate limit at 8 workers, a concurrency limit with a worker killed mid-run).

Times are wall clock on one machine: tasks stamp when they start (tests/waiting_tasks.py), the dispatcher
records when it assigned each attempt (job_info history)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import AsyncClient, Client, Executor
from conveyor.client.base import wire_options
from conveyor.errors import JobExpired, JobRejected
from tests import waiting_tasks as wt
from tests.conftest import Cluster, wait_until

UTC = dt.UTC
IN_AN_HOUR = dt.datetime.now(UTC) + dt.timedelta(hours=1)


# --- bad values: ValueError, nothing sent -----------------------------------------------------------------


BAD = [
        ({"priority": "high"}, "priority must be an integer"),
        ({"priority": True}, "priority must be an integer"),
        ({"priority": 1.5}, "priority must be an integer"),
        ({"countdown": -1}, "zero or more"),
        ({"countdown": math.nan}, "number of seconds"),
        ({"countdown": "10m"}, "number of seconds"),
        ({"expires": 0}, "more than zero"),
        ({"expires": dt.timedelta(seconds=-5)}, "more than zero"),
        ({"eta": dt.datetime(2030, 1, 1, 12, 0)}, "has no time zone"),
        ({"eta": "2030-01-01T12:00Z"}, "datetime with a time zone"),
        ({"expires": dt.datetime(2030, 1, 1)}, "has no time zone"),
        ({"eta": IN_AN_HOUR, "expires": IN_AN_HOUR - dt.timedelta(minutes=1)}, "eta is not before expires"),
        ({"countdown": 60, "expires": 30}, "countdown is not shorter than expires"),
        ({"countdown": 5, "eta": IN_AN_HOUR}, "eta or countdown, not both"),
        ({"rate_limit": "lots"}, "bad rate_limit"),
        ({"rate_limit": "10/x"}, "bad rate_limit"),
        ({"rate_limit": "10/s,burst=0"}, "bad rate_limit"),
        ({"rate_limit": 10}, "bad rate_limit"),
        ({"limits": [""]}, "limit key names"),
        ({"limits": ["db", 3]}, "limit key names"),
    ({"limits": ["no spaces"]}, "bad limit key 'no spaces'"),
    ({"limits": [f"k{i}" for i in range(17)]}, "at most 16 limit keys"),
    ({"priority": 2**40}, "within"),
    ({"countdown": 20 * 365 * 86400}, "at most ten years"),
]


@pytest.mark.parametrize(("options", "says"), BAD)
def test_bad_values_are_value_errors(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        wire_options(options)


def test_every_client_refuses_bad_values_before_sending(cluster: Cluster) -> None:
    client = cluster.client()
    later = client.options(eta=IN_AN_HOUR)
    for options, says in BAD:
        with pytest.raises(ValueError, match=says):
            client.options(**options)
    with pytest.raises(ValueError, match="eta is not before expires"):  # a view against its parent's options
        later.options(expires=IN_AN_HOUR - dt.timedelta(seconds=1))
    assert later.options(countdown=5)._options == {"countdown": 5.0}  # a countdown replaces the eta
    with pytest.raises(ValueError, match="bad limit key"):
        client.set_limit("no spaces", "10/s")
    with pytest.raises(ValueError, match="priority must be an integer"):
        Executor(cluster.address, priority="high")  # options given to the constructor are checked alike

    async def from_async() -> None:
        async with AsyncClient(cluster.address) as ac:
            for options, says in BAD:
                with pytest.raises(ValueError, match=says):
                    ac.options(**options)
            with pytest.raises(ValueError, match="bad limit key"):
                await ac.set_limit("no spaces", "10/s")
            assert await ac.set_limit("api", "5/s,burst=2") is not None
            assert [k["key"] for k in await ac.limits()] == ["api"]
            accepted = time.time()  # and the options work from asyncio too (no worker: it ends expired)
            with pytest.raises(JobExpired):
                await ac.options(countdown=0.2, expires=0.5, limits=["api"], priority=2).submit(wt.stamp, 0, "a")
            assert time.time() - accepted >= 0.5

    asyncio.run(from_async())
    assert client.set_limit("api", None) is None


def test_good_values_in_wire_names() -> None:
    eta = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert wire_options({"priority": -3, "eta": eta, "expires": 3600}) == {
        "priority": -3, "eta": eta.timestamp(), "countdown": None, "expires_in": 3600.0, "expires_at": None,
    }
    assert wire_options({"countdown": dt.timedelta(minutes=10), "limits": "db", "rate_limit": " 5/10s,burst=3 "}) == {
        "countdown": 600.0, "eta": None, "limits": ["db"], "rate_limit": "5/10s,burst=3",
    }


def test_unknown_limit_keys_and_bad_rules_are_refused_by_the_dispatcher(cluster: Cluster) -> None:
    client = cluster.client()
    fut = client.options(limits=["nobody-declared-me"]).submit(wt.stamp, 0, "x")
    with pytest.raises(JobRejected, match="unknown limit key 'nobody-declared-me'") as caught:
        fut.result(10)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError, match="bad limit 'lots'"):
        client.set_limit("db", "lots")
    assert client.set_limit("db", "concurrency:3") == {
        "key": "db", "rule": "concurrency:3", "running": 0, "waiting": 0, "starts": 0, "oldest_wait_s": None,
    }
    assert client.set_limit("db", None) is None and client.limits() == []


# --- priority ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prefetch", "bound"), [("4", 5), ("auto", 1)])
def test_a_priority_job_overtakes_a_backlog_behind_at_most_the_prefetch_window(
    cluster: Cluster, prefetch: str, bound: int
) -> None:
    """One worker, one slot, a backlog of priority-0 jobs, then one priority-5 job: it starts next, or behind
    at most the jobs the worker already held (its window; +1 for an assignment in flight when it came)."""
    cluster.wait_for_workers(cluster.start_worker("threads", 1, None, "solo", "--prefetch", prefetch))
    client = cluster.client()
    low = [client.submit(wt.stamp, 0.02, f"low{i}") for i in range(60)]
    wait_until(lambda: client.status()["running"] >= 1, what="the backlog to start")
    submitted = time.time()
    urgent = client.options(priority=5).submit(wt.stamp, 0, "urgent").result(20)
    lows = [f.result(20) for f in low]
    overtaken_by = [r["value"] for r in lows if submitted < r["started"] < urgent["started"]]
    latency_s = urgent["started"] - submitted
    print(f"prefetch {prefetch}: priority-5 job started {latency_s * 1000:.1f} ms after submit, "
          f"behind {len(overtaken_by)} of {len(lows)} priority-0 jobs")
    assert len(overtaken_by) <= bound, overtaken_by
    assert sum(r["started"] > urgent["started"] for r in lows) >= 20  # there was a backlog, and it overtook it


# --- delayed jobs and expiry -------------------------------------------------------------------------------


def test_a_delayed_job_survives_a_dispatcher_kill_9_and_runs_once_when_due(cluster: Cluster, tmp_path: Path) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 2))
    client = cluster.client(reconnect_timeout=60)
    marker = tmp_path / "runs"
    accepted = time.time()
    fut = client.options(countdown=3.0).submit(wt.stamp_once, str(marker), 0, "delayed")
    gone = client.options(countdown=3.0, keep=True).submit(wt.stamp_once, str(marker), 0, "cancelled")
    assert client.cancel(gone) == [gone.job_id]  # no worker needed; journaled
    [info] = wait_until(lambda: [v for v in client.job_info(fut.job_id) if v and v["state"] == "scheduled"],
                        what="the job to be scheduled")
    assert accepted + 3.0 <= info["due_at"] <= time.time() + 3.0  # wall clock, fixed at acceptance
    wait_until(lambda: client.status()["scheduled"] == 1, what="the status to count it")
    assert cluster.dispatcher is not None
    time.sleep(0.2)  # the journal commits every few ms; the test is that its row survives kill -9
    cluster.dispatcher.send_signal(signal.SIGKILL)
    cluster.dispatcher.wait()
    cluster.start_dispatcher()  # same port, same journal; the worker and the client come back by themselves
    # One more, due 2.5 s ahead: its call leaves memory for the journal (OFFLOAD_AFTER_S) and comes back.
    again = client.options(countdown=2.5).submit(wt.stamp_once, str(marker), 0, "offloaded")
    result = fut.result(30)
    assert result["started"] >= accepted + 3.0, (result["started"] - accepted)  # never before it was due
    assert marker.read_text().count("delayed") == 1  # ran once
    assert result["started"] - info["due_at"] < 1.0  # and soon after it was due
    assert again.result(30)["value"] == "offloaded"
    [cancelled] = client.job_info(gone.job_id)
    assert cancelled is not None and cancelled["state"] == "cancelled"  # still, after the restart
    assert sorted(line.split()[0] for line in marker.read_text().splitlines()) == ["delayed", "offloaded"]


def test_a_job_not_started_by_its_expiry_ends_expired_not_run_late(cluster: Cluster) -> None:
    """Even on a worker whose auto window would have prefetched it (warmed up with tiny tasks)."""
    cluster.wait_for_workers(cluster.start_worker("threads", 1, None, "solo"))
    client = cluster.client()
    for f in [client.submit(wt.stamp, 0, i) for i in range(300)]:  # short tasks: the worker's window opens
        f.result(30)
    assert client.status()["workers"][0]["window"] > 4
    blocker = client.submit(wt.stamp, 0.6, "blocker")
    wait_until(lambda: client.status()["running"] >= 1, what="the blocker to start")
    late = client.options(expires=0.2, keep=True).submit(wt.stamp, 0, "too late")
    also_late = client.options(expires=0.2).submit(wt.stamp, 0, "too late too")
    with pytest.raises(JobExpired, match="had not started by its expiry time"):
        late.result(10)
    with pytest.raises(JobExpired):
        also_late.result(10)
    assert blocker.result(10)["value"] == "blocker"
    [view] = client.job_info(late.job_id)
    assert view is not None and view["state"] == "expired" and view["attempts"] == 0
    assert view["error"]["kind"] == "expired" and view["error"]["type"] == "JobExpired"
    # A job that starts in time is not expired however long it runs, and free slots take jobs with expiries.
    assert client.options(expires=0.3).submit(wt.stamp, 0.5, "long").result(10)["value"] == "long"
    assert client.status()["totals"]["expired"] == 2


# --- limits -------------------------------------------------------------------------------------------------


def test_a_global_rate_limit_holds_over_every_window_at_8_workers(tmp_path: Path) -> None:
    """Over any window of length t, starts under the key <= burst + rate * t, whatever the number of workers:
    exactly at the dispatcher (its assignment times), and at the workers within the delivery jitter."""
    rate, burst, n = 20.0, 4, 40
    cluster = Cluster(tmp_path)
    try:
        cluster.start_dispatcher("--limit", f"api={rate:g}/s,burst={burst}")
        names = [cluster.start_worker("threads", 2) for _ in range(8)]
        client = cluster.client()
        cluster.wait_for_workers(*names, timeout=60)
        api = client.options(limits=["api"], keep=True)  # kept: their attempt records are read afterwards
        futs = [api.submit(wt.stamp, 0.01, i) for i in range(n)]
        results = [f.result(30) for f in futs]
        at_workers = sorted(r["started"] for r in results)
        assert len({r["pid"] for r in results}) >= 4  # spread over the workers, not one
        at_dispatcher = sorted(s[0] for s in attempt_spans(client, [f.job_id for f in futs]))
        worst_dispatcher = worst_window(at_dispatcher, rate)
        worst_worker = worst_window(at_workers, rate)
        print(f"rate {rate:g}/s burst {burst}, {n} starts on 8 workers: worst window holds burst + "
              f"{worst_dispatcher - burst:+.3f} at the dispatcher, {worst_worker - burst:+.3f} at the workers")
        assert worst_dispatcher <= burst + 1e-6
        assert worst_worker <= burst + rate * 0.1  # within 100 ms of delivery jitter (a loaded 2-core machine)
        span = at_workers[-1] - at_workers[0]
        assert span >= (n - burst) / rate - 0.05  # and the limit did hold them back
    finally:
        cluster.stop()


def worst_window(starts: list[float], rate: float) -> float:
    """max over windows [t_i, t_j] of (starts in it) - rate * (t_j - t_i): at most burst if the limit held."""
    worst = 0.0
    for i, t0 in enumerate(starts):
        for j in range(i, len(starts)):
            worst = max(worst, (j - i + 1) - rate * (starts[j] - t0))
    return worst


def test_a_concurrency_limit_holds_and_a_killed_worker_gives_its_slots_back(tmp_path: Path) -> None:
    n, limit = 8, 2
    cluster = Cluster(tmp_path)
    try:
        cluster.start_dispatcher("--limit", f"db=concurrency:{limit}")
        names = [cluster.start_worker("threads", 2) for _ in range(3)]
        client = cluster.client()
        cluster.wait_for_workers(*names)
        db = client.options(limits=["db"], keep=True)
        futs = [db.submit(wt.stamp, 0.4, i) for i in range(n)]
        busy = wait_until(lambda: [w for w in client.status()["workers"] if w["running"]], what="a db job to run")
        victim = busy[0]["name"]
        killed_at = time.time()
        cluster.workers[victim].send_signal(signal.SIGKILL)
        results = [f.result(30) for f in futs]
        assert [r["value"] for r in results] == list(range(n))
        # The dispatcher's record of every attempt, the lost ones included: never more than `limit` at once.
        spans = attempt_spans(client, [f.job_id for f in futs])
        assert max_overlap(spans) <= limit
        lost = [s for s in spans if s[2] == "lost"]
        assert lost, "the killed worker was running a db job"
        assert all(s[1] >= killed_at for s in lost)  # released when declared lost, not before
        # At the workers: the successful attempts' own start and end, with the lost ones up to the kill.
        ran = [(r["started"], r["ended"]) for r in results] + [(s[0], killed_at) for s in lost]
        assert max_overlap([(a, b, "") for a, b in ran]) <= limit
        [key] = client.limits()
        assert (key["key"], key["running"], key["waiting"]) == ("db", 0, 0)
    finally:
        cluster.stop()


def attempt_spans(client: Client, job_ids: list[str]) -> list[tuple[float, float, str]]:
    out = []
    for view in client.job_info(*job_ids):
        assert view is not None
        for h in view["history"]:
            kind = "lost" if "WorkerLost" in str(h.get("error", "")) else "ok"
            out.append((h["started"], h["finished"], kind))
    return out


def max_overlap(spans: list[tuple[float, float, str]]) -> int:
    events = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])  # an end before a start
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most

"""Work that waits from the command line: `submit --priority/--in/--at/--expires/--limit/--rate-limit`,
`conveyor limits`, and the waiting states in `jobs`, `status` and `result`. Real subprocesses, a real
dispatcher and worker."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Cluster, conveyor_cmd, stop_process, wait_until
from tests.test_cli import assert_ok, assert_one_error_line, free_port, run_cli, run_many, show
from tests.test_observe import scrape

IN_AN_HOUR = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--priority", "high"), "--priority"),
        (("--priority", "1.5"), "--priority"),
        (("--in", "-5"), "zero or more"),
        (("--in", "soon"), "bad --in 'soon'"),
        (("--in", "nan"), "bad --in"),
        (("--at", "2026-12-24T18:00"), "has no time zone"),
        (("--at", "Christmas"), "use an ISO time with a zone"),
        (("--in", "10m", "--at", IN_AN_HOUR.isoformat()), "--in or --at, not both"),
        (("--expires", "0"), "--expires must be more than zero"),
        (("--expires", "2030-01-01T00:00"), "has no time zone"),
        (("--at", IN_AN_HOUR.isoformat(), "--expires", (IN_AN_HOUR - timedelta(minutes=5)).isoformat()),
         "--at is not before --expires"),
        (("--in", "10m", "--expires", "5m"), "--in is not shorter than --expires"),
        (("--rate-limit", "10/x"), "bad --rate-limit '10/x'"),
        (("--rate-limit", "10/s,burst=0"), "bad --rate-limit"),
        (("--limit", ""), "--limit must be a list of limit key names"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, tuple) else "",
)
def test_bad_waiting_options_are_one_usage_error(args: tuple[str, ...], says: str) -> None:
    # Nothing listens here: refusing them must not need the dispatcher (exit 2, not 1).
    proc = run_cli("submit", "tests.tasks:add", "1", *args, address=f"tcp://127.0.0.1:{free_port()}",
                   env={"CONVEYOR_CONNECT_TIMEOUT": "1"}, timeout=20)
    line = assert_one_error_line(proc, 2)
    assert says in line, show(proc)
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--set", "db"), "use KEY=RULE"),
        (("--set", "db=concurrency:0"), "at least 1"),
        (("--set", "api=lots"), "bad limit 'lots'"),
        (("--set", "bad key=10/s"), "use KEY=RULE"),
        (("--remove", "bad!key"), "bad limit key"),
        (("--set", "a=1/s", "--remove", "a"), "both name 'a'"),
        (("--set", "t:{}=10/s"), "bad limit key template"),
        (("--remove", "t:{1x}"), "bad limit key template"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, tuple) else "",
)
def test_bad_limits_are_one_usage_error(args: tuple[str, ...], says: str) -> None:
    proc = run_cli("limits", *args, address=f"tcp://127.0.0.1:{free_port()}",
                   env={"CONVEYOR_CONNECT_TIMEOUT": "1"}, timeout=20)
    assert says in assert_one_error_line(proc, 2), show(proc)


def test_waiting_jobs_from_the_cli(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    follow: subprocess.Popen[str] | None = None
    try:
        port, board = free_port(), free_port()
        cluster.start_dispatcher("--limit", "db=concurrency:1", "--metrics-port", str(port), "--dashboard-port",
                                 str(board))
        cluster.wait_for_workers(cluster.start_worker("threads", 4))
        address = cluster.address
        client = cluster.client()
        submitted = time.time()
        later, at, busy, chatty = run_many([
            ("submit", "tests.tasks:add", "1", "2", "--in", "1h", "--priority", "3"),
            ("submit", "tests.tasks:add", "1", "2", "--at", IN_AN_HOUR.astimezone(
                datetime.now().astimezone().tzinfo).isoformat()),  # another zone: the same instant
            ("submit", "tests.tasks:sleep", "30", "--limit", "db"),
            ("submit", "tests.observe_tasks:chatty", '"late"', "1", "--in", "4s"),
        ], address=address)
        later_id, at_id, busy_id, chatty_id = (assert_ok(p).strip() for p in (later, at, busy, chatty))
        # Following the output of a job not due yet waits for it (it does not stop at "scheduled").
        follow = subprocess.Popen(conveyor_cmd("logs", chatty_id, "--follow", "--dispatcher", address), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: client.status()["running"] == 1, what="the db job to start")
        behind = assert_ok(run_cli("submit", "tests.tasks:add", "3", "4", "--limit", "db", "--expires", "1s",
                                   address=address)).strip()
        waiting = assert_ok(run_cli("submit", "tests.tasks:add", "5", "6", "--limit", "db", address=address)).strip()

        st, scheduled, limited, table, one, one_json, limits = run_many([
            ("status", "--json"), ("jobs", "--state", "scheduled", "--json"), ("jobs", "--state", "limited", "--json"),
            ("jobs", "--state", "scheduled"), ("result", later_id), ("result", later_id, "--json"), ("limits",),
        ], address=address)
        status = json.loads(assert_ok(st))
        assert status["scheduled"] in (2, 3) and status["running"] == 1, status  # 3 while chatty is not due
        assert status["limited"] >= 1  # `behind` may have expired already
        due = {j["id"]: j["due_at"] for j in json.loads(assert_ok(scheduled))["jobs"]}
        assert set(due) - {chatty_id} == {later_id, at_id}
        assert submitted + 3600 <= due[later_id] <= time.time() + 3600  # wall clock, fixed at acceptance
        assert due[at_id] == pytest.approx(IN_AN_HOUR.timestamp(), abs=0.01)
        assert waiting in {j["id"] for j in json.loads(assert_ok(limited))["jobs"]}
        assert "due in 59m" in assert_ok(table) or "due in 1h" in table.stdout, show(table)
        assert assert_ok(one).startswith("scheduled due 20"), show(one)  # not a wait: it is not finished
        view = json.loads(assert_ok(one_json))
        assert (view["state"], view["priority"]) == ("scheduled", 3)
        assert view["due_at"] == pytest.approx(due[later_id], abs=0.01)  # converted from the monotonic clock
        assert "db" in assert_ok(limits) and "concurrency:1" in limits.stdout, show(limits)
        rows = {r["key"]: r for r in json.loads(assert_ok(run_cli("limits", "--json", address=address)))["limits"]}
        assert (rows["db"]["running"], rows["db"]["rule"]) == (1, "concurrency:1") and rows["db"]["waiting"] >= 1

        # Expired: its own state, not failed; `result --json` says so (exit 1, as for any job that did not succeed).
        wait_until(lambda: client.job_info(behind)[0]["state"] == "expired", what="the limited job to expire")
        wait_until(lambda: client.job_info(chatty_id)[0]["state"] == "succeeded", what="the chatty job to run")
        expired, listed, text, status_text = run_many([
            ("result", behind, "--json"), ("jobs", "--state", "expired", "--json"), ("result", behind), ("status",),
        ], address=address)
        assert "1 expired" in assert_ok(status_text) and "2 scheduled" in status_text.stdout, show(status_text)
        assert expired.returncode == 1, show(expired)
        record = json.loads(expired.stdout)
        assert record["state"] == "expired" and record["error"]["kind"] == "expired" and record["attempts"] == 0
        assert [j["id"] for j in json.loads(assert_ok(listed))["jobs"]] == [behind]
        assert "expired" in assert_one_error_line(text, 1)

        def counted() -> dict[str, Any] | None:  # the metrics say it too (a snapshot a second, so it may
            m = scrape(port)                       # predate the chatty job's start: wait for both facts)
            expired = m.get("conveyor_jobs_total", {}).get((("function", "tests.tasks:add"), ("state", "expired")))
            return m if expired == 1 and m.get("conveyor_jobs_scheduled", {}).get(()) == 2 else None

        m = wait_until(counted, what="the expired job in the metrics")
        assert m["conveyor_jobs_scheduled"][()] == 2 and m["conveyor_jobs_limited"][()] >= 1
        assert m["conveyor_limit_running"][(("key", "db"),)] == 1 and m["conveyor_limit_waiting"][(("key", "db"),)] >= 1
        assert m["conveyor_limit_starts_total"][(("key", "db"),)] == 1 and m["conveyor_limited_starts_total"][()] == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{board}/api/snapshot", timeout=10) as r:  # the dashboard
            snap = json.loads(r.read())
        assert (snap["scheduled"], snap["totals"]["expired"]) == (2, 1) and snap["limited"] >= 1
        assert {k["key"]: k["running"] for k in snap["limits"]} == {"db": 1}

        # An unknown key is refused (exit 2), a key set at run time is used at once, and a rate limit works.
        unknown = run_cli("submit", "tests.tasks:add", "1", "--limit", "nobody", address=address)
        assert "unknown limit key 'nobody'" in assert_one_error_line(unknown, 2)
        assert_ok(run_cli("limits", "--set", "api=50/s,burst=2", "--remove", "db", address=address))
        rows = {r["key"]: r for r in json.loads(assert_ok(run_cli("limits", "--json", address=address)))["limits"]}
        assert set(rows) == {"api"} and rows["api"]["rule"] == "50/s,burst=2"
        fast, rated = run_many([
            ("submit", "tests.tasks:add", "2", "3", "--limit", "api", "--priority", "9", "--wait"),
            ("submit", "tests.tasks:add", "4", "5", "--rate-limit", "20/s", "--wait", "--json"),
        ], address=address)
        assert assert_ok(fast).strip() == "5"
        assert json.loads(assert_ok(rated))["result"] == 9
        assert client.job_info(waiting)[0]["state"] == "limited"  # db was removed: it waits for it to come back
        assert_ok(run_cli("limits", "--set", "db=concurrency:2", address=address))
        assert client.result(waiting, timeout=20) == 11
        client.cancel(busy_id)
        out, err = follow.communicate(timeout=30)
        assert follow.returncode == 0 and out == "late out 0\n", (out, err)
    finally:
        if follow is not None:
            stop_process(follow)
        cluster.stop()

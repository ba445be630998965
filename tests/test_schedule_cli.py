"""`conveyor schedule ...` as real subprocesses against a real dispatcher and worker."""

from __future__ import annotations

import json
import sys

import pytest

from conveyor import Client
from tests.conftest import Cluster, wait_until
from tests.test_cli import assert_ok, assert_one_error_line, run_cli, run_many


def test_schedule_commands_end_to_end(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    address = cluster.address
    added = json.loads(assert_ok(run_cli(
        "schedule", "add", "tick", "tests.schedule_tasks:job_context", "--every", "1s", "--overlap", "allow",
        "--retries", "1", "--json", address=address,
    )))
    assert added["name"] == "tick" and added["every_s"] == 1.0 and added["overlap"] == "allow"
    listed, shown, preview, berlin = run_many([
        ("schedule", "list", "--json"),
        ("schedule", "show", "tick"),
        ("schedule", "preview", "tick", "--count", "3"),
        ("schedule", "preview", "--cron", "30 2 * * *", "--tz", "Europe/Berlin", "--count", "2", "--json"),
    ], address=address)
    assert [s["name"] for s in json.loads(assert_ok(listed))["schedules"]] == ["tick"]
    assert "every 1 s from the Unix epoch" in assert_ok(shown)
    lines = assert_ok(preview).splitlines()
    assert len(lines) == 3 and all(line.count("UTC") == 2 for line in lines), lines  # zone (UTC) and UTC
    slots = json.loads(assert_ok(berlin))["preview"]
    assert len(slots) == 2 and all(s["local"].endswith(("+01:00", "+02:00")) and s["utc"].endswith("+00:00")
                                   for s in slots)
    with Client(address) as client:
        wait_until(lambda: any(j["id"].startswith("sched:tick:") and j["state"] == "succeeded"
                               for j in client.jobs(limit=1000)[0]), 10, what="a slot of `tick` to run")
    assert "paused:       yes" in assert_ok(run_cli("schedule", "pause", "tick", address=address))
    assert "paused:       no" in assert_ok(run_cli("schedule", "resume", "tick", address=address))
    triggered = json.loads(assert_ok(run_cli("schedule", "trigger", "tick", "--wait", "--json", address=address)))
    assert triggered["id"] == "sched:tick:manual:1" and triggered["result"]["schedule"] == "tick"
    filled = assert_ok(run_cli("schedule", "backfill", "tick", "--from", "2026-01-01T00:00:00Z",
                               "--to", "2026-01-01T00:00:02", address=address)).split()
    assert filled == [f"sched:tick:2026-01-01T00:00:0{s}.000Z" for s in range(3)], filled
    assert_ok(run_cli("schedule", "delete", "tick", address=address))
    assert assert_ok(run_cli("schedule", "list", address=address)).strip() == "no schedules"


def _in_process(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`conveyor ARGS` through the CLI's own main() in this process (no interpreter start-up): (exit code, stderr)."""
    from conveyor.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["conveyor", *args])
        with pytest.raises(SystemExit) as exited:
            main()
    return int(exited.value.code or 0), capsys.readouterr().err


def test_bad_schedule_input_is_one_line(cluster: Cluster, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DISPATCHER", cluster.address)
    fn = "tests.schedule_tasks:job_context"
    cases = [
        (("add", "x", fn, "--cron", "61 * * * *"), "bad cron expression"),  # refused by the dispatcher
        (("add", "x", fn, "--every", "0.5s"), "at least 1 second"),
        (("add", "x", fn, "--every", "1m", "--cron", "@daily"), "exactly one of cron"),
        (("add", "x", fn, "--cron", "@daily", "--tz", "Mars/Base"), "unknown time zone"),
        (("add", "x", fn, "--every", "1m", "--misfire", "never"), "misfire must be one of"),
        (("add", "x", "nocolon", "--every", "1m"), "bad function"),
        (("add", "a b", fn, "--every", "1m"), "bad schedule name"),
        (("add", "x", fn, "--every", "1m", "--retries", "-1"), "retries"),
        (("add", "x", fn, "-1", "--evry", "1m"), "no such option: --evry"),
        (("add", "x", fn, "--every", "1m", "--kwargs", '{"tz": 1}'), "cannot name tz"),
        (("preview", "x", "--cron", "@daily"), "not both"),
        (("preview", "--cron", "@daily", "--count", "0"), "count must be"),
        (("pause", "x", "--until", "soonish"), "--until"),
        (("backfill", "x", "--from", "yesterday", "--to", "2026-01-01"), "--from"),
    ]
    for args, words in cases:
        code, err = _in_process(("schedule", *args), capsys)
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, err)
    code, err = _in_process(("schedule", "show", "nope"), capsys)
    assert code == 1 and err.strip() == "error: no schedule 'nope'", err
    # And once through the real entry point, with no dispatcher at all: checked before connecting.
    run = run_cli("schedule", "add", "x", fn, "--every", "0.5s", address="tcp://127.0.0.1:9")
    assert "at least 1 second" in assert_one_error_line(run, 2)

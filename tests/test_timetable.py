"""Schedules in a real dispatcher: every slot gets exactly one job, across kill -9 at random moments."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import ROOT, Cluster, wait_until


def _slots(jobs: list[dict[str, object]], name: str) -> dict[float, str]:
    """slot (Unix time) -> state, for the jobs of schedule `name`."""
    out = {}
    for job in jobs:
        job_id = str(job["id"])
        prefix = f"sched:{name}:"
        if job_id.startswith(prefix) and ":manual:" not in job_id:
            out[datetime.fromisoformat(job_id[len(prefix):]).timestamp()] = str(job["state"])
    return out


def _kill_9(cluster: Cluster) -> None:
    assert cluster.dispatcher is not None
    cluster.dispatcher.send_signal(signal.SIGKILL)
    cluster.dispatcher.wait()
    if cluster.dispatcher.stdout is not None:
        cluster.dispatcher.stdout.close()


SOAK_S = float(os.environ.get("CONVEYOR_SCHEDULE_SOAK_S", "12"))  # several minutes for the note's figures


@pytest.mark.timeout(SOAK_S + 120)
def test_every_slot_runs_once_across_kill_9(cluster: Cluster, tmp_path: Path) -> None:
    """Two 1-second schedules, the dispatcher killed at random moments: `all` catches every missed slot up,
    `once` runs only the latest slot of each downtime; outside downtimes every slot runs; none twice."""
    schedules = tmp_path / "schedules.toml"
    schedules.write_text(
        '[schedules.all]\nevery = "1s"\ntask = "tests.tasks:noop"\nmisfire = "all"\noverlap = "allow"\n'
        '[schedules.once]\nevery = "1s"\ntask = "tests.tasks:noop"\nmisfire = "once"\noverlap = "allow"\n'
    )
    _kill_9(cluster)  # the fixture's dispatcher has no schedules file
    started = time.time()
    cluster.start_dispatcher("--schedules", str(schedules))
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    rng = random.Random(os.getpid())
    down: list[tuple[float, float]] = []  # (killed, up again) windows, wall time
    while time.time() - started < SOAK_S:  # killed at random moments: mid-commit, mid-fire, between slots
        time.sleep(rng.uniform(0.2, 3.0))
        killed = time.time()
        _kill_9(cluster)
        time.sleep(rng.uniform(2.2, 3.5))  # two or three slots pass while it is down
        cluster.start_dispatcher("--schedules", str(schedules))
        down.append((killed, time.time()))
    end = time.time()
    client = cluster.client()

    def caught_up() -> tuple[dict[float, str], dict[float, str]] | None:
        jobs = client.jobs(limit=10_000)[0]
        every, once = _slots(jobs, "all"), _slots(jobs, "once")
        done = {s: st for s, st in every.items() if s <= end}
        ok = done and max(done) >= end - 1 and set(done.values()) == {"succeeded"}
        return (every, once) if ok else None

    every, once = wait_until(caught_up, 60, what="every slot up to the end to have run")
    fired = sorted(s for s in every if s <= end)
    first = fired[0]
    assert first <= started + 3, "the schedule did not start with the dispatcher"
    # misfire=all: one job per slot, none missing, downtimes included.
    assert fired == [first + i for i in range(len(fired))], f"gaps or doubles: {fired}"
    slots = fired[:-1]  # the last one may not have had its `once` twin yet
    ran = set(once)
    skipped = 0
    for killed, up in down:
        # Slots surely missed: due while no dispatcher ran. Only the latest of them may run (misfire=once).
        missed = [s for s in slots if killed + 0.2 < s < up - 0.2]
        assert not ran & set(missed[:-1]), f"missed slots ran: {sorted(ran & set(missed[:-1]))} (down {killed}-{up})"
        skipped += len(missed[:-1])
    for s in slots:
        if not any(killed - 0.5 < s < up + 1.5 for killed, up in down):
            assert s in ran, f"slot {s} ran in the schedule `all` but not in `once`, with the dispatcher up"
    print(f"\n{len(down)} kill -9 in {end - started:.0f} s: misfire=all ran {len(fired)} slots (no gap, none twice);"
          f" misfire=once ran {len(ran)}, skipped at least {skipped} missed")


def test_schedules_file_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[schedules.tick]\ncron = "61 * * * *"\ntask = "tests.tasks:noop"\n')
    run = subprocess.run(
        [sys.executable, "-m", "conveyor", "dispatcher", "--no-journal", "--schedules", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "schedule 'tick'" in run.stderr and "cron" in run.stderr, run.stderr

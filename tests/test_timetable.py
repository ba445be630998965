"""Schedules in a real dispatcher: every slot gets exactly one job, across kill -9 at random moments."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

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


def test_every_slot_runs_once_across_kill_9(cluster: Cluster, tmp_path: Path) -> None:
    schedules = tmp_path / "schedules.toml"
    schedules.write_text(
        '[schedules.tick]\nevery = "1s"\ntask = "tests.tasks:noop"\nargs = ["tick"]\n'
        'misfire = "all"\noverlap = "allow"\n'
    )
    _kill_9(cluster)  # the fixture's dispatcher has no schedules file
    started = time.time()
    cluster.start_dispatcher("--schedules", str(schedules))
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    rng = random.Random(7)
    for _ in range(4):  # killed at random moments: mid-commit, mid-fire, between slots
        time.sleep(rng.uniform(0.3, 2.0))
        _kill_9(cluster)
        time.sleep(rng.uniform(0.2, 1.5))  # slots pass while it is down: caught up (misfire=all)
        cluster.start_dispatcher("--schedules", str(schedules))
    end = time.time()
    client = cluster.client()

    def caught_up() -> dict[float, str] | None:
        slots = _slots(client.jobs(limit=10_000)[0], "tick")
        done = {s: st for s, st in slots.items() if s <= end}
        return slots if done and max(done) >= end - 1 and set(done.values()) == {"succeeded"} else None

    slots = wait_until(caught_up, 30, what="every slot up to now to have run")
    fired = sorted(s for s in slots if s <= end)
    first = fired[0]
    assert first <= started + 2, "the schedule did not start with the dispatcher"
    # One job per slot, none missing: every second from the first slot on, downtime included.
    assert fired == [first + i for i in range(len(fired))], f"gaps or doubles: {fired}"
    assert len(fired) >= int(end - started) - 1


def test_schedules_file_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[schedules.tick]\ncron = "61 * * * *"\ntask = "tests.tasks:noop"\n')
    run = subprocess.run(
        [sys.executable, "-m", "conveyor", "dispatcher", "--no-journal", "--schedules", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "schedule 'tick'" in run.stderr and "cron" in run.stderr, run.stderr

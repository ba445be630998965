"""Schedules from the Python API, over a real dispatcher and worker: an every-second schedule fires and its
jobs run, pause and resume, trigger, backfill, delete, a run-time schedule across kill -9; and
conveyor.current_job() in every mode."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import AsyncClient, Client
from tests import schedule_tasks
from tests.conftest import Cluster, wait_until


def slot_jobs(client: Client, name: str, states: tuple[str, ...] = ("succeeded",)) -> dict[float, str]:
    """slot (Unix time) -> job id, for the slot jobs of schedule `name` in these states."""
    out = {}
    prefix = f"sched:{name}:"
    for job in client.jobs(limit=10_000)[0]:
        job_id = str(job["id"])
        if job_id.startswith(prefix) and ":manual:" not in job_id and job["state"] in states:
            out[datetime.fromisoformat(job_id[len(prefix):]).timestamp()] = job_id
    return out


@pytest.fixture(scope="module")
def threads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("schedule-api")))
    c.start_dispatcher()
    try:
        c.wait_for_workers(c.start_worker("threads", 4))
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(threads: Cluster) -> Iterator[Client]:
    with Client(threads.address) as c:
        yield c


def test_an_every_second_schedule_fires_and_its_jobs_run_with_their_slot(client: Client) -> None:
    view = client.schedule("tick", schedule_tasks.job_context, every=timedelta(seconds=1), overlap="allow")
    assert view["name"] == "tick" and view["every_s"] == 1.0 and view["misfire"] == "once"
    jobs = wait_until(lambda: len(slot_jobs(client, "tick")) >= 2 and slot_jobs(client, "tick"), 10,
                      what="two slots of `tick` to run")
    slot, job_id = sorted(jobs.items())[0]
    assert job_id == f"sched:tick:{datetime.fromtimestamp(slot, UTC).isoformat(timespec='milliseconds')[:-6]}Z"
    assert slot == int(slot), "an every=1s slot is on a whole second (anchored to the epoch)"
    ran = client.result(job_id, timeout=10)
    assert ran["job_id"] == job_id and ran["schedule"] == "tick" and ran["slot"] == slot and ran["attempt"] == 1
    listed = {s["name"]: s for s in client.schedules()}
    assert listed["tick"]["fired"] >= 2 and listed["tick"]["next_run"] > slot
    assert client.schedule_info("tick")["last_job"].startswith("sched:tick:")
    slots = client.preview("tick", 3)
    assert [b - a for a, b in itertools.pairwise(slots)] == [timedelta(seconds=1)] * 2
    client.unschedule("tick")


def test_pause_stops_the_slots_and_resume_runs_the_latest_missed_one(client: Client) -> None:
    client.schedule("pausy", schedule_tasks.job_context, every=1, overlap="allow")
    wait_until(lambda: slot_jobs(client, "pausy"), 10, what="a first slot of `pausy`")
    paused = client.pause("pausy")
    paused_at = time.time()
    assert paused["paused"] and paused["next_run"] is None
    # Nothing fires while paused: wait for 2.5 slots to pass (a condition on the clock, with a deadline).
    wait_until(lambda: time.time() > paused_at + 2.5, 5, what="2.5 s of pause")
    during = [s for s in slot_jobs(client, "pausy", ("succeeded", "running", "queued")) if s > paused_at + 0.5]
    assert during == [], f"slots fired while paused: {during}"
    before = client.schedule_info("pausy")["skipped"]
    resumed = client.resume("pausy")
    assert not resumed["paused"]
    # misfire=once (the default): the latest missed slot runs, the others are counted as skipped.
    wait_until(lambda: [s for s in slot_jobs(client, "pausy") if s > paused_at + 0.5], 10,
               what="a slot after the resume")
    assert client.schedule_info("pausy")["skipped"] >= before + 1
    until = client.pause("pausy", until=timedelta(hours=1))
    assert until["paused"] and until["paused_until"] == pytest.approx(time.time() + 3600, abs=5)
    client.unschedule("pausy")


def test_trigger_runs_once_now_with_its_own_id(client: Client) -> None:
    client.schedule("nightly", schedule_tasks.job_context, cron="0 3 * * *", tz="Europe/Berlin")
    job_id = client.trigger("nightly")
    assert job_id == "sched:nightly:manual:1"
    ran = client.result(job_id, timeout=10)
    assert ran == {**ran, "job_id": job_id, "schedule": "nightly", "slot": None, "attempt": 1}
    assert client.trigger("nightly") == "sched:nightly:manual:2"
    client.unschedule("nightly")


def test_backfill_creates_the_slots_in_the_range_once(client: Client) -> None:
    client.schedule("daily", schedule_tasks.job_context, cron="0 3 * * *", overlap="allow")
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight - timedelta(days=3)
    ids = client.backfill("daily", start, midnight)
    expected = [f"sched:daily:{(start + timedelta(days=d, hours=3)).isoformat(timespec='milliseconds')[:-6]}Z"
                for d in range(3)]
    assert ids == expected
    assert client.backfill("daily", start, midnight) == [], "a slot whose job the dispatcher holds is not run again"
    for job_id in ids:
        assert client.result(job_id, timeout=10)["slot"] == datetime.fromisoformat(job_id[12:]).timestamp()
    client.unschedule("daily")


def test_delete_and_every_bad_value_is_one_clear_value_error(client: Client) -> None:
    client.schedule("gone", schedule_tasks.job_context, cron="@hourly")
    client.unschedule("gone")
    assert "gone" not in {s["name"] for s in client.schedules()}
    for call, message in [
        (lambda: client.schedule_info("gone"), "no schedule 'gone'"),
        (lambda: client.unschedule("gone"), "no schedule 'gone'"),
        (lambda: client.schedule("x", schedule_tasks.job_context), "exactly one of cron"),
        (lambda: client.schedule("x", schedule_tasks.job_context, cron="* * * * *", every=5), "exactly one of cron"),
        (lambda: client.schedule("x", schedule_tasks.job_context, every=0.5), "at least 1 second"),
        (lambda: client.schedule("x", schedule_tasks.job_context, every="10 parsecs"), "bad duration"),
        (lambda: client.schedule("x", schedule_tasks.job_context, cron="61 * * * *"), "bad cron expression"),
        (lambda: client.schedule("x", schedule_tasks.job_context, cron="@daily", tz="Mars/Olympus"), "time zone"),
        (lambda: client.schedule("x", schedule_tasks.job_context, every=60, misfire="never"), "misfire"),
        (lambda: client.schedule("x", schedule_tasks.job_context, every=60, overlap="both"), "overlap"),
        (lambda: client.schedule("a b", schedule_tasks.job_context, every=60), "bad schedule name"),
        (lambda: client.options(countdown=5).schedule("x", schedule_tasks.job_context, every=60), "its slot"),
        (lambda: client.pause("x", until=datetime(2030, 1, 1)), "no time zone"),
        (lambda: client.pause("x", until=time.time() + 60), "for a time, pass a datetime"),
        (lambda: client.backfill("x", datetime.now(UTC), datetime.now(UTC) - timedelta(1)), "before start"),
        (lambda: client.preview("x", 0), "count"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        text = str(info.value)
        assert message in text and "\n" not in text, text
    assert "x" not in {s["name"] for s in client.schedules()}


def test_task_options_of_a_view_apply_to_every_run_and_preview_of_a_spec(client: Client) -> None:
    view = client.options(retries=1, retry_on=["RuntimeError"], tags=[], priority=5)
    view.schedule("retried", schedule_tasks.fail_first_attempt, cron="0 3 1 1 *")
    assert client.result(client.trigger("retried"), timeout=10) == 2  # the retry option came along: attempt 2
    client.unschedule("retried")
    # A spec not stored: across Berlin's fall-back day, 02:30 once (CEST), at 00:30 UTC.
    slots = client.preview({"cron": "30 2 * * *", "tz": "Europe/Berlin"}, 2)
    assert all(s.tzinfo is not None and str(s.tzinfo) == "Europe/Berlin" for s in slots)
    assert slots[1] - slots[0] in (timedelta(hours=23), timedelta(hours=24), timedelta(hours=25))


def test_async_client_schedules(threads: Cluster) -> None:
    async def main() -> None:
        async with AsyncClient(threads.address) as c:
            await c.schedule("yearly", schedule_tasks.job_context, cron="0 3 1 1 *", overlap="allow")
            assert "yearly" in [s["name"] for s in await c.schedules()]
            job_id = await c.trigger("yearly")
            assert (await c.result(job_id, timeout=10))["schedule"] == "yearly"
            assert (await c.pause("yearly"))["paused"]
            assert not (await c.resume("yearly"))["paused"]
            assert [s.month for s in await c.preview("yearly", 2)] == [1, 1]
            assert (await c.schedule_info("yearly"))["name"] == "yearly"
            ids = await c.backfill("yearly", datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 12, 31, tzinfo=UTC))
            assert ids == ["sched:yearly:2024-01-01T03:00:00.000Z", "sched:yearly:2025-01-01T03:00:00.000Z"]
            await c.unschedule("yearly")
            with pytest.raises(ValueError, match="no schedule"):
                await c.schedule_info("yearly")

    asyncio.run(main())


def test_a_run_time_schedule_survives_kill_9_without_running_a_slot_twice(cluster: Cluster, tmp_path: Path) -> None:
    """Restored from the journal (no schedules file): it keeps firing, and no slot that ran runs again."""
    log = tmp_path / "runs.log"
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    with Client(cluster.address, reconnect_timeout=30) as client:
        client.schedule("durable", schedule_tasks.job_context, str(log), every=1, misfire="all", overlap="allow")
        # Three slots ran; the first two finished a slot earlier, so their outcome is surely in the journal.
        ran = wait_until(lambda: len(slot_jobs(client, "durable")) >= 3 and slot_jobs(client, "durable"), 10,
                         what="three slots to run before the kill")
        before = dict(sorted(ran.items())[:2])
        fired = client.schedule_info("durable")["fired"]
        assert cluster.dispatcher is not None
        cluster.dispatcher.send_signal(signal.SIGKILL)
        cluster.dispatcher.wait()
        assert cluster.dispatcher.stdout is not None
        cluster.dispatcher.stdout.close()
        killed = time.time()
        cluster.start_dispatcher()
        view = wait_until(lambda: _info(client, "durable"), 20, what="the schedule back after the restart")
        assert view["fired"] >= fired and view["last_slot"] >= max(before)

        def caught_up() -> list[float] | None:  # misfire=all: every slot, the downtime's included, no gap
            slots = sorted(slot_jobs(client, "durable"))
            ok = slots[-1] > killed + 1 and slots == [slots[0] + i for i in range(len(slots))]
            return slots if ok else None

        slots = wait_until(caught_up, 20, what="the slots after the restart, and those of the downtime, to run")
        assert slots[0] == min(before)
        runs = log.read_text().split()
        again = sorted({r for r in runs if runs.count(r) > 1 and r in before.values()})
        assert not again, f"slots that had run before the kill ran again: {again}"
        client.unschedule("durable")


def _info(client: Client, name: str) -> dict[str, Any] | None:
    try:
        return client.schedule_info(name, timeout=2)
    except Exception:
        return None


# --- conveyor.current_job() -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("current-job")))
    c.start_dispatcher()
    try:
        c.wait_for_workers(c.start_worker("processes", 1), c.start_worker("asyncio", 4), c.start_worker("threads", 2))
        yield c
    finally:
        c.stop()


def test_current_job_is_none_outside_a_task() -> None:
    assert conveyor.current_job() is None


@pytest.mark.parametrize("mode", ["threads", "processes", "asyncio"])
def test_current_job_in_every_mode(modes: Cluster, mode: str) -> None:
    with Client(modes.address) as client:
        view = client.options(mode=mode)
        fut = view.submit(schedule_tasks.job_context)
        got = fut.result(10)
        assert got["job_id"] == fut.job_id and got["attempt"] == 1 and got["schedule"] is None
        assert got["slot"] is None
        retried = client.options(mode=mode, retries=1, retry_on=["RuntimeError"]).submit(
            schedule_tasks.fail_first_attempt)
        assert retried.result(10) == 2
        if mode == "asyncio":  # a coroutine on the loop, and a plain function in the loop's thread pool
            coro = view.submit(schedule_tasks.async_job_context)
            assert coro.result(10)["job_id"] == coro.job_id
        view.schedule(f"in-{mode}", schedule_tasks.job_context, cron="0 3 1 1 *")
        job_id = view.trigger(f"in-{mode}")
        assert client.result(job_id, timeout=10)["schedule"] == f"in-{mode}"
        client.unschedule(f"in-{mode}")

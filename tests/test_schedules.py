"""Schedules, pure, with a fake wall clock: slots, daylight saving, missed runs, overlap, jitter, edits."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from conveyor.dispatcher.schedules import Schedules, Spec, jitter, job_id, slots_after


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def local(t: float, tz: str) -> str:
    return datetime.fromtimestamp(t, ZoneInfo(tz)).isoformat()


def make(unfinished: set[str] | None = None) -> Schedules:
    running = unfinished if unfinished is not None else set()
    return Schedules(lambda job: job in running)


# --- slots -----------------------------------------------------------------------------------------------------


def test_intervals_are_anchored_to_the_epoch_not_to_the_start() -> None:
    spec = Spec("every15m", every_s=900.0, offset_s=60.0)
    after = ts("2026-01-01T10:07:00")
    assert [datetime.fromtimestamp(t, UTC).strftime("%H:%M") for t in slots_after(spec, after, 3)] == [
        "10:16", "10:31", "10:46"]


def test_cron_nicknames_and_seconds() -> None:
    assert len(slots_after(Spec("h", cron="@hourly"), ts("2026-01-01T10:30:00"), 2)) == 2
    six = slots_after(Spec("s", cron="*/20 * * * * *"), ts("2026-01-01T10:00:00"), 3)  # seconds first
    assert [t - ts("2026-01-01T10:00:00") for t in six] == [20.0, 40.0, 60.0]


@pytest.mark.parametrize(
    ("tz", "cron", "start", "expect"),
    [
        # 2025-03-30: 02:00-03:00 does not exist in Berlin: a fixed-time 02:30 job fires once, at 03:00
        ("Europe/Berlin", "30 2 * * *", "2025-03-29T12:00",
         ["2025-03-30T03:00:00+02:00", "2025-03-31T02:30:00+02:00"]),
        # 2025-10-26: 02:00-03:00 happens twice: it fires once (the first), not twice
        ("Europe/Berlin", "30 2 * * *", "2025-10-25T12:00",
         ["2025-10-26T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]),
        ("America/New_York", "30 2 * * *", "2025-03-08T12:00",
         ["2025-03-09T03:00:00-04:00", "2025-03-10T02:30:00-04:00"]),
        ("America/New_York", "30 1 * * *", "2025-11-01T12:00",
         ["2025-11-02T01:30:00-04:00", "2025-11-03T01:30:00-05:00"]),
        # Lord Howe shifts by 30 minutes: 02:00-02:30 is skipped on 2025-10-05
        ("Australia/Lord_Howe", "15 2 * * *", "2025-10-04T12:00",
         ["2025-10-05T02:30:00+11:00", "2025-10-06T02:15:00+11:00"]),
    ],
)
def test_daylight_saving_fires_once(tz: str, cron: str, start: str, expect: list[str]) -> None:
    spec = Spec("dst", cron=cron, tz=tz)
    assert [local(t, tz) for t in slots_after(spec, ts(start, tz), 2)] == expect


def test_an_hourly_wildcard_schedule_keeps_real_time_across_fall_back() -> None:
    spec = Spec("h", cron="0 * * * *", tz="Europe/Berlin")
    got = slots_after(spec, ts("2025-10-26T00:30", "Europe/Berlin"), 4)
    assert [b - a for a, b in itertools.pairwise(got)] == [3600.0, 3600.0, 3600.0]  # 02:00 twice


def test_bad_specs_are_refused_readably() -> None:
    for spec, words in [
        (Spec("x"), "exactly one of cron or every"),
        (Spec("x", cron="61 * * * *"), "bad cron expression"),
        (Spec("x", every_s=0.5), "at least 1 second"),
        (Spec("x", cron="@hourly", tz="Mars/Olympus"), "unknown time zone"),
        (Spec("x", cron="@hourly", misfire="sometimes"), "misfire"),
        (Spec("bad name!", cron="@hourly"), "schedule name"),
    ]:
        with pytest.raises(ValueError, match=words):
            spec.check()


# --- firing ----------------------------------------------------------------------------------------------------


def test_one_job_per_slot_with_the_slot_in_its_id() -> None:
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("tick", every_s=60.0), [b"call"], b"\x80", t0)
    assert s.due(t0 + 30) == []
    [fire] = s.due(t0 + 60)
    assert fire.job_id == "sched:tick:2026-01-01T00:01:00.000Z" == job_id("tick", t0 + 60)
    assert s.due(t0 + 61) == []  # the same slot never fires twice
    assert s.next_wake() == t0 + 120


def test_an_edit_never_fires_at_once() -> None:
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("e", every_s=60.0), [b"c"], b"\x80", t0)
    s.due(t0 + 60)
    s.upsert(Spec("e", every_s=3600.0), [b"c"], b"\x80", t0 + 90)  # changed after a slot: next is the new spec's
    assert s.due(t0 + 91) == []
    assert s.next_wake() == ts("2026-01-01T01:00:00")


@pytest.mark.parametrize(
    ("misfire", "expect_fired", "expect_skipped"), [("skip", 0, 10), ("once", 1, 9), ("all", 5, 5)]
)
def test_missed_slots_follow_the_misfire_policy(misfire: str, expect_fired: int, expect_skipped: int) -> None:
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("m", every_s=60.0, misfire=misfire, max_catchup=5, overlap="allow"), [b"c"], b"\x80", t0)
    fires = s.due(t0 + 600 + 30)  # down for 10 slots, none on time now
    assert len(fires) == expect_fired
    assert s.entries["m"].state.skipped == expect_skipped
    if misfire == "once":
        assert fires[0].slot == t0 + 600  # only the latest
    if misfire == "all":
        assert [f.slot for f in fires] == [t0 + 60 * k for k in range(6, 11)]  # the cap, oldest first


def test_slots_older_than_the_catch_up_window_never_run() -> None:
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("w", every_s=3600.0, misfire="all", catchup_window_s=3 * 3600, overlap="allow"), [b"c"], b"\x80", t0)
    fires = s.due(t0 + 48 * 3600 + 5)  # two days down
    assert [f.slot for f in fires] == [t0 + 3600 * k for k in (46, 47, 48)]
    assert s.entries["w"].state.skipped == 45


def test_a_wall_clock_stepped_back_never_refires_a_slot() -> None:
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("b", every_s=60.0), [b"c"], b"\x80", t0)
    assert len(s.due(t0 + 120)) == 1  # misfire once: the slot of 00:02
    assert s.due(t0 + 60) == []  # the clock went back a minute: 00:01 and 00:02 stay fired
    assert s.due(t0 + 120) == []
    assert len(s.due(t0 + 180)) == 1


@pytest.mark.parametrize("overlap", ["skip", "queue_one", "allow", "cancel_previous"])
def test_overlap_with_a_previous_job_still_running(overlap: str) -> None:
    running: set[str] = set()
    s = make(running)
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("o", every_s=60.0, overlap=overlap), [b"c"], b"\x80", t0)
    [first] = s.due(t0 + 60)
    running.add(first.job_id)
    second = s.due(t0 + 120)
    state = s.entries["o"].state
    if overlap == "skip":
        assert second == [] and state.skipped == 1
    elif overlap == "queue_one":
        assert second == [] and state.queued_slot == t0 + 120
        running.discard(first.job_id)
        [queued] = s.job_ended(first.job_id, "succeeded")
        assert queued.slot == t0 + 120
    elif overlap == "allow":
        assert len(second) == 1 and s.cancel == []
    else:
        assert len(second) == 1 and s.cancel == [first.job_id]


def test_jitter_is_stable_and_keeps_the_nominal_slot() -> None:
    spec = Spec("j", every_s=60.0, jitter_s=30.0)
    offsets = {jitter(spec, 60.0 * k) for k in range(50)}
    assert all(0 <= o < 30 for o in offsets) and len(offsets) > 40
    assert jitter(spec, 120.0) == jitter(Spec("j", every_s=60.0, jitter_s=30.0), 120.0)  # same after a restart
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(spec, [b"c"], b"\x80", t0)
    [fire] = s.due(t0 + 60)
    assert fire.job_id == job_id("j", t0 + 60) and fire.due == t0 + 60 + jitter(spec, t0 + 60)


def test_pause_resume_trigger_backfill_and_pause_on_failure() -> None:
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("p", every_s=60.0, pause_on_failure=True, overlap="allow"), [b"c"], b"\x80", t0)
    s.pause("p")
    assert s.due(t0 + 600) == []
    s.resume("p")  # the slots missed while paused: misfire once
    [resumed] = s.due(t0 + 600)
    assert resumed.slot == t0 + 600
    manual = s.trigger("p", t0 + 601)
    assert manual.job_id == "sched:p:manual:1"
    filled = s.backfill("p", t0, t0 + 300, t0 + 602)
    assert [f.slot for f in filled] == [t0 + 60 * k for k in range(0, 6)]
    s.job_ended(resumed.job_id, "failed")
    assert s.entries["p"].state.paused  # pause_on_failure
    s.pause("p", until=t0 + 900)
    assert s.due(t0 + 899) == []
    assert s.due(t0 + 900) != []  # the pause ran out


def test_ten_thousand_schedules_share_one_heap() -> None:
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    for i in range(10_000):
        s.upsert(Spec(f"s{i}", every_s=60.0), [b"c"], b"\x80", t0)
    assert s.due(t0 + 59) == []
    assert len(s.due(t0 + 60)) == 10_000
    assert s.next_wake() == t0 + 120


@pytest.mark.parametrize(("overlap", "expect_fired", "expect_queued"), [("skip", 1, False), ("queue_one", 1, True),
                                                                       ("allow", 4, False)])
def test_a_catch_up_and_a_backfill_go_through_the_overlap_policy(
    overlap: str, expect_fired: int, expect_queued: bool
) -> None:
    """The slots of one batch overlap one another: with skip only the oldest runs (no storm after downtime)."""
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    s.upsert(Spec("c", every_s=60.0, misfire="all", overlap=overlap), [b"c"], b"\x80", t0)
    fires = s.due(t0 + 240 + 30)  # down for 4 slots
    assert len(fires) == expect_fired and fires[0].slot == t0 + 60
    assert (s.entries["c"].state.queued_slot is not None) == expect_queued
    s2 = make()
    s2.upsert(Spec("b", cron="0 3 * * *", overlap=overlap), [b"c"], b"\x80", t0 + 10 * 86400)
    filled = s2.backfill("b", t0, t0 + 4 * 86400, t0 + 10 * 86400)
    assert len(filled) == expect_fired


def test_a_fire_walks_only_the_slots_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each due cron schedule is walked two or three slots, not a batch ahead (10,000 fire every minute)."""
    from cronsim import CronSim

    from conveyor.dispatcher import schedules

    walked = 0

    class Counting(CronSim):
        def __next__(self) -> datetime:
            nonlocal walked
            walked += 1
            return super().__next__()

    monkeypatch.setattr(schedules, "CronSim", Counting)
    s = make()
    t0 = ts("2026-01-01T00:00:00")
    for i in range(100):
        s.upsert(Spec(f"c{i}", cron="* * * * *"), [b"c"], b"\x80", t0)
    walked = 0
    assert len(s.due(t0 + 60)) == 100
    assert walked <= 100 * 3, f"{walked} cron steps for 100 schedules"

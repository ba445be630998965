"""Work that waits, in the pure scheduler with a fake clock: priorities, delayed jobs, expiry, rate and
concurrency limits. Events in, actions out; every rule takes `now`."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conveyor.dispatcher.limits import Limits, Rule, parse_declaration, parse_rule
from conveyor.dispatcher.scheduler import (
    EXPIRED,
    LIMITED,
    OFFLOADED,
    QUEUED,
    RUNNING,
    SCHEDULED,
    Assign,
    Scheduler,
)
from conveyor.dispatcher.timing import check_limits, due_and_expiry, fix_times
from conveyor.protocol.commands import TaskOptions
from tests.test_scheduler import CLIENT, FRAMES, check_counters, ok, ready, run


def make(**kwargs: Any) -> Scheduler:
    kwargs.setdefault("rng", random.Random(7))
    return Scheduler(**kwargs)


def add(s: Scheduler, job_id: str, now: float = 0.0, due: float | None = None, expires: float | None = None,
        **opts: Any) -> None:
    s.submit(job_id, TaskOptions(fn="t:f", **opts), list(FRAMES), CLIENT, now, due, expires)


def started(actions: list[Any]) -> list[str]:
    return [j.id for a in actions if isinstance(a, Assign) for j in a.jobs]


# --- priorities ---------------------------------------------------------------------------------------------


def test_a_higher_priority_job_overtakes_a_backlog_within_the_window() -> None:
    """One worker, one slot, 10,000 priority-0 jobs queued, then one priority-5 job: it is the next to
    start, behind at most the jobs already in the worker's prefetch window."""
    s = make()
    w = ready(s, b"w", concurrency=1)
    w.prefetch, w.window = 4, 4  # a fixed window of 4 beyond the slot
    w.credit = w.capacity
    for i in range(10_000):
        add(s, f"low{i}")
    assert started(run(s)) == [f"low{i}" for i in range(5)]  # the slot and the window
    add(s, "urgent", now=1.0, priority=5)
    ok(s, b"w", "low0", 1)
    assert started(run(s, 1.0)) == ["urgent"]  # the next assignment: ahead of 9,995 older jobs
    check_counters(s)


def test_ties_keep_acceptance_order_and_priority_spans_classes() -> None:
    s = make()
    add(s, "a", mode="threads")
    add(s, "b", priority=2, tags=frozenset({"x"}))
    add(s, "c", priority=2)
    add(s, "d", priority=-1)
    ready(s, b"w", concurrency=4, mode="threads", tags=["x"])
    assert started(run(s)) == ["b", "c", "a", "d"]


def test_a_retry_keeps_its_priority_and_its_place() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    add(s, "first", priority=1)
    run(s)
    for i in range(3):
        add(s, f"later{i}", priority=1)
    s.expire_workers(10.0)  # first is lost: retried
    ready(s, b"w2", concurrency=1, now=10.0)
    assert started(run(s, 10.0)) == ["first"]  # ahead of the jobs accepted after it


def test_aging_lets_a_low_priority_job_through_a_saturating_stream() -> None:
    """aging=10 s: a priority-0 job starts before any priority-3 job accepted more than 30 s after it."""
    s = make(aging_s=10.0)
    ready(s, b"w", concurrency=1)
    add(s, "old-low", now=0.0, priority=0)
    add(s, "p3-0", now=0.0, priority=3)
    order: list[str] = []
    now = 0.0
    for step in range(1, 80):  # one priority-3 job a second, one start a second
        now = float(step)
        add(s, f"p3-{step}", now=now, priority=3)
        for j in started(run(s, now)):
            order.append(j)
            ok(s, b"w", j, 1, now=now)
    pos = order.index("old-low")
    overtakers = [j for j in order[:pos] if j.startswith("p3-")]
    assert all(int(j.split("-")[1]) <= 30 for j in overtakers), overtakers
    assert pos < 40


# --- delayed jobs and expiry ----------------------------------------------------------------------------------


def test_a_delayed_job_is_never_assigned_early_and_same_due_jobs_keep_submit_order() -> None:
    s = make()
    ready(s, b"w", concurrency=4)
    add(s, "late", due=60.0)
    add(s, "b", due=30.0)
    add(s, "a", due=30.0)
    assert run(s, 0.0) == [] and s.n_scheduled == 3 and s.jobs["b"].state == SCHEDULED
    assert s.next_timer() == 30.0  # computed, not polled
    s.tick(29.999)
    assert started(run(s, 29.999)) == []
    s.tick(30.0)
    assert started(run(s, 30.0)) == ["b", "a"]
    s.tick(60.0)
    assert started(run(s, 60.0)) == ["late"]
    check_counters(s)


def test_100k_delayed_jobs_produce_no_assign() -> None:
    s = make()
    ready(s, b"w", concurrency=8)
    for i in range(100_000):
        add(s, f"j{i}", due=3600.0)
    s.tick(10.0)
    assert run(s, 10.0) == [] and s.n_scheduled == 100_000 and s.n_queued == 0


def test_expiry_ends_a_job_not_started_in_its_own_state() -> None:
    s = make()
    add(s, "never-ran", due=100.0, expires=50.0)
    add(s, "queued", expires=5.0)
    ready(s, b"w", concurrency=1)
    add(s, "running", expires=5.0)  # queued behind "queued"? no: both fit
    s.tick(1.0)
    assert sorted(started(run(s, 1.0))) == ["queued"]
    s.tick(5.0)
    assert s.jobs["running"].state == EXPIRED and s.jobs["queued"].state == RUNNING  # started: never expires
    s.tick(50.0)
    assert s.jobs["never-ran"].state == EXPIRED and s.counts[EXPIRED] == 2
    assert s.jobs["never-ran"].result_info["kind"] == "expired"


def windowed(s: Scheduler, wid: bytes, window: int, concurrency: int = 1) -> Any:
    """A worker with a fixed prefetch window beyond its slots."""
    w = ready(s, wid, concurrency=concurrency)
    w.prefetch, w.window = window, window
    w.credit = w.capacity
    return w


def test_a_job_with_an_expiry_goes_only_into_a_free_slot_and_nothing_of_its_class_is_prefetched_past_it() -> None:
    """Assignment is start for a job with an expiry: it never waits in a worker's window past its expiry."""
    s = make()
    windowed(s, b"w", window=4)
    add(s, "busy")
    assert started(run(s)) == ["busy"]
    add(s, "exp", now=0.1, expires=1.0)
    add(s, "after", now=0.1)  # same class, behind it: not prefetched past it
    assert started(run(s, 0.1)) == [] and s.jobs["exp"].state == QUEUED
    ok(s, b"w", "busy", 1, now=0.5)
    got = started(run(s, 0.5))
    assert got == ["exp", "after"]  # into the free slot, and the next one behind it
    s.tick(2.0)
    assert s.jobs["exp"].state == RUNNING  # started in time: never expires
    check_counters(s)


def test_a_job_held_past_its_expiry_expires_and_a_slow_slot_makes_it_expire_in_the_dispatcher() -> None:
    s = make()
    windowed(s, b"w", window=4)
    add(s, "busy")
    run(s)
    add(s, "exp", now=0.1, expires=0.3)
    assert started(run(s, 0.2)) == []  # the slot is busy: it waits here ...
    s.tick(0.3)
    assert s.jobs["exp"].state == EXPIRED  # ... and ends expired, not run late
    assert s.jobs["exp"].result_info["type"] == "JobExpired"


def test_a_handed_back_job_never_started_so_its_expiry_still_applies() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    add(s, "exp", expires=5.0)
    assert started(run(s)) == ["exp"]
    s.worker_leaving(b"w")
    s.tick(6.0)  # past its expiry while the worker held it (it had not started it)
    assert s.jobs["exp"].state == RUNNING
    s.give_back(b"w", "exp", 1, 6.5)  # the drain hands it back unstarted
    assert s.jobs["exp"].history[-1]["handed_back"] is True
    s.tick(6.5)
    assert s.jobs["exp"].state == EXPIRED and s.counts[EXPIRED] == 1
    check_counters(s)


def test_hand_backs_keep_acceptance_order() -> None:
    """A window handed back (a stalled slot) goes back in its acceptance order, not reversed."""
    s = make()
    windowed(s, b"w", window=3)
    for i in range(5):
        add(s, f"j{i}")
    assert started(run(s)) == ["j0", "j1", "j2", "j3"]
    for i in (1, 2, 3):
        s.give_back(b"w", f"j{i}", 1, 1.0)
    s.workers[b"w"].window = 0  # the stalled slot closed the window
    ok(s, b"w", "j0", 1, now=2.0)
    order = []
    for k in range(4):
        got = started(run(s, 3.0 + k))
        order += got
        for j in got:
            ok(s, b"w", j, s.jobs[j].attempt, now=3.0 + k)
    assert order == ["j1", "j2", "j3", "j4"]


def test_a_limited_job_is_not_assigned_behind_a_better_job_in_one_assignment() -> None:
    """Into free slots only: one slot free, a better unlimited job takes it, the limited one waits."""
    s = make()
    s.limits.declare("db", Rule(concurrency=5), 0.0)
    windowed(s, b"w", window=4)
    add(s, "best", priority=5)
    add(s, "lim", limits=("db",))
    assert started(run(s)) == ["best"] and s.jobs["lim"].state == LIMITED
    ok(s, b"w", "best", 1)
    assert started(run(s, 1.0)) == ["lim"]


def test_cancelling_a_delayed_job_needs_no_worker() -> None:
    s = make()
    add(s, "d", due=100.0)
    assert s.cancel("d", 1.0) and s.n_scheduled == 0
    assert [j.id for j in s.drain_finished()] == ["d"]  # the journal records it


def test_the_call_of_a_job_due_far_ahead_leaves_memory() -> None:
    s = make()
    add(s, "soon", due=1.0)
    add(s, "far", due=3600.0)
    assert s.held_bytes == 2 * len(FRAMES[0])
    assert not s.offload("soon", 0.0) and s.offload("far", 0.0)
    assert s.jobs["far"].frames is OFFLOADED and s.held_bytes == len(FRAMES[0])
    ready(s, b"w", concurrency=2)
    s.tick(3600.0)
    [assign] = [a for a in run(s, 3600.0) if isinstance(a, Assign)]
    assert {j.id: j.frames is OFFLOADED for j in assign.jobs} == {"soon": False, "far": True}  # the loop reloads it
    s.reload(s.jobs["far"], [b"call"])
    assert s.held_bytes == 2 * len(FRAMES[0])


def test_times_are_fixed_at_acceptance() -> None:
    opts = fix_times(TaskOptions(countdown=10.0, expires_in=60.0), now_wall=1000.0)
    assert (opts.eta, opts.expires_at, opts.countdown, opts.expires_in) == (1010.0, 1060.0, None, None)
    assert due_and_expiry(opts, now=5.0, now_wall=1000.0) == (15.0, 65.0)
    with pytest.raises(ValueError, match="expire before it is due"):
        fix_times(TaskOptions(eta=2000.0, expires_at=1500.0), now_wall=1000.0)
    # overdue after a restart: due in the past, released at once
    assert due_and_expiry(TaskOptions(eta=900.0), now=5.0, now_wall=1000.0) == (-95.0, None)


# --- limits -------------------------------------------------------------------------------------------------


def test_rules_parse_readably() -> None:
    assert parse_rule("100/s,burst=20") == Rule(rate_per_s=100.0, burst=20)
    assert parse_rule("10/m") == Rule(rate_per_s=10 / 60)
    assert parse_rule("5/10s") == Rule(rate_per_s=0.5)
    assert parse_rule("concurrency:4") == Rule(concurrency=4)
    assert parse_declaration("db=concurrency:4") == ("db", Rule(concurrency=4))
    for bad in ("fast", "0/s", "10/q", "10/s,burst=0", "concurrency:0", "10/s,bust=3"):
        with pytest.raises(ValueError):
            parse_rule(bad)
    limits = Limits()
    with pytest.raises(ValueError, match="unknown limit key 'stripe'"):
        check_limits(TaskOptions(limits=("stripe",)), limits)
    with pytest.raises(ValueError):
        check_limits(TaskOptions(rate_limit="lots"), limits)


def test_a_concurrency_limit_holds_and_a_lost_worker_gives_its_slots_back() -> None:
    s = make()
    s.limits.declare("db", Rule(concurrency=2), 0.0)
    for i in range(6):
        add(s, f"j{i}", limits=("db",))
    ready(s, b"w", concurrency=8)
    assert started(run(s)) == ["j0", "j1"] and s.n_limited == 4 and s.jobs["j2"].state == LIMITED
    s.expire_workers(10.0)  # lost: its two attempts release the key
    ready(s, b"w2", concurrency=8, now=10.0)
    assert sorted(started(run(s, 10.0))) == ["j0", "j1"]  # retried first (they keep their place)
    ok(s, b"w2", "j0", 2, now=11.0)
    assert started(run(s, 11.0)) == ["j2"]


def test_a_limited_job_blocks_no_other_key_and_is_never_prefetched() -> None:
    s = make()
    s.limits.declare("slow", Rule(concurrency=1), 0.0)
    w = ready(s, b"w", concurrency=2)
    w.prefetch, w.window = 10, 10
    w.credit = w.capacity
    for i in range(3):
        add(s, f"s{i}", limits=("slow",), priority=9)
    for i in range(5):
        add(s, f"free{i}")
    got = started(run(s))
    assert got[0] == "s0" and "s1" not in got and len(got) == 1 + 5  # the others fill the slot and window
    assert s.jobs["s1"].state == LIMITED


def test_a_job_under_several_keys_starts_only_when_all_allow() -> None:
    s = make()
    s.limits.declare("a", Rule(concurrency=1), 0.0)
    s.limits.declare("b", Rule(concurrency=5), 0.0)
    add(s, "ab1", limits=("a", "b"))
    add(s, "ab2", limits=("a", "b"))
    add(s, "b1", limits=("b",))
    ready(s, b"w", concurrency=8)
    assert sorted(started(run(s))) == ["ab1", "b1"]


def test_a_rate_key_starts_empty_and_its_next_start_is_computed() -> None:
    s = make()
    s.limits.declare("api", Rule(rate_per_s=10.0, burst=3), 0.0)
    for i in range(10):
        add(s, f"j{i}", limits=("api",))
    ready(s, b"w", concurrency=10)
    assert started(run(s, 0.0)) == []  # empty bucket: nothing saved from before a restart
    assert s.next_timer() == pytest.approx(0.1)
    assert started(run(s, 0.1)) == ["j0"]
    assert started(run(s, 0.35)) == ["j1", "j2"]  # tokens accumulate up to the burst
    assert s.next_timer() == pytest.approx(0.4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.floats(0.5, 50.0), burst=st.integers(1, 10), workers=st.integers(1, 8),
    steps=st.lists(st.floats(0.0, 0.3), min_size=5, max_size=60),
)
def test_a_rate_limit_holds_over_every_window(rate: float, burst: int, workers: int, steps: list[float]) -> None:
    """Over any window of length t, starts under the key <= burst + rate * t, however many workers."""
    s = make()
    s.limits.declare("k", Rule(rate_per_s=rate, burst=burst), 0.0)
    for i in range(40):
        add(s, f"j{i}", limits=("k",))
    for i in range(workers):
        ready(s, f"w{i}".encode(), concurrency=4)
    now, starts = 0.0, []
    for dt in steps:
        now += dt
        for a in run(s, now):
            if isinstance(a, Assign):
                for j in a.jobs:
                    starts.append(now)
                    ok(s, a.worker, j.id, j.attempt, now=now)
    for i, t0 in enumerate(starts):
        for j in range(i, len(starts)):
            assert j - i + 1 <= burst + rate * (starts[j] - t0) + 1e-9


# --- a state machine over all of it -------------------------------------------------------------------------


class WaitingMachine(RuleBasedStateMachine):
    """Random jobs with priorities, due times, expiries and limit keys on workers that come and go (one with
    a prefetch window) and hand jobs back: no job is lost, none starts before it is due, none starts over a
    limit, none that never started is assigned at or after its expiry, jobs with an expiry or limit keys go
    only into free slots, and no job is assigned while a strictly better one that the same worker could take
    stays queued (but for a job with an expiry while the worker has no free slot)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = make()
        self.s.limits.declare("c2", Rule(concurrency=2), 0.0)
        self.s.limits.declare("r", Rule(rate_per_s=5.0, burst=2), 0.0)
        self.now = 0.0
        self.n = 0
        self.due: dict[str, float] = {}
        self.starts: list[float] = []  # start times under "r"
        self.held: dict[bytes, set[tuple[str, int]]] = {}
        self.started_attempts: dict[str, set[int]] = {}  # attempts assigned and not handed back
        for i in range(2):
            wid = f"w{i}".encode()
            self._ready(wid)
            self.held[wid] = set()

    def _ready(self, wid: bytes) -> None:
        w = ready(self.s, wid, concurrency=3 if wid == b"w0" else 2, now=self.now)
        if wid == b"w1":  # a fixed window of 2 beyond its 2 slots
            w.prefetch = w.window = 2
            w.credit = w.capacity
            self.s._free[wid] = None

    @rule(priority=st.integers(-2, 2), delay=st.none() | st.floats(0.0, 5.0), expiry=st.none() | st.floats(0.1, 8.0),
          keys=st.sampled_from([(), ("c2",), ("r",), ("c2", "r")]))
    def submit(self, priority: int, delay: float | None, expiry: float | None, keys: tuple[str, ...]) -> None:
        self.n += 1
        job_id = f"j{self.n}"
        due = None if delay is None else self.now + delay
        if due is not None:
            self.due[job_id] = due
        add(self.s, job_id, self.now, due, None if expiry is None else self.now + expiry, priority=priority,
            limits=keys)
        self.turn()

    @rule(dt=st.floats(0.0, 2.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.turn()

    @rule(data=st.data())
    def finish_one(self, data: st.DataObject) -> None:
        busy = [(wid, k) for wid, ks in self.held.items() for k in ks]
        if not busy:
            return
        wid, key = data.draw(st.sampled_from(sorted(busy)))
        self.held[wid].discard(key)
        ok(self.s, wid, key[0], key[1], now=self.now)
        self.turn()

    @rule(data=st.data())
    def lose_a_worker(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(self.held)))
        self.s.worker_gone(wid, self.now)
        self.held[wid] = set()
        self._ready(wid)
        self.turn()

    @rule(data=st.data())
    def hand_one_back(self, data: st.DataObject) -> None:
        busy = [(wid, k) for wid, ks in self.held.items() for k in ks]
        if not busy:
            return
        wid, key = data.draw(st.sampled_from(sorted(busy)))
        self.held[wid].discard(key)
        self.started_attempts[key[0]].discard(key[1])
        self.s.give_back(wid, key[0], key[1], self.now)
        self.turn()

    def turn(self) -> None:
        s = self.s
        s.tick(self.now)
        s.schedule(self.now)
        for a in s.take_actions():
            if not isinstance(a, Assign):
                continue
            w = s.workers[a.worker]
            before = len(self.held[a.worker])
            for i, job in enumerate(a.jobs):
                assert self.now >= self.due.get(job.id, 0.0) - 1e-9, f"{job.id} started before it was due"
                if job.expires is not None and not self.started_attempts.get(job.id):
                    assert self.now < job.expires, f"{job.id} assigned after its expiry, never started before"
                if job.expires is not None or job.opts.limits:
                    assert before + i < w.concurrency, f"{job.id} went into a window, not a free slot"
                self.started_attempts.setdefault(job.id, set()).add(job.attempt)
                if "r" in job.opts.limits:
                    self.starts.append(self.now)
                self.held[a.worker].add((job.id, job.attempt))
                # nothing strictly better that this worker serves stays queued (strict priority, no aging)
                for cls in w.classes:
                    head = s.ready.by_class[cls].head() if cls in s.ready.by_class else None
                    if head is None or job.opts.limits:
                        continue
                    slot_bound = head[2].expires is not None and len(w.running) >= w.concurrency
                    assert head[2].opts.priority <= job.opts.priority or w.credit == 0 or slot_bound

    @invariant()
    def limits_hold(self) -> None:
        s = self.s
        running_c2 = sum(1 for j in s.jobs.values() if j.state == RUNNING and "c2" in j.opts.limits)
        assert running_c2 <= 2
        starts = self.starts
        for i, t0 in enumerate(starts):
            for j in range(i, len(starts)):
                assert j - i + 1 <= 2 + 5.0 * (starts[j] - t0) + 1e-9

    @invariant()
    def counts_match(self) -> None:
        s = self.s
        jobs = s.jobs.values()
        assert s.n_scheduled == sum(j.state == SCHEDULED for j in jobs)
        assert s.n_limited == sum(j.state == LIMITED for j in jobs)
        assert s.n_queued == sum(j.state == QUEUED for j in jobs)
        assert s.n_running == sum(j.state == RUNNING for j in jobs)

    def teardown(self) -> None:
        """Everything ends: run the clock forward and finish what runs; no job stays waiting or is lost."""
        for _ in range(400):
            self.now += 1.0
            self.turn()
            for wid in list(self.held):
                for key in sorted(self.held[wid]):
                    ok(self.s, wid, key[0], key[1], now=self.now)
                self.held[wid] = set()
            if all(j.state not in (SCHEDULED, LIMITED, QUEUED, RUNNING) for j in self.s.jobs.values()):
                break
        left = {j.id: j.state for j in self.s.jobs.values() if j.state in (SCHEDULED, LIMITED, QUEUED, RUNNING)}
        assert not left, f"jobs never ended: {left}"
        assert len(self.s.jobs) == self.n  # none lost (all finished jobs are still held: no TTL passed)


TestWaitingMachine = WaitingMachine.TestCase
TestWaitingMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])

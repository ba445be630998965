"""Tier-1 tests of the dispatcher's scheduling state machine: events in, actions out.

No sockets, no sleeps: every call gets the current time as `now`, and what would go on the wire is
read back from `take_actions()`. The second half is a hypothesis state machine that throws random
event sequences at the scheduler and checks its invariants after every step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conveyor.dispatcher.scheduler import (
    CANCELLED,
    FAILED,
    FINISHED_STATES,
    MAX_BACKOFF,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Action,
    Assign,
    CancelRunning,
    Deliver,
    Job,
    Scheduler,
    TaskOptions,
    WorkerInfo,
)
from conveyor.protocol import failures as perr

CLIENT = b"client-1"
OTHER = b"client-2"
FRAMES = [b"call"]


# --- helpers -------------------------------------------------------------------------------------


def make(**kwargs: Any) -> Scheduler:
    kwargs.setdefault("rng", random.Random(1234))
    return Scheduler(**kwargs)


def ready(
    s: Scheduler,
    wid: bytes,
    *,
    concurrency: int = 1,
    mode: str = "thread",
    tags: Iterable[str] = (),
    running: Sequence[tuple[str, int]] = (),
    credit: int | None = None,
    now: float = 0.0,
    session: str = "",
) -> WorkerInfo:
    return s.worker_ready(
        wid,
        name=wid.decode(),
        host="host",
        pid=1,
        mode=mode,
        concurrency=concurrency,
        tags=tags,
        credit=concurrency - len(running) if credit is None else credit,
        running=running,
        now=now,
        session=session,
    )


def submit(s: Scheduler, job_id: str, now: float = 0.0, owner: bytes | None = CLIENT, **opts: Any) -> Job:
    return s.submit(job_id, TaskOptions(fn="tests.tasks:noop", **opts), list(FRAMES), owner, now)


def assigns(actions: Iterable[Action]) -> dict[bytes, list[tuple[str, int]]]:
    """worker -> [(job id, attempt)] over all Assign actions (the scheduler sends one per worker)."""
    out: dict[bytes, list[tuple[str, int]]] = {}
    for a in actions:
        if isinstance(a, Assign):
            assert a.worker not in out, "one Assign per worker per schedule()"
            out[a.worker] = [(j.id, j.attempt) for j in a.jobs]
    return out


def deliveries(actions: Iterable[Action]) -> list[tuple[bytes, str, str]]:
    return [(a.client, j.id, j.state) for a in actions if isinstance(a, Deliver) for j in a.jobs]


def cancels(actions: Iterable[Action]) -> list[tuple[bytes, str, int]]:
    return [(a.worker, a.job_id, a.attempt) for a in actions if isinstance(a, CancelRunning)]


def run(s: Scheduler, now: float = 0.0) -> list[Action]:
    s.schedule(now)
    return s.take_actions()


def ok(s: Scheduler, wid: bytes, job_id: str, attempt: int, now: float = 1.0, result: bytes = b"r") -> None:
    s.outcome(wid, job_id, attempt, True, {}, [result], now)


def exc_info(retryable: bool) -> dict[str, Any]:
    info = perr.error_info(perr.EXCEPTION, "ValueError", "boom", "Traceback...")
    info["retryable"] = retryable
    return info


def crash_info() -> dict[str, Any]:
    return perr.error_info(perr.CRASHED, "WorkerCrashed", "the process died")


def fail(s: Scheduler, wid: bytes, job_id: str, attempt: int, info: dict[str, Any], now: float = 1.0) -> None:
    s.outcome(wid, job_id, attempt, False, info, [b"exc"], now)


def lost_while_running_j() -> Scheduler:
    """Worker b"w" (2 slots) ran job "j" (attempt 1) and was declared lost at t=10: "j" is queued again."""
    s = make(liveness=3.0)
    ready(s, b"w", concurrency=2)
    submit(s, "j")
    run(s)
    s.expire_workers(10.0)
    return s


def check_counters(s: Scheduler) -> None:
    assert s.n_queued == sum(j.state == QUEUED for j in s.jobs.values())
    assert s.n_running == sum(j.state == RUNNING for j in s.jobs.values())


# --- assignment and credit -------------------------------------------------------------------------


def test_submit_then_ready_assigns_within_credit() -> None:
    s = make()
    for i in range(5):
        submit(s, f"j{i}")
    assert run(s) == []  # no worker yet
    w = ready(s, b"w", concurrency=3)
    got = assigns(run(s))
    assert got == {b"w": [("j0", 1), ("j1", 1), ("j2", 1)]}
    assert w.credit == 0 and w.running == {"j0": 1, "j1": 1, "j2": 1}
    assert (s.n_queued, s.n_running) == (2, 3)
    assert all(s.jobs[f"j{i}"].state == RUNNING and s.jobs[f"j{i}"].worker == b"w" for i in range(3))
    check_counters(s)


def test_ready_then_submit_assigns() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    submit(s, "a")
    assert assigns(run(s)) == {b"w": [("a", 1)]}


def test_credit_never_exceeded_with_concurrency_one() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    for i in range(3):
        submit(s, f"j{i}")
    assert assigns(run(s)) == {b"w": [("j0", 1)]}
    for _ in range(3):  # scheduling again changes nothing until an outcome returns the credit
        assert run(s) == []
    ok(s, b"w", "j0", 1)
    acts = run(s)
    assert assigns(acts) == {b"w": [("j1", 1)]}
    assert deliveries(acts) == [(CLIENT, "j0", SUCCEEDED)]
    assert len(s.workers[b"w"].running) == 1
    ok(s, b"w", "j1", 1)
    assert assigns(run(s)) == {b"w": [("j2", 1)]}


def test_a_lent_slot_lets_one_more_job_start_and_takes_its_credit_back() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    for i in range(4):
        submit(s, f"j{i}")
    assert assigns(run(s)) == {b"w": [("j0", 1)]}
    s.worker_lent(b"w", 1)  # j0 waits on a child: one more job may start there
    assert assigns(run(s)) == {b"w": [("j1", 1)]} and run(s) == []  # one, not more
    s.worker_lent(b"w", 0)  # the wait is over: j0 and j1 run on one slot
    ok(s, b"w", "j1", 1)
    assert assigns(run(s)) == {}  # j0 still holds the one slot
    ok(s, b"w", "j0", 1)
    assert assigns(run(s)) == {b"w": [("j2", 1)]}
    w = s.workers[b"w"]
    assert w.credit == 0 and w.lent == 0 and len(w.running) == 1
    s.worker_leaving(b"w")
    s.worker_lent(b"w", 1)  # a draining worker is sent nothing, lent slot or not
    assert run(s) == [] and w.credit == 0


def test_worker_credit_below_concurrency_is_respected() -> None:
    s = make()
    ready(s, b"w", concurrency=4, credit=2)
    for i in range(4):
        submit(s, f"j{i}")
    assert [j for j, _ in assigns(run(s))[b"w"]] == ["j0", "j1"]


def test_spreads_across_two_free_workers() -> None:
    s = make()
    ready(s, b"a", concurrency=4)
    ready(s, b"b", concurrency=4)
    submit(s, "j0")
    submit(s, "j1")
    got = assigns(run(s))
    assert sorted(got) == [b"a", b"b"]
    assert sorted(j for jobs in got.values() for j, _ in jobs) == ["j0", "j1"]


def test_schedule_leaves_nothing_queued_while_a_free_worker_could_take_it() -> None:
    # Regression: one pass gave each free worker n_queued // n_free jobs and stopped, leaving jobs
    # queued next to idle credit until the next event woke the loop.
    s = make()
    ready(s, b"a", concurrency=4)
    ready(s, b"b", concurrency=4)
    for i in range(5):
        submit(s, f"j{i}")
    got = assigns(run(s))
    assert s.n_queued == 0 and s.n_running == 5
    assert sorted(len(v) for v in got.values()) == [2, 3]
    assert sum(w.credit for w in s.workers.values()) == 3


def test_least_recently_assigned_free_worker_goes_first() -> None:
    s = make()
    ready(s, b"a", concurrency=2)
    ready(s, b"b", concurrency=2)
    submit(s, "j0")
    assert assigns(run(s)) == {b"a": [("j0", 1)]}
    submit(s, "j1")
    assert assigns(run(s)) == {b"b": [("j1", 1)]}


# --- routing ---------------------------------------------------------------------------------------


def test_tagged_job_goes_only_to_a_worker_holding_all_tags() -> None:
    s = make()
    ready(s, b"plain", concurrency=4)
    ready(s, b"gpu", concurrency=4, tags=["gpu"])
    ready(s, b"both", concurrency=4, tags=["gpu", "ssd", "extra"])
    submit(s, "needs-both", tags=frozenset({"gpu", "ssd"}))
    submit(s, "needs-gpu", tags=frozenset({"gpu"}))
    got = assigns(run(s))
    assert b"plain" not in got
    assert s.jobs["needs-both"].worker == b"both"
    assert s.jobs["needs-gpu"].worker in (b"gpu", b"both")
    assert sorted(j for jobs in got.values() for j, _ in jobs) == ["needs-both", "needs-gpu"]


def test_tagged_job_stays_queued_without_a_capable_worker() -> None:
    s = make()
    ready(s, b"gpu", concurrency=4, tags=["gpu"])
    submit(s, "j", tags=frozenset({"gpu", "ssd"}))
    assert run(s) == []
    assert s.jobs["j"].state == QUEUED and s.n_queued == 1
    ready(s, b"both", tags=["gpu", "ssd"])
    assert assigns(run(s)) == {b"both": [("j", 1)]}


def test_job_with_mode_goes_only_to_a_worker_of_that_mode() -> None:
    s = make()
    ready(s, b"t", concurrency=4, mode="thread")
    submit(s, "p", mode="process")
    submit(s, "any")
    assert assigns(run(s)) == {b"t": [("any", 1)]}
    assert s.jobs["p"].state == QUEUED
    ready(s, b"p", concurrency=4, mode="process")
    assert assigns(run(s)) == {b"p": [("p", 1)]}


def test_untagged_job_without_mode_goes_to_any_worker() -> None:
    s = make()
    ready(s, b"x", mode="asyncio", tags=["gpu"])
    submit(s, "j")
    assert assigns(run(s)) == {b"x": [("j", 1)]}


# --- ordering --------------------------------------------------------------------------------------


def test_fifo_within_a_class() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    for i in range(5):
        submit(s, f"j{i}")
    order = []
    for _ in range(5):
        ((job_id, attempt),) = assigns(run(s))[b"w"]
        order.append(job_id)
        ok(s, b"w", job_id, attempt)
    assert order == [f"j{i}" for i in range(5)]


def test_fifo_across_classes() -> None:
    s = make()
    submit(s, "a0")
    submit(s, "g0", tags=frozenset({"gpu"}))
    submit(s, "p0", mode="thread")
    submit(s, "a1")
    submit(s, "g1", tags=frozenset({"gpu"}))
    ready(s, b"w", concurrency=1, mode="thread", tags=["gpu"])
    order = []
    for _ in range(5):
        ((job_id, attempt),) = assigns(run(s))[b"w"]
        order.append(job_id)
        ok(s, b"w", job_id, attempt)
    assert order == ["a0", "g0", "p0", "a1", "g1"]
    # And in one batch, too.
    s = make()
    for i in range(4):
        submit(s, f"b{i}", tags=frozenset({"gpu"}) if i % 2 else frozenset())
    ready(s, b"big", concurrency=4, mode="thread", tags=["gpu"])
    assert [j for j, _ in assigns(run(s))[b"big"]] == ["b0", "b1", "b2", "b3"]


# --- outcomes and delivery -------------------------------------------------------------------------


def test_success_delivers_result_to_owner() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j")
    run(s)
    s.outcome(b"w", "j", 1, True, {"worker_info": 1}, [b"result"], 5.0)
    acts = s.take_actions()
    (d,) = [a for a in acts if isinstance(a, Deliver)]
    assert d.client == CLIENT
    (job,) = d.jobs
    assert job.id == "j" and job.state == SUCCEEDED
    assert job.result_frames == [b"result"] and job.result_info == {"worker_info": 1}
    assert job.finished_at == 5.0 and job.frames is None
    assert job.history == [{"attempt": 1, "worker": "w", "started": 0.0, "finished": 5.0}]
    assert s.counts[SUCCEEDED] == 1 and s.n_running == 0
    assert s.workers[b"w"].credit == 1 and s.workers[b"w"].done == 1
    assert s.take_actions() == []  # delivered once


def test_job_without_owner_is_not_delivered() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j", owner=None)
    run(s)
    ok(s, b"w", "j", 1)
    assert deliveries(s.take_actions()) == []
    assert s.jobs["j"].state == SUCCEEDED


def deliver_like_server(s: Scheduler) -> list[tuple[bytes, str, str]]:
    """What server._send_done does after a successful send: forget results nobody asked to keep."""
    acts = s.take_actions()
    for a in acts:
        if isinstance(a, Deliver):
            for job in a.jobs:
                if not job.opts.keep:
                    s.forget(job.id)
    return deliveries(acts)


def test_keep_false_result_is_forgotten_after_delivery() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j")
    run(s)
    ok(s, b"w", "j", 1)
    assert deliver_like_server(s) == [(CLIENT, "j", SUCCEEDED)]
    assert "j" not in s.jobs
    assert s.watch(OTHER, ["j"]) == ["j"]  # unknown now


def test_keep_true_result_stays_until_forgotten() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j", keep=True)
    run(s)
    ok(s, b"w", "j", 1)
    assert deliver_like_server(s) == [(CLIENT, "j", SUCCEEDED)]
    assert s.jobs["j"].state == SUCCEEDED
    assert s.job_view(s.jobs["j"])["state"] == SUCCEEDED
    assert s.watch(OTHER, ["j"]) == []
    assert deliveries(s.take_actions()) == [(OTHER, "j", SUCCEEDED)]
    s.forget("j")
    assert "j" not in s.jobs


def test_forget_ignores_unfinished_and_unknown_jobs() -> None:
    s = make()
    submit(s, "j")
    s.forget("j")
    s.forget("nope")
    assert s.jobs["j"].state == QUEUED


def test_watch_finished_unfinished_and_unknown() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    submit(s, "done", keep=True)
    submit(s, "later")
    run(s)
    ok(s, b"w", "done", 1)
    s.take_actions()
    assert s.watch(OTHER, ["done", "later", "ghost"]) == ["ghost"]
    assert deliveries(s.take_actions()) == [(OTHER, "done", SUCCEEDED)]  # finished: now
    s.watch(CLIENT, ["later"])  # the owner watching too must not get it twice
    ok(s, b"w", "later", 1)
    got = deliveries(s.take_actions())
    assert sorted(got) == [(CLIENT, "later", SUCCEEDED), (OTHER, "later", SUCCEEDED)]
    assert s.jobs["later"].watchers is None


# --- cancellation ----------------------------------------------------------------------------------


def test_cancel_queued_job_is_never_assigned() -> None:
    s = make()
    submit(s, "a")
    submit(s, "b")
    assert s.cancel("a", 1.0) is True
    acts = s.take_actions()
    assert deliveries(acts) == [(CLIENT, "a", CANCELLED)]
    assert s.jobs["a"].result_info["kind"] == perr.CANCELLED
    assert s.n_queued == 1
    ready(s, b"w", concurrency=4)
    assert assigns(run(s)) == {b"w": [("b", 1)]}
    assert s.cancel("a", 2.0) is False  # already finished
    assert s.cancel("ghost", 2.0) is False
    assert s.counts[CANCELLED] == 1
    check_counters(s)


def test_cancel_running_job_sends_cancel_and_ignores_late_outcome() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    submit(s, "a")
    submit(s, "b")
    run(s)
    assert s.cancel("a", 1.0) is True
    acts = s.take_actions()
    assert cancels(acts) == [(b"w", "a", 1)]
    assert deliveries(acts) == [(CLIENT, "a", CANCELLED)]
    assert s.n_running == 0 and s.workers[b"w"].running == {}
    # The worker still holds the slot until it reports: b must wait.
    assert run(s) == []
    ok(s, b"w", "a", 1, now=2.0)  # it finished anyway: ignored, but the slot is free again
    acts = run(s, 2.0)
    assert deliveries(acts) == []
    assert s.jobs["a"].state == CANCELLED
    assert assigns(acts) == {b"w": [("b", 1)]}
    check_counters(s)


def test_a_final_state_merged_from_the_pair_ends_a_queued_or_running_job_once() -> None:
    """The pair's merge (Durability.adopt): the other side's final state beats ours while ours is unfinished."""
    s = make()
    ready(s, b"w", concurrency=1)
    submit(s, "running")
    submit(s, "queued")
    run(s)
    theirs = [{"worker": "far", "attempt": 1}]
    assert s.merge_final("queued", SUCCEEDED, 1, theirs, {}, [b"far-result"], 1.0) is True
    assert s.merge_final("running", FAILED, 2, theirs, exc_info(False), [b"exc"], 1.0) is True
    acts = s.take_actions()
    assert cancels(acts) == [(b"w", "running", 1)]  # the attempt here stops: the job has ended
    assert sorted(deliveries(acts)) == [(CLIENT, "queued", SUCCEEDED), (CLIENT, "running", FAILED)]
    assert s.jobs["queued"].result_frames == [b"far-result"] and s.jobs["queued"].history == theirs
    assert s.jobs["running"].attempt == 2
    ok(s, b"w", "running", 1, now=2.0)  # our attempt's late success: fenced, the merged state stands
    assert s.jobs["running"].state == FAILED and deliveries(s.take_actions()) == []
    check_counters(s)


def test_a_merged_final_state_never_replaces_one_of_our_own() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    submit(s, "a")
    run(s)
    ok(s, b"w", "a", 1, result=b"ours")
    s.take_actions()
    assert s.merge_final("a", FAILED, 1, [], exc_info(False), [b"exc"], 2.0) is False
    assert s.merge_final("ghost", SUCCEEDED, 1, [], {}, [b"x"], 2.0) is False
    assert s.merge_final("a", QUEUED, 1, [], {}, [], 2.0) is False  # not a final state: nothing to merge
    assert s.jobs["a"].state == SUCCEEDED and s.jobs["a"].result_frames == [b"ours"]
    assert s.take_actions() == []


def test_cancel_delayed_retry_is_never_requeued() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j", retries=3, retry_backoff=10.0)
    run(s)
    fail(s, b"w", "j", 1, exc_info(retryable=True))
    assert s.jobs["j"].retry_at is not None and s.next_timer() is not None
    assert s.cancel("j", 2.0) is True
    s.take_actions()
    s.tick(1000.0)
    assert run(s, 1000.0) == []
    assert s.jobs["j"].state == CANCELLED and s.n_queued == 0
    check_counters(s)


# --- fencing and worker loss -----------------------------------------------------------------------


def lose_and_reassign(s: Scheduler) -> None:
    """Job j runs on w1 (attempt 1); w1 goes silent and is lost; j runs again on w2 (attempt 2)."""
    ready(s, b"w1", now=0.0)
    submit(s, "j")
    assert assigns(run(s)) == {b"w1": [("j", 1)]}
    ready(s, b"w2", now=0.0)
    s.heard_from(b"w2", 3.0)
    lost = s.expire_workers(4.0)
    assert [w.id for w in lost] == [b"w1"]
    assert assigns(run(s, 4.0)) == {b"w2": [("j", 2)]}


def test_worker_lost_requeues_and_runs_elsewhere_counting_attempts() -> None:
    s = make(liveness=3.0)
    lose_and_reassign(s)
    job = s.jobs["j"]
    assert job.attempt == 2 and job.infra_failures == 1 and job.failures == 0
    assert job.history[0]["error"].startswith("WorkerLost")
    assert b"w1" not in s.workers
    assert s.counts["retried"] == 1
    ok(s, b"w2", "j", 2, now=5.0)
    assert deliveries(s.take_actions()) == [(CLIENT, "j", SUCCEEDED)]
    assert s.job_view(job)["attempts"] == 2 and s.job_view(job)["worker"] == "w2"


def test_heard_from_keeps_a_worker_alive() -> None:
    s = make(liveness=3.0)
    ready(s, b"w")
    for t in range(1, 20):
        assert s.heard_from(b"w", float(t))
        assert s.expire_workers(t + 2.9) == []
    assert s.heard_from(b"ghost", 1.0) is False


def test_fencing_old_attempt_outcome_does_not_overwrite() -> None:
    s = make(liveness=3.0)
    lose_and_reassign(s)
    fail(s, b"w1", "j", 1, exc_info(retryable=False), now=5.0)  # stale failure: ignored
    assert s.jobs["j"].state == RUNNING and s.jobs["j"].worker == b"w2"
    assert s.take_actions() == []
    ok(s, b"w2", "j", 2, now=6.0, result=b"new")
    ok(s, b"w1", "j", 1, now=7.0, result=b"old")  # stale success after the finish: ignored
    acts = s.take_actions()
    assert deliveries(acts) == [(CLIENT, "j", SUCCEEDED)] and cancels(acts) == []
    assert s.jobs["j"].result_frames == [b"new"] and s.counts[SUCCEEDED] == 1
    assert s.counts["fenced"] == 2
    check_counters(s)


def test_late_success_of_lost_attempt_finishes_once_and_cancels_newer() -> None:
    s = make(liveness=3.0)
    lose_and_reassign(s)
    ok(s, b"w1", "j", 1, now=5.0, result=b"late")
    acts = s.take_actions()
    assert deliveries(acts) == [(CLIENT, "j", SUCCEEDED)]
    assert cancels(acts) == [(b"w2", "j", 2)]
    job = s.jobs["j"]
    assert job.result_frames == [b"late"] and job.history[0]["finished"] == 5.0
    assert s.n_running == 0 and s.workers[b"w2"].running == {}
    # The newer attempt reports (cancelled): ignored, credit back.
    fail(s, b"w2", "j", 2, perr.error_info(perr.CANCELLED, "JobCancelled", "cancelled"), now=6.0)
    assert s.take_actions() == []
    assert s.workers[b"w2"].credit == 1 and s.counts[SUCCEEDED] == 1
    assert s.counts["fenced"] == 2  # the late success, then the cancelled attempt
    check_counters(s)


def test_late_success_while_requeued_finishes_and_is_not_assigned() -> None:
    s = make(liveness=3.0)
    ready(s, b"w1")
    submit(s, "j")
    run(s)
    s.expire_workers(10.0)
    assert s.jobs["j"].state == QUEUED
    ok(s, b"w1", "j", 1, now=11.0)  # the worker was only partitioned; its result arrives
    assert deliveries(s.take_actions()) == [(CLIENT, "j", SUCCEEDED)]
    ready(s, b"w2", now=11.0)
    assert run(s, 11.0) == []
    check_counters(s)
    assert s.n_queued == 0


def test_same_worker_getting_a_job_again_keeps_tracking_the_new_attempt() -> None:
    # Regression: the stale outcome of attempt 1 popped w.running[j] (attempt 2), so when the worker
    # was later lost the job stayed RUNNING on a dead worker forever.
    s = make(liveness=3.0)
    ready(s, b"w", concurrency=2)
    submit(s, "j")
    run(s)
    s.expire_workers(10.0)  # lost; j requeued
    ready(s, b"w", concurrency=2, running=[], now=10.0)  # it comes back without attempt 1 in its list
    assert assigns(run(s, 10.0)) == {b"w": [("j", 2)]}
    fail(s, b"w", "j", 1, exc_info(retryable=False), now=11.0)  # stale failure of attempt 1
    assert s.workers[b"w"].running == {"j": 2}
    assert s.workers[b"w"].credit == 1
    s.expire_workers(100.0)
    assert s.jobs["j"].state == QUEUED and s.n_running == 0
    check_counters(s)


def test_stale_giveback_does_not_untrack_newer_attempt() -> None:
    s = lost_while_running_j()
    ready(s, b"w", concurrency=2, running=[], now=10.0)
    run(s, 10.0)
    s.give_back(b"w", "j", 1, 11.0)
    assert s.workers[b"w"].running == {"j": 2} and s.jobs["j"].state == RUNNING


def test_a_worker_back_with_a_requeued_job_still_running_keeps_it() -> None:
    # Lost (or the dispatcher restarted from its journal) while the job kept running there: the job was
    # queued again, and must be adopted from the worker's READY instead of running a second time.
    s = lost_while_running_j()
    assert s.jobs["j"].state == QUEUED
    ready(s, b"w", concurrency=2, running=[("j", 1)], now=10.0)
    assert assigns(run(s, 10.0)) == {}
    assert s.jobs["j"].state == RUNNING and s.workers[b"w"].running == {"j": 1}
    ok(s, b"w", "j", 1, now=11.0)
    assert s.jobs["j"].state == SUCCEEDED
    check_counters(s)


def test_a_job_adopted_then_queued_again_is_assigned_once() -> None:
    # Adopting a queued job leaves its entry in the queue (removal is lazy); losing the worker again
    # queues the job a second time. Both entries then name one queued job, and one pop may not take it
    # twice: that assigned it twice in one ASSIGN and left the counters off by one, so the next jobs of
    # its class were never assigned (found by test_fuzz.py, whose fake workers list real job ids).
    s = lost_while_running_j()
    ready(s, b"w", concurrency=2, running=[("j", 1)], now=10.0, session="again")
    s.expire_workers(20.0)
    assert s.jobs["j"].state == QUEUED
    submit(s, "k", now=20.0)
    ready(s, b"other", concurrency=3, now=20.0)
    assert assigns(run(s, 20.0)) == {b"other": [("j", 2), ("k", 1)]}
    check_counters(s)
    assert s._queued_by_class[s.jobs["k"].class_key] == 0


def test_duplicate_outcome_never_lets_running_exceed_concurrency() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    for i in range(4):
        submit(s, f"j{i}")
    run(s)
    ok(s, b"w", "j0", 1)
    ok(s, b"w", "j0", 1)  # a duplicate report
    ok(s, b"w", "ghost", 7)  # and one for a job never assigned here
    run(s)
    w = s.workers[b"w"]
    assert len(w.running) == 2 and w.credit == 0


def test_worker_gone_requeues_what_it_held() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    submit(s, "a")
    submit(s, "b")
    run(s)
    s.worker_gone(b"w", 1.0)
    s.worker_gone(b"w", 1.0)  # twice is harmless
    assert s.n_queued == 2 and s.n_running == 0 and s.workers == {}
    assert all(j.infra_failures == 1 for j in s.jobs.values())


# --- retries ---------------------------------------------------------------------------------------


def test_infrastructure_failure_retried_up_to_infra_retries_then_failed() -> None:
    s = make(infra_retries=2)
    ready(s, b"w")
    submit(s, "j", retries=0)  # below infra_retries: the dispatcher's limit applies
    for attempt in (1, 2, 3):
        assert assigns(run(s, float(attempt))) == {b"w": [("j", attempt)]}
        fail(s, b"w", "j", attempt, crash_info(), now=float(attempt))
    acts = run(s, 4.0)
    assert assigns(acts) == {}
    assert deliveries(acts) == [(CLIENT, "j", FAILED)]
    job = s.jobs["j"]
    assert job.infra_failures == 3 and job.failures == 0
    assert job.result_info["kind"] == perr.CRASHED
    assert [h["attempt"] for h in job.history] == [1, 2, 3]
    assert all(h["error"] == "WorkerCrashed: the process died" for h in job.history)
    assert s.job_view(job)["error"]["kind"] == perr.CRASHED
    assert s.counts["retried"] == 2 and s.counts[FAILED] == 1


def test_task_retries_above_infra_retries_raise_the_infrastructure_limit() -> None:
    s = make(infra_retries=1)
    ready(s, b"w")
    submit(s, "j", retries=3)
    for attempt in (1, 2, 3, 4):
        assert assigns(run(s)) == {b"w": [("j", attempt)]}
        fail(s, b"w", "j", attempt, crash_info())
    assert deliveries(s.take_actions()) == [(CLIENT, "j", FAILED)]
    assert s.jobs["j"].infra_failures == 4


def test_infra_retries_counted_across_lost_and_crashed() -> None:
    s = make(infra_retries=1, liveness=3.0)
    ready(s, b"w1")
    submit(s, "j")
    run(s)
    s.expire_workers(10.0)  # lost: 1st infra failure, retried
    ready(s, b"w2", now=10.0)
    run(s, 10.0)
    fail(s, b"w2", "j", 2, crash_info(), now=11.0)  # crash: 2nd, over the limit
    assert deliveries(s.take_actions()) == [(CLIENT, "j", FAILED)]


def test_task_exception_not_retryable_fails_at_once() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j", retries=3)
    run(s)
    fail(s, b"w", "j", 1, exc_info(retryable=False))
    acts = run(s)
    assert deliveries(acts) == [(CLIENT, "j", FAILED)] and assigns(acts) == {}
    job = s.jobs["j"]
    assert job.result_frames == [b"exc"] and job.result_info["type"] == "ValueError"
    assert job.history[0]["error"] == "ValueError: boom"


def test_task_exception_retryable_without_retries_fails() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j")
    run(s)
    fail(s, b"w", "j", 1, exc_info(retryable=True))
    assert deliveries(s.take_actions()) == [(CLIENT, "j", FAILED)]


def test_retryable_exception_retried_with_backoff_via_tick() -> None:
    s = make()
    ready(s, b"w")
    backoff = 2.0
    submit(s, "j", retries=2, retry_backoff=backoff)
    now = 0.0
    run(s, now)
    for attempt in (1, 2):
        fail(s, b"w", "j", attempt, exc_info(retryable=True), now=now)
        job = s.jobs["j"]
        assert job.state == QUEUED and job.retry_at is not None
        base = backoff * 2 ** (attempt - 1)
        assert now + 0.5 * base <= job.retry_at <= now + 1.5 * base
        assert s.next_timer() == job.retry_at
        assert s.job_view(job)["retry_at"] == job.retry_at
        assert s.status(now)["delayed"] == 1
        check_counters(s)
        # Not before its time, even with a free worker.
        s.tick(job.retry_at - 0.01)
        assert run(s, job.retry_at - 0.01) == []
        now = job.retry_at
        s.tick(now)
        assert s.next_timer() is None
        assert assigns(run(s, now)) == {b"w": [("j", attempt + 1)]}
    fail(s, b"w", "j", 3, exc_info(retryable=True), now=now)
    acts = run(s, now + 1000)
    assert deliveries(acts) == [(CLIENT, "j", FAILED)]
    assert s.jobs["j"].failures == 3 and s.counts["retried"] == 2


def test_zero_backoff_requeues_at_once() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j", retries=1, retry_backoff=0.0)
    run(s)
    fail(s, b"w", "j", 1, exc_info(retryable=True))
    assert s.next_timer() is None
    assert assigns(run(s)) == {b"w": [("j", 2)]}


def test_backoff_is_capped_and_many_failures_do_not_overflow() -> None:
    # Regression: float * 2 ** 1024 raised OverflowError inside outcome(), leaving the job half-released.
    s = make()
    ready(s, b"w")
    submit(s, "j", retries=2000, retry_backoff=1.0)
    now = 0.0
    for attempt in range(1, 1101):
        assert assigns(run(s, now)) == {b"w": [("j", attempt)]}
        fail(s, b"w", "j", attempt, exc_info(retryable=True), now=now)
        retry_at = s.jobs["j"].retry_at
        assert retry_at is not None and 0 < retry_at - now <= MAX_BACKOFF + 1e-6
        now = retry_at
        s.tick(now)
    check_counters(s)


def test_delayed_retries_leave_in_deadline_order() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    submit(s, "slow", retries=1, retry_backoff=100.0)
    submit(s, "fast", retries=1, retry_backoff=1.0)
    run(s)
    fail(s, b"w", "slow", 1, exc_info(retryable=True))
    fail(s, b"w", "fast", 1, exc_info(retryable=True))
    s.tick(10.0)
    assert assigns(run(s, 10.0)) == {b"w": [("fast", 2)]}
    s.tick(1000.0)
    assert assigns(run(s, 1000.0)) == {b"w": [("slow", 2)]}


# --- draining and re-registration ------------------------------------------------------------------


def test_give_back_during_drain_requeues_without_counting_a_failure() -> None:
    s = make()
    ready(s, b"old", concurrency=2)
    submit(s, "a")
    submit(s, "b")
    submit(s, "c")
    assert assigns(run(s)) == {b"old": [("a", 1), ("b", 1)]}
    s.worker_leaving(b"old")
    assert run(s) == []  # a draining worker gets nothing new
    ok(s, b"old", "a", 1)  # finishes one during the drain: no credit for a draining worker
    assert s.workers[b"old"].credit == 0
    s.give_back(b"old", "b", 1, 2.0)
    s.worker_gone(b"old", 3.0)
    job = s.jobs["b"]
    assert job.state == QUEUED and job.failures == 0 and job.infra_failures == 0
    assert s.counts["retried"] == 0
    ready(s, b"new", concurrency=2)
    # Handed-back work goes to the front of its queue.
    assert assigns(run(s, 4.0)) == {b"new": [("b", 2), ("c", 1)]}
    check_counters(s)


def test_give_back_of_stale_attempt_is_ignored() -> None:
    s = make(liveness=3.0)
    lose_and_reassign(s)
    s.give_back(b"w1", "j", 1, 5.0)
    assert s.jobs["j"].state == RUNNING and s.jobs["j"].worker == b"w2"
    check_counters(s)


def test_reregistration_keeps_still_running_assignments() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    submit(s, "keep")
    submit(s, "gone")
    run(s)
    # The worker reconnects: it still runs "keep", "gone" died with the old connection.
    w = ready(s, b"w", concurrency=2, running=[("keep", 1)], now=1.0)
    assert w.running == {"keep": 1} and w.credit == 1
    assert s.jobs["keep"].state == RUNNING and s.jobs["keep"].worker == b"w"
    assert s.jobs["gone"].state == QUEUED and s.jobs["gone"].infra_failures == 1
    check_counters(s)
    assert assigns(run(s, 1.0)) == {b"w": [("gone", 2)]}
    ok(s, b"w", "keep", 1, now=2.0)  # still the current attempt
    assert deliveries(s.take_actions()) == [(CLIENT, "keep", SUCCEEDED)]
    assert s.jobs["keep"].attempt == 1


def test_reregistration_ignores_claims_for_jobs_it_does_not_hold() -> None:
    s = make(liveness=3.0)
    lose_and_reassign(s)  # j is on w2 now
    w1 = ready(s, b"w1", running=[("j", 1), ("ghost", 3)], credit=0, now=5.0)
    assert w1.running == {}
    assert s.jobs["j"].worker == b"w2"
    ok(s, b"w1", "ghost", 3, now=6.0)  # the unknown task ends: its slot is free again
    assert s.workers[b"w1"].credit == 1


# --- expiry and idempotent submit ------------------------------------------------------------------


def test_result_ttl_expiry_in_tick() -> None:
    s = make(result_ttl=100.0)
    ready(s, b"w", concurrency=2)
    submit(s, "j", keep=True)
    submit(s, "k", keep=True)
    run(s)
    ok(s, b"w", "j", 1, now=10.0)
    ok(s, b"w", "k", 1, now=50.0)
    s.take_actions()
    s.tick(109.0)
    assert set(s.jobs) == {"j", "k"}
    s.tick(110.0)
    assert set(s.jobs) == {"k"}
    assert s.watch(CLIENT, ["j"]) == ["j"]
    s.tick(150.0)
    assert s.jobs == {}


def test_result_ttl_does_not_drop_a_resubmitted_job() -> None:
    s = make(result_ttl=10.0)
    ready(s, b"w")
    submit(s, "j")
    run(s)
    ok(s, b"w", "j", 1, now=1.0)
    s.take_actions()
    s.forget("j")
    submit(s, "j", now=2.0)  # same id, a new job
    s.tick(100.0)
    assert s.jobs["j"].state in (QUEUED, RUNNING)


def test_submit_existing_id_is_idempotent() -> None:
    s = make()
    first = submit(s, "j")
    again = submit(s, "j", owner=OTHER)
    assert again is first and s.n_queued == 1 and s.counts["submitted"] == 1
    ready(s, b"w", concurrency=4)
    assert assigns(run(s)) == {b"w": [("j", 1)]}
    assert submit(s, "j") is first and s.n_queued == 0 and s.n_running == 1  # not queued again
    assert run(s) == []
    ok(s, b"w", "j", 1)
    assert deliveries(s.take_actions()) == [(CLIENT, "j", SUCCEEDED)]  # the latest owner


def test_submit_existing_finished_id_redelivers() -> None:
    s = make()
    ready(s, b"w")
    submit(s, "j", keep=True)
    run(s)
    ok(s, b"w", "j", 1)
    s.take_actions()
    assert submit(s, "j", owner=OTHER).state == SUCCEEDED
    acts = run(s)
    assert deliveries(acts) == [(OTHER, "j", SUCCEEDED)] and assigns(acts) == {}
    assert s.counts["submitted"] == 1 and s.counts[SUCCEEDED] == 1


def test_status_reports_queues_and_workers() -> None:
    s = make()
    ready(s, b"w", concurrency=1, tags=["gpu"])
    submit(s, "a", tags=frozenset({"gpu"}))
    submit(s, "b", tags=frozenset({"gpu"}))
    submit(s, "c", mode="process")
    run(s)
    status = s.status(0.5)
    assert status["queued"] == 2 and status["running"] == 1
    queues = sorted((str(q["mode"]), tuple(q["tags"]), q["queued"]) for q in status["queues"])
    assert queues == [("None", ("gpu",), 1), ("process", (), 1)]
    assert status["workers"][0]["running"] == 1 and status["workers"][0]["last_seen_ago"] == 0.5
    assert status["totals"]["submitted"] == 3


def test_ready_repeated_on_the_same_session_changes_nothing() -> None:
    s = make()
    ready(s, b"w", concurrency=2, session="conn-1")
    submit(s, "a")
    submit(s, "b")
    run(s)  # the Assign is on its way: the worker's next READY cannot list these yet
    w = ready(s, b"w", concurrency=2, running=[], credit=2, session="conn-1", now=1.0)
    assert w.running == {"a": 1, "b": 1} and w.credit == 0 and w.last_seen == 1.0
    assert all(j.state == RUNNING and j.infra_failures == 0 for j in s.jobs.values())
    assert run(s, 1.0) == []
    # A new connection is a new registration: what it does not list is lost.
    w = ready(s, b"w", concurrency=2, running=[("a", 1)], session="conn-2", now=2.0)
    assert w.running == {"a": 1} and w.credit == 1
    assert s.jobs["b"].state == QUEUED and s.jobs["b"].infra_failures == 1
    check_counters(s)


def test_journal_drains_report_each_finish_and_drop_once() -> None:
    s = make(result_ttl=10.0)
    ready(s, b"w", concurrency=3)
    submit(s, "a")
    submit(s, "b", keep=True)
    submit(s, "c")
    run(s)
    assert s.drain_finished() == [] and s.drain_forgotten() == []
    ok(s, b"w", "a", 1, now=1.0)
    s.cancel("c", 1.0)
    assert sorted(j.id for j in s.drain_finished()) == ["a", "c"]
    assert s.drain_finished() == []
    deliver_like_server(s)  # a and c are not kept
    assert sorted(s.drain_forgotten()) == ["a", "c"]
    ok(s, b"w", "b", 1, now=2.0)
    assert [j.id for j in s.drain_finished()] == ["b"]
    deliver_like_server(s)
    assert s.drain_forgotten() == []  # kept
    ok(s, b"w", "c", 1, now=3.0)  # the cancelled attempt reports: nothing new finished
    assert s.drain_finished() == []
    s.tick(12.5)
    assert s.drain_forgotten() == ["b"] and s.jobs == {}


def test_restore_finished_job_from_the_journal() -> None:
    s = make(result_ttl=10.0)
    history = [{"attempt": 1, "worker": "w", "started": 0.0, "finished": 1.0}]
    job = s.restore_finished(
        "old", TaskOptions(keep=True), CLIENT, SUCCEEDED, 1, history, {}, [b"result"], finished_at=100.0
    )
    assert s.jobs["old"] is job and job.state == SUCCEEDED and job.frames is None
    assert s.drain_finished() == [] and s.take_actions() == []  # restored, not finished anew
    assert s.watch(OTHER, ["old"]) == []
    assert deliveries(s.take_actions()) == [(OTHER, "old", SUCCEEDED)]
    assert submit(s, "old") is job  # a client re-sending after the restart gets the stored result
    assert deliveries(s.take_actions()) == [(CLIENT, "old", SUCCEEDED)]
    ready(s, b"w")
    assert assigns(run(s, 100.0)) == {}
    check_counters(s)
    s.tick(109.0)
    assert "old" in s.jobs
    s.tick(110.0)
    assert "old" not in s.jobs and s.drain_forgotten() == ["old"]


# --- TaskOptions.from_wire -------------------------------------------------------------------------


def test_task_options_from_wire_valid() -> None:
    assert TaskOptions.from_wire(None) == TaskOptions()
    assert TaskOptions.from_wire({}) == TaskOptions()
    opts = TaskOptions.from_wire(
        {
            "fn": "pkg.mod:fn",
            "mode": "process",
            "tags": ["gpu", "ssd", "gpu"],
            "retries": 3,
            "retry_backoff": 2,
            "timeout": 5,
            "retry_on": ["ValueError"],
            "keep": 1,
        }
    )
    assert opts == TaskOptions(
        fn="pkg.mod:fn",
        mode="process",
        tags=frozenset({"gpu", "ssd"}),
        retries=3,
        retry_backoff=2.0,
        timeout=5.0,
        retry_on=("ValueError",),
        keep=True,
    )
    assert isinstance(opts.retry_backoff, float) and isinstance(opts.timeout, float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "must be a map"),
        ("opts", "must be a map"),
        ({"mode": 3}, "mode"),
        ({"tags": "gpu"}, "tags"),
        ({"tags": ["gpu", 1]}, "tags"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retries": "2"}, "retries"),
        ({"retry_backoff": -0.1}, "retry_backoff"),
        ({"retry_backoff": "1"}, "retry_backoff"),
        ({"retry_backoff": math.nan}, "retry_backoff"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"retry_on": "ValueError"}, "retry_on"),
        ({"retry_on": [ValueError]}, "retry_on"),
    ],
)
def test_task_options_from_wire_rejects(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskOptions.from_wire(raw)


# --- property test: random event sequences ---------------------------------------------------------

# (mode, tags, concurrency) of the workers the machine plays with.
WORKER_SPECS: dict[bytes, tuple[str, frozenset[str], int]] = {
    b"w0": ("thread", frozenset(), 1),
    b"w1": ("thread", frozenset({"gpu"}), 2),
    b"w2": ("process", frozenset({"gpu", "ssd"}), 3),
}
HEALTHY: dict[bytes, tuple[str, frozenset[str], int]] = {
    b"h-thread": ("thread", frozenset({"gpu", "ssd"}), 4),
    b"h-process": ("process", frozenset({"gpu", "ssd"}), 4),
}
CLIENTS = (b"c0", b"c1")
MODES: tuple[str | None, ...] = (None, "thread", "process")
TAGSETS: tuple[frozenset[str], ...] = (frozenset(), frozenset({"gpu"}), frozenset({"gpu", "ssd"}))
OUTCOME_KINDS = ("success", "retryable", "final", "crash")
INFRA_RETRIES = 2
LIVENESS = 3.0


class SimWorker:
    """The worker process as the dispatcher cannot see it: which attempts really hold a slot."""

    def __init__(self, wid: bytes, mode: str, tags: frozenset[str], concurrency: int) -> None:
        self.wid = wid
        self.mode = mode
        self.tags = tags
        self.concurrency = concurrency
        self.held: dict[tuple[str, int], bool] = {}  # (job id, attempt) -> asked to cancel
        self.silent = False  # stopped sending heartbeats (hung or partitioned)
        self.connections = 0
        self.session = ""


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(infra_retries=INFRA_RETRIES, liveness=LIVENESS, result_ttl=30.0, rng=random.Random(7))
        self.now = 0.0
        self.sims = {wid: SimWorker(wid, *spec) for wid, spec in WORKER_SPECS.items()}
        self.owner: dict[str, bytes] = {}  # every job ever submitted -> its owner
        self.delivered: dict[str, int] = {}
        self.journal_finished: set[str] = set()  # what the journal was told, through drain_finished()
        self.journal_forgotten: set[str] = set()
        self.server_turns = False

    @initialize(server_turns=st.booleans())
    def loop_style(self, server_turns: bool) -> None:
        """True: every event is its own loop turn, ending in schedule() as in server.run().
        False: events pile up and only the `schedule` rule hands out work (a batch of messages)."""
        self.server_turns = server_turns

    # --- plumbing ---------------------------------------------------------------------------------

    def end_turn(self) -> None:
        if self.server_turns:
            self.s.schedule(self.now)
            self.flush()
            self.check_work_conserving()
        else:
            self.flush()

    def check_work_conserving(self) -> None:
        """No worker with credit is left next to a queued job it could run."""
        for wid in self.s._free:
            w = self.s.workers[wid]
            assert w.credit > 0
            for job in self.s.jobs.values():
                if job.state == QUEUED and job.retry_at is None:
                    assert not w.serves(job.class_key), f"{job.id} left queued next to free {wid!r}"

    def flush(self) -> None:
        """Play the socket loop: carry the actions to the simulated peers."""
        for action in self.s.take_actions():
            if isinstance(action, Assign):
                w = self.s.workers.get(action.worker)
                assert w is not None, "assigned to an unregistered worker"
                assert not w.draining, "assigned to a draining worker"
                sim = self.sims[action.worker]
                for job in action.jobs:
                    assert job.state == RUNNING and job.worker == action.worker
                    assert (job.id, job.attempt) not in sim.held
                    sim.held[(job.id, job.attempt)] = False
                assert len(sim.held) <= sim.concurrency, "more attempts on a worker than its slots"
            elif isinstance(action, CancelRunning):
                key = (action.job_id, action.attempt)
                sim = self.sims[action.worker]
                if key in sim.held:
                    sim.held[key] = True
            else:
                for job in action.jobs:
                    assert job.state in FINISHED_STATES
                    assert action.client == self.owner[job.id], "delivered to someone else"
                    self.delivered[job.id] = self.delivered.get(job.id, 0) + 1
                    assert self.delivered[job.id] == 1, f"{job.id} delivered twice"
                    if not job.opts.keep:
                        self.s.forget(job.id)
        for job in self.s.drain_finished():
            assert job.state in FINISHED_STATES
            assert job.id not in self.journal_finished, f"{job.id} journaled as finished twice"
            self.journal_finished.add(job.id)
        for job_id in self.s.drain_forgotten():
            assert job_id in self.journal_finished and job_id not in self.journal_forgotten
            assert job_id not in self.s.jobs
            self.journal_forgotten.add(job_id)

    def register(self, sim: SimWorker) -> None:
        """READY on a new connection (a new session), listing what the worker still runs."""
        sim.connections += 1
        sim.session = f"{sim.wid.decode()}-{sim.connections}"
        running = sorted(sim.held, key=lambda k: k[1])  # the newest attempt of a job wins
        self.s.worker_ready(
            sim.wid,
            name=sim.wid.decode(),
            host="h",
            pid=1,
            mode=sim.mode,
            concurrency=sim.concurrency,
            tags=sim.tags,
            credit=sim.concurrency - len(sim.held),
            running=running,
            now=self.now,
            session=sim.session,
        )
        sim.silent = False

    def report(self, sim: SimWorker, key: tuple[str, int], kind: str) -> None:
        """The worker process reports one attempt's outcome (the server calls heard_from first)."""
        cancel_requested = sim.held.pop(key)
        self.s.heard_from(sim.wid, self.now)
        sim.silent = False
        job_id, attempt = key
        if kind == "success":
            self.s.outcome(sim.wid, job_id, attempt, True, {}, [b"result"], self.now)
            return
        if cancel_requested:
            info = perr.error_info(perr.CANCELLED, "JobCancelled", "cancelled")
        elif kind == "crash":
            info = crash_info()
        else:
            info = exc_info(retryable=kind == "retryable")
        self.s.outcome(sim.wid, job_id, attempt, False, info, [b"exc"], self.now)

    def unfinished(self) -> list[str]:
        return sorted(j for j in self.owner if j in self.s.jobs and self.s.jobs[j].state not in FINISHED_STATES)

    # --- rules --------------------------------------------------------------------------------------

    @rule(
        owner=st.sampled_from(CLIENTS),
        mode=st.sampled_from(MODES),
        tags=st.sampled_from(TAGSETS),
        retries=st.integers(0, 2),
        backoff=st.sampled_from([0.0, 0.5, 4.0]),
        keep=st.booleans(),
    )
    def submit(
        self, owner: bytes, mode: str | None, tags: frozenset[str], retries: int, backoff: float, keep: bool
    ) -> None:
        job_id = f"j{len(self.owner)}"
        opts = TaskOptions(fn="t", mode=mode, tags=tags, retries=retries, retry_backoff=backoff, keep=keep)
        self.s.submit(job_id, opts, [b"call"], owner, self.now)
        self.owner[job_id] = owner
        self.end_turn()

    @precondition(lambda self: bool(self.unfinished()))
    @rule(data=st.data())
    def resubmit_unfinished(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.unfinished()))
        before = (self.s.n_queued, self.s.n_running, self.s.counts["submitted"])
        job = self.s.jobs[job_id]
        assert self.s.submit(job_id, TaskOptions(), [b"call"], self.owner[job_id], self.now) is job
        assert (self.s.n_queued, self.s.n_running, self.s.counts["submitted"]) == before
        self.end_turn()

    @rule(wid=st.sampled_from(sorted(WORKER_SPECS)))
    def worker_ready(self, wid: bytes) -> None:
        self.register(self.sims[wid])  # first registration, or a reconnect with what it still runs
        self.end_turn()

    @rule()
    def schedule(self) -> None:
        self.s.schedule(self.now)
        self.flush()
        self.check_work_conserving()

    @rule(data=st.data(), kind=st.sampled_from(OUTCOME_KINDS))
    def outcome(self, data: st.DataObject, kind: str) -> None:
        busy = [sim for sim in self.sims.values() if sim.held]
        if not busy:
            return
        sim = data.draw(st.sampled_from(busy))
        keys = sorted(sim.held)
        stale = [k for k in keys if not self.is_current(sim.wid, k)]
        prefer_stale: bool = data.draw(st.booleans())
        if stale and prefer_stale:  # fencing lives in outcomes that no longer count
            keys = stale
        key = data.draw(st.sampled_from(keys))
        self.report(sim, key, kind)
        self.end_turn()

    def is_current(self, wid: bytes, key: tuple[str, int]) -> bool:
        job = self.s.jobs.get(key[0])
        return job is not None and (job.state, job.worker, job.attempt) == (RUNNING, wid, key[1])

    @rule(wid=st.sampled_from(sorted(WORKER_SPECS)), data=st.data())
    def ready_again_same_session(self, wid: bytes, data: st.DataObject) -> None:
        """A READY repeated on the same connection, written before some Assigns reached the worker."""
        w = self.s.workers.get(wid)
        sim = self.sims[wid]
        if w is None or w.session != sim.session:
            return
        listed = data.draw(st.sets(st.sampled_from(sorted(sim.held)))) if sim.held else set()
        before = (dict(w.running), w.credit)
        self.s.worker_ready(
            wid,
            name=wid.decode(),
            host="h",
            pid=1,
            mode=sim.mode,
            concurrency=sim.concurrency,
            tags=sim.tags,
            credit=sim.concurrency - len(listed),
            running=sorted(listed),
            now=self.now,
            session=sim.session,
        )
        assert self.s.workers[wid] is w and (w.running, w.credit) == before
        self.end_turn()

    @rule(wid=st.sampled_from(sorted(WORKER_SPECS)))
    def go_silent(self, wid: bytes) -> None:
        self.sims[wid].silent = True

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5, 4.0, 40.0]))
    def time_passes(self, dt: float) -> None:
        """The loop's heartbeat: live workers are heard from, silent ones expire, timers fire."""
        self.now += dt
        for sim in self.sims.values():
            if not sim.silent:
                self.s.heard_from(sim.wid, self.now)
        lost = self.s.expire_workers(self.now)
        assert all(self.sims[w.id].silent for w in lost)
        self.s.tick(self.now)
        timer = self.s.next_timer()
        assert timer is None or timer > self.now  # every due retry was moved back to its queue
        self.end_turn()

    @rule(wid=st.sampled_from(sorted(WORKER_SPECS)))
    def partition_heals(self, wid: bytes) -> None:
        """A worker goes unheard past the liveness limit, is expired, then reconnects with what it still runs."""
        sim = self.sims[wid]
        sim.silent = True
        self.time_passes(LIVENESS + 1.0)
        assert wid not in self.s.workers
        self.register(sim)
        self.end_turn()

    @precondition(lambda self: bool(self.owner))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.owner)))
        job = self.s.jobs.get(job_id)
        expect = job is not None and job.state not in FINISHED_STATES
        assert self.s.cancel(job_id, self.now) is expect
        if expect:
            assert self.s.jobs[job_id].state == CANCELLED
        self.end_turn()

    @rule(wid=st.sampled_from(sorted(WORKER_SPECS)))
    def leave(self, wid: bytes) -> None:
        self.s.heard_from(wid, self.now)
        self.s.worker_leaving(wid)
        self.end_turn()

    @rule(wid=st.sampled_from(sorted(WORKER_SPECS)))
    def give_back_and_goodbye(self, wid: bytes) -> None:
        """End of a drain: hand back every unfinished attempt, then say goodbye."""
        sim = self.sims[wid]
        if wid not in self.s.workers:
            return
        self.s.heard_from(wid, self.now)
        for job_id, attempt in sorted(sim.held):
            self.s.give_back(wid, job_id, attempt, self.now)
        sim.held.clear()
        self.s.worker_gone(wid, self.now)
        assert wid not in self.s.workers
        self.end_turn()

    @rule(data=st.data())
    def give_back_one(self, data: st.DataObject) -> None:
        busy = [sim for sim in self.sims.values() if sim.held and sim.wid in self.s.workers]
        if not busy:
            return
        sim = data.draw(st.sampled_from(busy))
        key = data.draw(st.sampled_from(sorted(sim.held)))
        job = self.s.jobs.get(key[0])
        failures = (job.failures, job.infra_failures) if job is not None else None
        del sim.held[key]
        self.s.heard_from(sim.wid, self.now)
        self.s.give_back(sim.wid, key[0], key[1], self.now)
        if job is not None:
            assert (job.failures, job.infra_failures) == failures  # a hand-back is not a failure
        self.end_turn()

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def counters_match_a_recount(self) -> None:
        s = self.s
        jobs = s.jobs.values()
        assert s.n_queued == sum(j.state == QUEUED for j in jobs)
        assert s.n_running == sum(j.state == RUNNING for j in jobs)
        for key, n in s._queued_by_class.items():
            assert n == sum(j.state == QUEUED and j.retry_at is None and j.class_key == key for j in jobs)

    @invariant()
    def workers_within_concurrency(self) -> None:
        for wid, w in self.s.workers.items():
            assert w.credit >= 0 and len(w.running) + w.credit <= w.concurrency
            assert (wid in self.s._free) == (w.credit > 0 and not w.draining)
            for job_id, attempt in w.running.items():
                job = self.s.jobs[job_id]
                assert (job.state, job.worker, job.attempt) == (RUNNING, wid, attempt)
        for sim in self.sims.values():
            assert len(sim.held) <= sim.concurrency

    @invariant()
    def no_job_lost_or_delivered_twice(self) -> None:
        s = self.s
        for job_id in self.owner:
            job = s.jobs.get(job_id)
            n = self.delivered.get(job_id, 0)
            assert n <= 1
            if n == 1:
                assert job is None or job.state in FINISHED_STATES
                continue
            assert job is not None, f"{job_id} vanished undelivered"
            assert job.state in (QUEUED, RUNNING), f"{job_id} is {job.state} but was not delivered"
            if job.state == RUNNING:
                assert job.worker in s.workers, f"{job_id} runs on an unregistered worker"
                assert s.workers[job.worker].running.get(job_id) == job.attempt
                assert (job_id, job.attempt) in self.sims[job.worker].held
            elif job.retry_at is None:
                assert any(j is job for j in s._queues[job.class_key]), f"{job_id} is queued nowhere"
            else:
                assert (job.retry_at, job.seq, job_id) in s._delayed, f"{job_id} is delayed without a timer"

    def teardown(self) -> None:
        """Drain everything with healthy workers: every job ends, and is delivered exactly once."""
        s = self.s
        for sim in self.sims.values():  # the old workers finish what they hold, then leave
            for key in sorted(sim.held):
                self.report(sim, key, "success")
            if sim.wid in s.workers:
                s.worker_gone(sim.wid, self.now)
            self.flush()
        healthy = {wid: SimWorker(wid, *spec) for wid, spec in HEALTHY.items()}
        self.sims.update(healthy)
        for sim in healthy.values():
            self.register(sim)
        for _ in range(len(self.owner) + 2):  # each turn finishes at least one job, or we fail below
            if all(self.delivered.get(j) == 1 for j in self.owner):
                break
            self.now += MAX_BACKOFF * 1.5 + 1  # every retry timer has fired
            for wid in healthy:
                s.heard_from(wid, self.now)
            s.expire_workers(self.now)
            s.tick(self.now)
            s.schedule(self.now)
            self.flush()
            for sim in healthy.values():
                for key in sorted(sim.held):
                    self.report(sim, key, "success")
            self.flush()
        missing = [j for j in self.owner if self.delivered.get(j) != 1]
        assert not missing, f"never finished: {missing}"
        assert self.journal_finished == set(self.owner)
        assert s.n_queued == 0 and s.n_running == 0


SchedulerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_state_machine = SchedulerMachine.TestCase


# --- auto prefetch: the window follows the worker's task durations ----------------------------------


def auto_worker(s: Scheduler, wid: bytes = b"w", concurrency: int = 2, prefetch: int = 256) -> WorkerInfo:
    return s.worker_ready(
        wid, name=wid.decode(), host="host", pid=1, mode="thread", concurrency=concurrency, tags=(),
        credit=concurrency + prefetch, running=(), now=0.0, prefetch=prefetch, prefetch_auto=True,
    )


def finish_all(s: Scheduler, wid: bytes, duration: float) -> int:
    """Every job the worker holds succeeds, taking `duration` each; returns how many there were."""
    held = list(s.workers[wid].running.items())
    for job_id, attempt in held:
        s.outcome(wid, job_id, attempt, True, {"duration": duration}, [b"r"], 1.0)
    return len(held)


def test_a_duration_that_is_not_a_finite_number_is_ignored() -> None:
    # An infinite duration once made the average NaN, and every later outcome of that worker raised
    # (int(nan)) after its job had left w.running: its jobs stayed RUNNING and its credit leaked.
    s = make()
    w = auto_worker(s)
    for i, duration in enumerate([math.inf, math.nan, -1.0, 0.0001]):
        submit(s, f"j{i}")
        run(s)
        s.outcome(b"w", f"j{i}", 1, True, {"duration": duration}, [b"r"], 1.0)
    assert w.mean_duration == 0.0001 and w.window > 0
    check_counters(s)


def test_auto_prefetch_holds_nothing_extra_until_durations_are_known() -> None:
    s = make()
    for i in range(50):
        submit(s, f"j{i}")
    w = auto_worker(s)
    assert len(assigns(run(s))[b"w"]) == 2  # no durations yet: as many as slots
    assert w.window == 0 and w.credit == 0


def test_auto_prefetch_window_grows_for_tiny_tasks_and_shrinks_for_slow_ones() -> None:
    s = make()
    for i in range(2000):
        submit(s, f"j{i}")
    w = auto_worker(s)
    run(s)
    finish_all(s, b"w", 0.00001)  # 10 µs tasks: 2 slots x 2 ms / 10 µs = 400, capped at 256
    assert w.window == 256
    assert len(assigns(run(s))[b"w"]) == 258  # slots plus the window, in one Assign
    for _ in range(20):  # then the tasks get slow (50 ms): the window closes
        finish_all(s, b"w", 0.05)
        run(s)
    assert w.window == 0 and len(w.running) <= w.concurrency
    check_counters(s)


def test_auto_prefetch_waits_for_a_quarter_of_the_window_while_slots_are_busy() -> None:
    s = make()
    for i in range(2000):
        submit(s, f"j{i}")
    w = auto_worker(s, concurrency=2, prefetch=64)
    run(s)
    finish_all(s, b"w", 0.0)
    run(s)  # now holding 2 + 64
    held = list(w.running.items())
    for job_id, attempt in held[:10]:  # 10 outcomes: under a quarter (16) of the window
        s.outcome(b"w", job_id, attempt, True, {"duration": 0.0}, [b"r"], 1.0)
    assert assigns(run(s)) == {}  # no sliver-sized Assign while its slots are all taken
    for job_id, attempt in held[10:16]:
        s.outcome(b"w", job_id, attempt, True, {"duration": 0.0}, [b"r"], 1.0)
    assert len(assigns(run(s))[b"w"]) == 16


def test_a_give_back_closes_an_auto_window() -> None:
    """A worker hands back its waiting jobs when a slow task stalled it: it gets no extra ones for a while."""
    s = make()
    for i in range(600):
        submit(s, f"j{i}")
    w = auto_worker(s)
    run(s)
    finish_all(s, b"w", 0.0)
    run(s)
    assert w.window == 256 and len(w.running) == 258
    waiting = list(w.running.items())[2:]
    for job_id, attempt in waiting:
        s.give_back(b"w", job_id, attempt, 2.0)
    assert w.window == 0 and w.credit == 0  # its 2 slots are still busy
    assert all(s.jobs[j].state == QUEUED for j, _ in waiting)
    check_counters(s)


def test_a_fixed_prefetch_does_not_adapt() -> None:
    s = make()
    for i in range(100):
        submit(s, f"j{i}")
    w = s.worker_ready(
        b"w", name="w", host="host", pid=1, mode="thread", concurrency=1, tags=(), credit=4, running=(),
        now=0.0, prefetch=3,
    )
    assert len(assigns(run(s))[b"w"]) == 4
    finish_all(s, b"w", 5.0)  # slow tasks change nothing
    assert w.window == 3 and len(assigns(run(s))[b"w"]) == 4


def test_status_reports_each_workers_current_prefetch_window() -> None:
    """STATUS shows the window the dispatcher sized, not only the configured cap (256 with auto)."""
    s = make()
    for i in range(100):
        submit(s, f"j{i}")
    auto_worker(s, b"auto")
    s.worker_ready(
        b"fixed", name="fixed", host="host", pid=2, mode="thread", concurrency=1, tags=(), credit=4, running=(),
        now=0.0, prefetch=3,
    )

    def views() -> dict[str, tuple[int, bool, int]]:
        return {w["name"]: (w["prefetch"], w["prefetch_auto"], w["window"]) for w in s.status(1.0)["workers"]}

    assert views() == {"auto": (256, True, 0), "fixed": (3, False, 3)}  # no durations known yet
    run(s)
    finish_all(s, b"auto", 0.0001)  # 0.1 ms tasks: 2 slots x 2 ms / 0.1 ms = 40
    finish_all(s, b"fixed", 0.0001)
    assert views() == {"auto": (256, True, 40), "fixed": (3, False, 3)}

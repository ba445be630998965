"""The scheduler's bookkeeping for broken connections, memory and refusals: events in, actions out.

- outcomes to clients: numbered, kept until acknowledged (deliveries.py);
- outcomes from workers: applied in order, a gap asks for a RESEND (results_in_order);
- jobs refused because they cannot be made durable; bytes held; queue classes pruned.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.dispatcher.model import CancelRunning, Deliver, Resend
from conveyor.dispatcher.scheduler import QUEUED, RUNNING, SUCCEEDED, Scheduler
from conveyor.protocol.commands import TaskOptions
from tests.test_scheduler import CLIENT, FRAMES, OTHER, check_counters, make, ok, ready, run, submit


def finish(s: Scheduler, job_id: str, keep: bool = False, owner: bytes = CLIENT) -> list[Deliver]:
    """Submit job_id, run it on worker w to success; the Deliver actions that come out."""
    if b"w" not in s.workers:
        ready(s, b"w", concurrency=4)
    submit(s, job_id, owner=owner, keep=keep)
    run(s)
    ok(s, b"w", job_id, s.jobs[job_id].attempt)
    return [a for a in s.take_actions() if isinstance(a, Deliver)]


def test_a_delivered_job_is_forgotten_only_once_acknowledged() -> None:
    s = make()
    [d] = finish(s, "a")
    assert (d.client, d.seq, [j.id for j in d.jobs]) == (CLIENT, 1, ["a"])
    assert "a" in s.jobs  # sent is not received: a broken connection drops what was queued on it
    s.acked(CLIENT, 1)
    assert "a" not in s.jobs and s.drain_forgotten() == ["a"]


def test_numbers_follow_each_client_and_acks_are_cumulative() -> None:
    s = make()
    assert [d.seq for d in finish(s, "a")] == [1]
    assert [d.seq for d in finish(s, "b")] == [2]
    assert [d.seq for d in finish(s, "x", owner=OTHER)] == [1]  # its own sequence
    s.acked(CLIENT, 2)
    assert "a" not in s.jobs and "b" not in s.jobs and "x" in s.jobs
    s.acked(CLIENT, 2)  # a repeated ack (a ping after the ACK) changes nothing
    assert s.deliveries.unacked(CLIENT) == 0


def test_a_redelivery_is_not_forgotten_by_the_ack_of_a_later_number() -> None:
    """JOB_DONE 1 is lost on a broken connection, 2 arrives; the client asks again (re-SUBMIT) and acks 2:
    the job of 1 is redelivered as 3 and stays until 3 is acknowledged."""
    s = make()
    finish(s, "lost")  # seq 1, never arrives
    finish(s, "seen")  # seq 2
    s.submit("lost", s.jobs["lost"].opts, list(FRAMES), CLIENT, 2.0)  # the client re-sends its pending job
    s.acked(CLIENT, 2)  # it saw 2 (and its ACK crosses the redelivery)
    assert "lost" in s.jobs and "seen" not in s.jobs
    [d] = [a for a in s.take_actions() if isinstance(a, Deliver)]
    assert (d.seq, [j.id for j in d.jobs]) == (3, ["lost"])
    s.acked(CLIENT, 3)
    assert "lost" not in s.jobs


def test_a_failed_send_or_a_vanished_client_keeps_the_result_until_its_ttl() -> None:
    s = make(result_ttl=100.0)
    [d] = finish(s, "a")
    s.delivery_failed(CLIENT, d.seq)
    assert "a" in s.jobs and s.deliveries.unacked(CLIENT) == 0
    finish(s, "b")
    s.client_gone(CLIENT)
    assert "b" in s.jobs  # still fetchable by id (WATCH) until the TTL
    s.tick(50.0)
    assert "a" in s.jobs
    s.tick(200.0)
    assert "a" not in s.jobs and "b" not in s.jobs


def test_a_kept_job_is_never_forgotten_by_acks() -> None:
    s = make()
    finish(s, "k", keep=True)
    s.acked(CLIENT, 1)
    assert s.jobs["k"].state == SUCCEEDED


def test_a_job_delivered_to_owner_and_watcher_waits_for_both() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    submit(s, "a")
    s.watch(OTHER, ["a"])
    run(s)
    ok(s, b"w", "a", 1)
    s.take_actions()
    s.acked(CLIENT, 1)
    assert "a" in s.jobs
    s.acked(OTHER, 1)
    assert "a" not in s.jobs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["finish", "lose", "arrive"]), st.integers(0, 5)), max_size=40))
def test_no_job_is_forgotten_before_the_client_has_it(ops: list[tuple[str, int]]) -> None:
    """Random deliveries and losses, with a client that follows §12: it acknowledges what arrives, and on a
    gap in the numbers it first re-sends every job it still waits for. A job leaves the dispatcher only
    after a delivery of it reached the client."""
    s = make()
    received: set[str] = set()  # job ids some JOB_DONE of which reached the client
    highest = 0  # the highest JOB_DONE number the client has seen
    in_flight: dict[int, list[str]] = {}
    n = 0

    def take() -> None:
        for a in s.take_actions():
            if isinstance(a, Deliver):
                in_flight[a.seq] = [j.id for j in a.jobs]

    for op, k in ops:
        if op == "finish":
            n += 1
            for d in finish(s, f"j{n}"):
                in_flight[d.seq] = [j.id for j in d.jobs]
        elif op == "lose" and in_flight:
            in_flight.pop(sorted(in_flight)[k % len(in_flight)])
        elif op == "arrive" and in_flight:
            seq = sorted(in_flight)[k % len(in_flight)]
            received.update(in_flight.pop(seq))
            if seq != highest + 1:  # a gap (or an old one): ask again for everything still missing
                for job_id in [f"j{i}" for i in range(1, n + 1) if f"j{i}" not in received and f"j{i}" in s.jobs]:
                    s.submit(job_id, s.jobs[job_id].opts, list(FRAMES), CLIENT, 1.0)
                take()
            highest = max(highest, seq)
            s.acked(CLIENT, highest)
        for i in range(1, n + 1):
            if f"j{i}" not in s.jobs:
                assert f"j{i}" in received, f"j{i} forgotten before any delivery of it arrived"


# --- RESULTS in order ---------------------------------------------------------------------------------


def test_results_are_applied_in_order_and_a_gap_asks_for_a_resend() -> None:
    s = make()
    ready(s, b"w")
    assert s.results_in_order(b"w", 1)
    assert not s.results_in_order(b"w", 1)  # a re-send of what was applied: dropped
    assert not s.results_in_order(b"w", 3)  # 2 went missing
    assert [(a.worker, a.seq) for a in s.take_actions() if isinstance(a, Resend)] == [(b"w", 2)]
    assert not s.results_in_order(b"w", 4)
    assert [a for a in s.take_actions() if isinstance(a, Resend)] == []  # asked once per gap
    assert s.results_in_order(b"w", 2) and s.results_in_order(b"w", 3) and s.results_in_order(b"w", 4)
    assert s.workers[b"w"].results_acked == 4


def test_a_reconnected_worker_keeps_its_numbering_and_unknown_workers_are_applied() -> None:
    s = make()
    ready(s, b"w", session="one")
    assert s.results_in_order(b"w", 1) and s.results_in_order(b"w", 2)
    w = s.worker_ready(b"w", name="w", host="h", pid=1, mode="thread", concurrency=1, tags=(), credit=1,
                       running=(), now=1.0, session="two", results_seq=1)  # it re-sends from 1
    assert w.results_next == 3  # what it applied is not applied twice
    assert s.results_in_order(b"nobody", 7)  # a late outcome from a worker not registered: applied


def test_a_listed_assignment_that_no_longer_counts_is_cancelled_on_reconnect() -> None:
    s = make()
    ready(s, b"w", concurrency=2, session="one")
    submit(s, "a")
    run(s)
    s.cancel("a", 1.0)
    s.take_actions()  # the CANCEL was lost with the connection
    ready(s, b"w", concurrency=2, session="two", running=[("a", 1)])
    assert [(a.job_id, a.attempt) for a in s.take_actions() if isinstance(a, CancelRunning)] == [("a", 1)]


# --- refusals, bytes, classes --------------------------------------------------------------------------


def test_a_refused_job_leaves_no_trace_but_a_running_one_stays() -> None:
    s = make()
    submit(s, "q")
    ready(s, b"w", concurrency=1)
    submit(s, "r")
    run(s)  # q starts, r waits
    running = next(j for j in ("q", "r") if s.jobs[j].state == RUNNING)
    queued = next(j for j in ("q", "r") if s.jobs[j].state == QUEUED)
    assert not s.refuse(running)
    assert s.refuse(queued) and queued not in s.jobs
    assert s.counts["refused"] == 1 and s.counts["submitted"] == 1
    check_counters(s)
    assert run(s) == []


def test_held_bytes_count_the_call_frames_of_unfinished_jobs() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    s.submit("big", TaskOptions(), [b"x" * 1000, b"y" * 24], CLIENT, 0.0)
    assert s.held_bytes == 1024
    run(s)
    assert s.held_bytes == 1024  # still held while it runs (it may be retried)
    ok(s, b"w", "big", 1)
    assert s.held_bytes == 0


def test_queue_classes_are_pruned_when_empty() -> None:
    """Per-job tags used to leave a queue class behind for every job, in memory and in every pop."""
    s = make()
    ready(s, b"w", concurrency=1, tags=[f"t{i}" for i in range(1000)])
    for i in range(1000):
        submit(s, f"j{i}", tags=frozenset({f"t{i}"}))
        run(s)
        ok(s, b"w", f"j{i}", 1)
        s.take_actions()
    assert len(s._queues) == 0 and len(s.workers[b"w"].classes) == 0
    submit(s, "again", tags=frozenset({"t5"}))
    assert run(s) and s.jobs["again"].state == RUNNING

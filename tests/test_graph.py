"""Dependencies in the pure scheduler: fan-out, fan-in, chains, failure and cancellation propagation with
their root, results pinned until dependants have run. Events in, actions out."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.dispatcher.graph import EARLY_JOIN_MIN, UnknownParent
from conveyor.dispatcher.scheduler import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    WAITING,
    Assign,
    Deliver,
    Scheduler,
)
from conveyor.protocol import failures as perr
from conveyor.protocol.commands import TaskOptions
from tests.test_scheduler import CLIENT, FRAMES, exc_info, fail, ok, ready, run


def make() -> Scheduler:
    return Scheduler(rng=random.Random(3))


def add(s: Scheduler, job_id: str, parents: tuple[str, ...] = (), after: tuple[str, ...] = (),
        allow: tuple[str, ...] = (), now: float = 0.0, **opts: Any) -> None:
    s.submit(job_id, TaskOptions(fn=f"t:{job_id}", **opts), list(FRAMES), CLIENT, now,
             parents=parents, after=after, allow_failure=allow)


def assigned(s: Scheduler, now: float = 0.0) -> list[str]:
    return [j.id for a in run(s, now) if isinstance(a, Assign) for j in a.jobs]


def succeed(s: Scheduler, job_id: str, result: bytes = b"r", now: float = 1.0) -> None:
    job = s.jobs[job_id]
    assert job.worker is not None
    ok(s, job.worker, job_id, job.attempt, now=now, result=result)


def test_a_fan_out_then_fan_in_runs_the_body_once_every_parent_has_succeeded() -> None:
    s = make()
    ready(s, b"w", concurrency=10)
    for i in range(5):
        add(s, f"p{i}")
    add(s, "sum", parents=tuple(f"p{i}" for i in range(5)))
    assert s.jobs["sum"].state == WAITING and s.n_waiting == 1
    assert sorted(assigned(s)) == [f"p{i}" for i in range(5)]
    for i in range(4):
        succeed(s, f"p{i}")
        assert s.jobs["sum"].state == WAITING and s.jobs["sum"].node.waiting == 4 - i  # a counter, O(1) each
    succeed(s, "p4")
    assert s.jobs["sum"].state == QUEUED and s.n_waiting == 0
    assert assigned(s, 1.0) == ["sum"]


def test_a_chain_runs_in_order_and_parents_stay_until_their_dependant_ran() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    add(s, "a")
    add(s, "b", parents=("a",))
    add(s, "c", parents=("b",))
    assert assigned(s) == ["a"]
    succeed(s, "a")
    s.take_actions()
    s.acked(CLIENT, 99)  # delivered and acknowledged: still pinned for b
    assert "a" in s.jobs
    assert assigned(s, 1.0) == ["b"]
    succeed(s, "b", now=2.0)
    s.take_actions()
    assert "a" not in s.jobs  # b has run: a's result is let go (delivered and acknowledged already)
    assert assigned(s, 2.0) == ["c"]


def test_a_failure_propagates_to_every_transitive_dependant_naming_its_root() -> None:
    s = make()
    ready(s, b"w", concurrency=4)
    add(s, "root")
    add(s, "mid", parents=("root",))
    add(s, "leaf", parents=("mid",))
    add(s, "side", after=("root",))
    add(s, "tolerant", parents=("root",), allow=("root",))
    run(s)
    fail(s, b"w", "root", 1, exc_info(retryable=False))
    for job_id in ("mid", "leaf", "side"):
        job = s.jobs[job_id]
        assert job.state == FAILED, job_id
        info = job.result_info
        assert info["kind"] == perr.DEPENDENCY_FAILED and info["root"] == "root" and info["root_fn"] == "t:root"
        assert info["root_error"]["type"] == "ValueError"
    assert s.jobs["tolerant"].state == QUEUED  # allow_failure: it runs and gets conveyor.Failed
    done = [j.id for a in s.take_actions() if isinstance(a, Deliver) for j in a.jobs]
    assert sorted(done) == ["leaf", "mid", "root", "side"]  # all in the same turn


def test_a_chain_of_ten_thousand_fails_in_one_turn_without_recursion() -> None:
    s = make()
    ready(s, b"w", concurrency=1)
    add(s, "n0")
    for i in range(1, 10_000):
        add(s, f"n{i}", parents=(f"n{i - 1}",))
    run(s)
    fail(s, b"w", "n0", 1, exc_info(retryable=False))
    assert s.jobs["n9999"].state == FAILED and s.jobs["n9999"].result_info["root"] == "n0"
    assert s.n_waiting == 0


def test_cancelling_a_job_cancels_its_dependants_and_leaves_its_parents() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    add(s, "parent")
    add(s, "job", parents=("parent",))
    add(s, "child", parents=("job",))
    run(s)
    assert s.cancel("job", 1.0)
    assert s.jobs["child"].state == CANCELLED
    assert s.jobs["child"].result_info["kind"] == perr.DEPENDENCY_CANCELLED
    assert s.jobs["parent"].state == RUNNING


def test_an_unknown_parent_is_refused_at_once() -> None:
    s = make()
    with pytest.raises(UnknownParent, match="ghost"):
        add(s, "orphan", parents=("ghost",))
    assert "orphan" not in s.jobs


def test_a_parent_that_already_failed_fails_its_new_dependant_at_once() -> None:
    s = make()
    ready(s, b"w")
    add(s, "p")
    run(s)
    fail(s, b"w", "p", 1, exc_info(retryable=False))
    s.take_actions()
    add(s, "late", parents=("p",))
    assert s.jobs["late"].state == FAILED


def test_a_large_result_its_dependants_use_is_withheld_from_its_client() -> None:
    s = make()
    ready(s, b"w", concurrency=2)
    add(s, "big")
    add(s, "use", parents=("big",))
    add(s, "small")
    run(s)
    succeed(s, "big", result=b"x" * 200_000)
    succeed(s, "small", result=b"x" * 200_000)
    [d] = [a for a in s.take_actions() if isinstance(a, Deliver)]
    assert d.withhold == frozenset({"big"})  # "small" has no dependant: sent as usual


def test_a_withheld_result_stays_for_its_client_after_its_dependants_ran() -> None:
    """Acknowledging a JOB_DONE sent without the result is not a delivery: once its dependants have run,
    the job stays (until the result TTL) so that its client can still ask for it (WATCH)."""
    s = make()
    ready(s, b"w", concurrency=2)
    add(s, "big")
    add(s, "use", parents=("big",))
    run(s)
    succeed(s, "big", result=b"x" * 200_000)
    [d] = [a for a in s.take_actions() if isinstance(a, Deliver)]
    s.acked(CLIENT, d.seq)
    run(s, 1.0)
    succeed(s, "use", now=2.0)
    [d2] = [a for a in s.take_actions() if isinstance(a, Deliver)]
    s.acked(CLIENT, d2.seq)
    assert "use" not in s.jobs and "big" in s.jobs  # the dependant is forgotten; the withheld one stays
    s.watch(CLIENT, ["big"])
    [d3] = [a for a in s.take_actions() if isinstance(a, Deliver)]
    assert [j.id for j in d3.jobs] == ["big"] and not d3.withhold  # now with its result
    s.acked(CLIENT, d3.seq)
    assert "big" not in s.jobs


def test_expiry_of_a_parent_cancels_the_dependants() -> None:
    s = make()
    s.submit("p", TaskOptions(fn="t:p"), list(FRAMES), CLIENT, 0.0, expires=5.0)
    add(s, "c", parents=("p",))
    s.tick(6.0)
    assert s.jobs["c"].state == CANCELLED and "expired" in s.jobs["c"].result_info["message"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_random_dag_matches_a_local_evaluation(data: st.DataObject) -> None:
    """Random DAGs where some nodes fail: each node ends once, succeeded iff all its parents did (or are
    allowed to fail), and a failed node's root is an ancestor that failed by itself."""
    s = make()
    ready(s, b"w", concurrency=8)
    n = data.draw(st.integers(1, 40))
    parents: dict[str, tuple[str, ...]] = {}
    fails: set[str] = set()
    for i in range(n):
        job_id = f"n{i}"
        earlier = [f"n{j}" for j in range(i)]
        ps = tuple(data.draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True))) if earlier else ()
        parents[job_id] = ps
        if data.draw(st.integers(0, 9)) < 3:  # about 30 % fail
            fails.add(job_id)
        add(s, job_id, parents=ps)
    for _ in range(n + 2):
        for a in run(s, 1.0):
            if isinstance(a, Assign):
                for job in a.jobs:
                    if job.id in fails:
                        fail(s, b"w", job.id, job.attempt, exc_info(retryable=False))
                    else:
                        ok(s, b"w", job.id, job.attempt)
    expect: dict[str, str] = {}
    for i in range(n):
        job_id = f"n{i}"
        if any(expect[p] != SUCCEEDED for p in parents[job_id]) or job_id in fails:
            expect[job_id] = FAILED
        else:
            expect[job_id] = SUCCEEDED
    assert {j: s.jobs[j].state for j in expect} == expect
    for job_id, state in expect.items():
        info = s.jobs[job_id].result_info
        if state == FAILED and info.get("kind") == perr.DEPENDENCY_FAILED:
            assert info["root"] in fails


def test_a_batch_of_thirty_thousand_with_a_fan_in_over_all_is_checked_in_linear_time() -> None:
    """SUBMIT of one batch: every entry's parents may be earlier entries. The check once rebuilt the list
    of earlier ids for every entry (quadratic: a 100,001-entry batch stalled the dispatcher for minutes)."""
    import time

    from conveyor.dispatcher.clients import ClientSide
    from conveyor.dispatcher.observe.observer import Observer
    from conveyor.protocol.commands import Accepted, SubmitEntry, raw_options

    s = make()
    sent: list[Any] = []
    observer = Observer(s, lambda *a: True, lambda: None, dict)
    side = ClientSide(s, observer, None, lambda peer, cmd, body, frames: sent.append(body) or True,
                      instance="i", heartbeat_interval=1.0, max_queued=10**6, max_queued_bytes=1 << 40,
                      decorate_status=lambda st, now: None)
    opts = raw_options(TaskOptions(fn="t:f"))
    n = 30_000
    entries = [SubmitEntry(f"p{i}", opts, 1, batch="b") for i in range(n)]
    entries.append(SubmitEntry("fan-in", opts, 1, parents=tuple(f"p{i}" for i in range(n)), batch="b"))
    started = time.process_time()
    side.on_submit(CLIENT, entries, [b"call"] * (n + 1), 0.0)
    assert time.process_time() - started < 2.0  # linear: a fraction of a second here; quadratic: 8 s
    [reply] = sent
    assert isinstance(reply, Accepted) and len(reply.accepted) == n + 1 and not reply.rejected
    assert s.jobs["fan-in"].state == "waiting" and s.jobs["fan-in"].node is not None
    assert s.jobs["fan-in"].node.waiting == n


@pytest.mark.parametrize("several_frames", [False, True])
def test_a_large_fan_in_keeps_its_parents_results_in_order_as_they_succeed(several_frames: bool) -> None:
    """Node.early: the dispatcher's ASSIGN of a fan-in then does not visit every parent (issue 15)."""
    n = EARLY_JOIN_MIN + 44
    s = make()
    ready(s, b"w", concurrency=n)
    parents = tuple(f"p{i}" for i in range(n))
    for p in parents:
        add(s, p)
    assert len(assigned(s)) == n
    order = list(range(n))
    random.Random(5).shuffle(order)
    for i in order[:100]:  # finished before the fan-in was submitted: kept when it links
        succeed(s, f"p{i}", result=b"r%d" % i)
    add(s, "sum", parents=parents)
    node = s.jobs["sum"].node
    assert node is not None and node.early is not None and node.n_early == 100 and node.joined_early() is None
    for i in order[100:-1]:
        succeed(s, f"p{i}", result=b"r%d" % i)
    last = order[-1]
    job = s.jobs[f"p{last}"]
    assert job.worker is not None
    s.outcome(job.worker, job.id, job.attempt, True, {}, [b"a", b"b"] if several_frames else [b"r%d" % last], 1.0)
    assert s.jobs["sum"].state == QUEUED
    if several_frames:  # not one frame each: the ASSIGN looks each parent up (the per-parent layout)
        assert node.joined_early() is None
    else:
        assert node.joined_early() == [b"r%d" % i for i in range(n)]
    assert assigned(s) == ["sum"]
    succeed(s, "sum")
    assert node.early is None and node.slots is None  # dropped once it has run


def test_a_small_or_repeating_fan_in_keeps_nothing_early() -> None:
    s = make()
    ready(s, b"w", concurrency=EARLY_JOIN_MIN + 1)
    for i in range(EARLY_JOIN_MIN):
        add(s, f"p{i}")
    add(s, "few", parents=("p0", "p1"))
    add(s, "twice", parents=(*(f"p{i}" for i in range(EARLY_JOIN_MIN)), "p0"))
    assert s.jobs["few"].node.early is None and s.jobs["twice"].node.early is None

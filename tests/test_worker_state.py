"""Tier-1 tests of the worker's state machine (conveyor/worker/state.py): events in, actions out.

No sockets, threads or sleeps: every event gets the current time as `now`, and what the socket loop
would do is read from the returned actions. The second half is a hypothesis state machine that plays
the mode, the link and the dispatcher around the state at random and checks its invariants after every
step, as tests/test_scheduler.py does for the dispatcher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conveyor.protocol import Cmd
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.worker.events import (
    Action,
    ArmTimer,
    Assigned,
    Beat,
    CancelRequested,
    Connected,
    Disconnected,
    Event,
    Finished,
    ReconnectRequested,
    ResendRequested,
    Send,
    SendReports,
    SlotBack,
    SlotLent,
    Start,
    Stop,
    StopRequested,
    TasksEnded,
    Tick,
    Withdraw,
    Withdrawn,
)
from conveyor.worker.execution import Key, Outcome, Task
from conveyor.worker.state import FLUSH_BATCH, FLUSH_DELAY, STALL_AFTER, WorkerConfig, WorkerState

CONFIG = WorkerConfig(name="w", host="h", pid=1, mode="threads", concurrency=2, prefetch=2, prefetch_auto=False)


# --- helpers -------------------------------------------------------------------------------------


def make(**kwargs: Any) -> WorkerState:
    return WorkerState(replace(CONFIG, **kwargs))


def task(n: int, attempt: int = 1, timeout: float | None = None, retry_on: tuple[str, ...] = ()) -> Task:
    return Task(f"j{n}", attempt, timeout, retry_on, [b"call"])


def ok(t: Task, value: bytes = b"result") -> Outcome:
    return Outcome(t.job_id, t.attempt, True, {"duration": 0.01}, [value])


def connect(s: WorkerState, now: float = 0.0, session: str = "s1") -> list[Action]:
    return s.handle(Connected(session), now)


def assign(s: WorkerState, tasks: Sequence[Task], now: float = 0.0, ack: int = 0) -> list[Action]:
    return s.handle(Assigned(list(tasks), ack), now)


def sent(actions: Iterable[Action], cmd: Cmd | None = None) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and (cmd is None or a.cmd == cmd)]


def cmds(actions: Iterable[Action]) -> list[str]:
    return [a.cmd.name for a in actions if isinstance(a, Send)]


def started(actions: Iterable[Action]) -> list[Key]:
    return [t.key for a in actions if isinstance(a, Start) for t in a.tasks]


def results(actions: Iterable[Action]) -> list[tuple[int, list[Key]]]:
    return [(a.body.seq, [(e.job_id, e.attempt) for e in a.body.outcomes]) for a in sent(actions, Cmd.RESULTS)]


def stopped(actions: Iterable[Action]) -> list[Key]:
    return [a.key for a in actions if isinstance(a, Stop)]


def handed_back(actions: Iterable[Action]) -> list[Key]:
    return [(r.job_id, r.attempt) for a in sent(actions, Cmd.GIVEBACK) for r in a.body]


def armed(actions: Iterable[Action]) -> float | None:
    times = [a.at for a in actions if isinstance(a, ArmTimer)]
    return times[-1] if times else None


def tick(s: WorkerState, now: float) -> list[Action]:
    return s.handle(Tick(), now)


def end(s: WorkerState, outcomes: Sequence[Outcome], now: float = 0.0) -> list[Action]:
    """The mode reports outcomes, then the loop's end-of-turn timer fires: what goes out."""
    actions = s.handle(TasksEnded(list(outcomes)), now)
    return actions + tick(s, now)


# --- slots and the mode's queue --------------------------------------------------------------------


def test_assignments_start_up_to_the_slots_and_the_rest_wait() -> None:
    s = make(prefetch=2)
    connect(s)
    ts = [task(i) for i in range(4)]
    assert started(assign(s, ts)) == [ts[0].key, ts[1].key]
    assert list(s.in_mode) == [ts[0].key, ts[1].key] and len(s.held) == 4
    assert started(end(s, [ok(ts[1])])) == [ts[2].key]  # a slot frees: the oldest waiting one starts


def test_a_mode_with_its_own_queue_is_handed_the_prefetch_too() -> None:
    s = make(prefetch=2, mode_queue=2)
    connect(s)
    ts = [task(i) for i in range(5)]
    assert started(assign(s, ts)) == [t.key for t in ts[:4]]  # 2 slots + the threads' queue of 2


def test_a_task_with_a_timeout_reaches_the_modes_queue_only_when_a_slot_is_free() -> None:
    # d7bc55f: its clock used to start while it waited behind busy threads in threads mode's queue.
    s = make(prefetch=3, mode_queue=3)
    connect(s)
    first = [task(0), task(1)]
    timed, after = task(2, timeout=5.0), task(3)
    assert started(assign(s, [*first, timed, after])) == [t.key for t in first]  # it waits, and so does `after`
    actions = end(s, [ok(first[0])], now=1.0)
    assert started(actions) == [timed.key, after.key]
    assert stopped(tick(s, 5.99)) == []
    assert stopped(tick(s, 6.0)) == [timed.key]  # its clock started at 1.0, when a slot was free for it


def test_a_second_assignment_of_the_same_attempt_is_ignored() -> None:
    s = make()
    connect(s)
    t = task(0)
    assign(s, [t])
    assert started(assign(s, [task(0)])) == [] and len(s.held) == 1


# --- timeouts and cancels --------------------------------------------------------------------------


def test_a_timeout_stops_the_task_and_decides_its_outcome_at_once() -> None:
    s = make(concurrency=1, prefetch=1)
    connect(s)
    timed, nxt = task(0, timeout=2.0, retry_on=("TimeoutError",)), task(1)
    actions = assign(s, [timed, nxt], now=10.0)
    assert started(actions) == [timed.key] and armed(actions) == 12.0
    assert tick(s, 11.9) == [] or not started(tick(s, 11.9))
    actions = tick(s, 12.0)
    [stop] = [a for a in actions if isinstance(a, Stop)]
    assert stop.key == timed.key and type(stop.reason).__name__ == "TaskTimeout"
    assert started(actions) == [nxt.key]  # its slot is free at once
    [(_, keys)] = results(actions)
    assert keys == [timed.key]
    info = sent(actions, Cmd.RESULTS)[0].body.outcomes[0].info
    assert info["kind"] == perr.TIMEOUT and info["type"] == "TaskTimeout" and info["retryable"] is True
    assert "2 s timeout" in info["message"]
    # the mode's own word on it, later, changes nothing
    assert results(end(s, [ok(timed)], now=13.0)) == []


def test_cancel_of_a_waiting_task_never_starts_it() -> None:
    s = make(concurrency=1, prefetch=1)
    connect(s)
    running, waiting = task(0), task(1)
    assign(s, [running, waiting])
    actions = s.handle(CancelRequested(waiting.key), 0.0) + tick(s, 0.0)
    assert not [a for a in actions if isinstance(a, Stop)]
    [(_, keys)] = results(actions)
    assert keys == [waiting.key]
    assert sent(actions, Cmd.RESULTS)[0].body.outcomes[0].info["kind"] == perr.CANCELLED
    assert started(end(s, [ok(running)])) == []  # the freed slot finds nothing: it was cancelled


def test_cancel_of_a_running_task_stops_it_and_reports_cancelled() -> None:
    s = make(concurrency=1, prefetch=1)
    connect(s)
    running, waiting = task(0), task(1)
    assign(s, [running, waiting])
    actions = s.handle(CancelRequested(running.key), 0.0)
    assert [a.key for a in actions if isinstance(a, Stop)] == [running.key]
    assert started(actions) == [waiting.key]
    assert s.handle(CancelRequested(("nope", 1)), 0.0) == []  # not held: ignored


# --- RESULTS: batching, numbering, retention -------------------------------------------------------


def test_outcomes_go_at_the_end_of_the_turn_while_held_fit_the_slots() -> None:
    s = make()
    connect(s)
    ts = [task(0), task(1)]
    assign(s, ts)
    actions = s.handle(TasksEnded([ok(ts[0])]), 5.0)
    assert armed(actions) == 5.0 and results(actions) == []  # the loop's call_soon: same-turn outcomes join
    actions = s.handle(TasksEnded([ok(ts[1])]), 5.0) + tick(s, 5.0)
    assert results(actions) == [(1, [ts[0].key, ts[1].key])]
    reports = [a for a in actions if isinstance(a, SendReports)]
    assert reports and set(reports[0].finished) == {ts[0].key, ts[1].key}
    assert actions.index(reports[0]) < actions.index(sent(actions, Cmd.RESULTS)[0])  # output before the outcome


def test_with_more_held_than_slots_outcomes_wait_for_company() -> None:
    s = make(concurrency=1, prefetch=FLUSH_BATCH + 10)
    connect(s)
    ts = [task(i) for i in range(FLUSH_BATCH + 5)]
    assign(s, ts)
    actions = s.handle(TasksEnded([ok(ts[0])]), 1.0)
    assert armed(actions) == 1.0 + FLUSH_DELAY
    assert results(tick(s, 1.0 + FLUSH_DELAY)) == [(1, [ts[0].key])]
    for t in ts[1 : FLUSH_BATCH + 1]:  # one at a time, as a single slot would
        actions = s.handle(TasksEnded([ok(t)]), 2.0)
    assert armed(actions) == 2.0  # 64 gathered: at once


def test_results_are_numbered_kept_until_acknowledged_and_resent_identically() -> None:
    s = make()
    connect(s)
    a, b = task(0), task(1)
    assign(s, [a, b])
    first = sent(end(s, [ok(a)]), Cmd.RESULTS)[0]
    second = sent(end(s, [ok(b)]), Cmd.RESULTS)[0]
    assert (first.body.seq, second.body.seq) == (1, 2)
    assert [x.seq for x in s.retained] == [1, 2]
    s.handle(Beat("inst", 1), 1.0)
    assert [x.seq for x in s.retained] == [2]
    again = sent(s.handle(ResendRequested(2), 1.0), Cmd.RESULTS)
    assert [x.body for x in again] == [second.body] and again[0].frames == second.frames
    assign(s, [], ack=2)  # ASSIGN acknowledges too
    assert not s.retained
    assert s.handle(Beat("inst", 1), 1.0) == []  # an old acknowledgement changes nothing


def test_a_new_connection_registers_everything_held_then_resends_the_unacknowledged() -> None:
    s = make(concurrency=2, prefetch=2)
    connect(s)
    ts = [task(i) for i in range(3)]
    assign(s, ts)
    end(s, [ok(ts[0])])  # RESULTS 1
    end(s, [ok(ts[1])])  # RESULTS 2
    s.handle(Beat("inst", 1), 1.0)
    actions = connect(s, 2.0, session="s2")  # ZeroMQ made the TCP connection again, say
    assert cmds(actions)[:2] == ["READY", "RESULTS"]
    ready = sent(actions, Cmd.READY)[0].body
    assert ready.session == "s2" and ready.results_seq == 2
    assert {(r.job_id, r.attempt) for r in ready.running} == {ts[1].key, ts[2].key}  # j1's outcome is unacknowledged
    assert ready.credit == 2 + 2 - 2
    assert results(actions) == [(2, [ts[1].key])]


def test_outcomes_of_a_disconnected_worker_go_after_the_resent_ones_in_order() -> None:
    s = make()
    connect(s)
    a, b = task(0), task(1)
    assign(s, [a, b])
    end(s, [ok(a)])  # RESULTS 1, never acknowledged
    s.handle(Disconnected(), 1.0)
    assert results(end(s, [ok(b)], 2.0)) == []  # nobody to send to: it waits
    actions = connect(s, 3.0, session="s2")
    ready = sent(actions, Cmd.READY)[0].body
    assert ready.results_seq == 1 and {(r.job_id, r.attempt) for r in ready.running} == {a.key, b.key}
    assert results(actions) == [(1, [a.key]), (2, [b.key])]


def test_a_new_dispatcher_instance_or_a_reconnect_gets_ready_again_same_session() -> None:
    s = make()
    connect(s)
    s.handle(Beat("one", None), 0.0)
    assert s.handle(Beat("one", None), 0.1) == []
    actions = s.handle(Beat("two", None), 0.2)
    assert cmds(actions) == ["READY"] and sent(actions)[0].body.session == "s1"
    assert cmds(s.handle(ReconnectRequested(), 0.3)) == ["READY"]


def test_a_result_too_large_for_the_socket_becomes_a_failure() -> None:
    s = make(max_message_size=1000)
    connect(s)
    t = task(0)
    assign(s, [t])
    [entry] = sent(end(s, [ok(t, b"x" * 2000)]), Cmd.RESULTS)[0].body.outcomes
    assert not entry.ok and entry.info["type"] == "ValueError" and entry.n_frames == 0


# --- hand-back: stalls and the drain ------------------------------------------------------------------


def test_a_stall_hands_back_what_no_slot_took() -> None:
    s = make(concurrency=1, prefetch=4, prefetch_auto=True, mode_queue=4)
    connect(s)
    ts = [task(i) for i in range(4)]
    actions = assign(s, ts, now=1.0)
    assert started(actions) == [t.key for t in ts] and armed(actions) == 1.0 + STALL_AFTER
    actions = tick(s, 1.0 + STALL_AFTER)
    [withdraw] = [a for a in actions if isinstance(a, Withdraw)]
    assert list(withdraw.keys) == [t.key for t in ts[1:]]  # never the first: it holds the slot
    actions = s.handle(Withdrawn([ts[2].key, ts[3].key]), 1.0 + STALL_AFTER)  # ts[1] had started meanwhile
    assert handed_back(actions) == [ts[2].key, ts[3].key]
    assert set(s.held) == {ts[0].key, ts[1].key}


def test_no_stall_while_tasks_keep_moving() -> None:
    s = make(concurrency=1, prefetch=4, prefetch_auto=True)
    connect(s)
    ts = [task(i) for i in range(4)]
    assign(s, ts, now=1.0)
    end(s, [ok(ts[0])], now=1.0 + STALL_AFTER * 0.9)
    actions = tick(s, 1.0 + STALL_AFTER)
    assert handed_back(actions) == [] and armed(actions) == pytest.approx(1.0 + STALL_AFTER * 1.9)


def test_drain_hands_back_the_waiting_lets_running_finish_then_says_goodbye() -> None:
    s = make(concurrency=1, prefetch=2, drain_timeout=30.0)
    connect(s)
    ts = [task(i) for i in range(3)]
    assign(s, ts)
    actions = s.handle(StopRequested(), 1.0)
    assert cmds(actions) == ["LEAVING", "GIVEBACK"] and handed_back(actions) == [ts[1].key, ts[2].key]
    actions = s.handle(TasksEnded([ok(ts[0])]), 2.0)
    assert cmds(actions) == ["RESULTS", "GOODBYE"] and isinstance(actions[-1], Finished)
    assert s.handle(Tick(), 3.0) == []  # finished: nothing more


def test_drain_never_hands_back_a_task_a_free_slot_is_about_to_take() -> None:
    # c13948a: a job assigned to a free slot a moment before SIGTERM went back to the queue.
    s = make(concurrency=2, prefetch=2, mode_queue=2)
    connect(s)
    ts = [task(i) for i in range(3)]
    assign(s, ts)  # all three in the mode: two about to run, one queued
    actions = s.handle(StopRequested(), 0.0)
    [withdraw] = [a for a in actions if isinstance(a, Withdraw)]
    assert list(withdraw.keys) == [ts[2].key]


def test_drain_deadline_stops_and_hands_back_everything_and_starts_nothing() -> None:
    # d7bc55f: a cancel at the deadline freed a slot, which started a job that was being handed back.
    s = make(concurrency=1, prefetch=2, drain_timeout=5.0)
    connect(s)
    running, waiting = task(0), task(1)
    assign(s, [running])
    actions = s.handle(StopRequested(), 0.0)
    assert armed(actions) == 5.0
    assign(s, [waiting])  # an ASSIGN that crossed LEAVING: it waits for the slot
    actions = tick(s, 5.0)
    assert started(actions) == []
    assert [a.key for a in actions if isinstance(a, Stop)] == [running.key]
    assert set(handed_back(actions)) == {running.key, waiting.key}
    assert cmds(actions)[-1] == "GOODBYE" and isinstance(actions[-1], Finished)


def test_a_second_stop_request_moves_the_deadline_to_now() -> None:
    s = make(concurrency=1, drain_timeout=30.0)
    connect(s)
    assign(s, [task(0)])
    s.handle(StopRequested(), 0.0)
    actions = s.handle(StopRequested(), 1.0)
    assert cmds(actions) == ["GIVEBACK", "GOODBYE"] and isinstance(actions[-1], Finished)


def test_a_stop_while_disconnected_connects_first_then_leaves() -> None:
    s = make()
    connect(s)
    t = task(0)
    assign(s, [t])
    s.handle(Disconnected(), 0.0)
    assert cmds(s.handle(StopRequested(), 1.0)) == []
    assert not s.finished
    actions = connect(s, 1.1, session="s2")
    assert cmds(actions) == ["READY", "LEAVING"]


def test_lost_while_draining_finishes_without_the_dispatcher_at_the_deadline() -> None:
    s = make(drain_timeout=5.0)
    connect(s)
    t = task(0)
    assign(s, [t])
    s.handle(StopRequested(), 0.0)
    s.handle(Disconnected(), 1.0)
    assert s.orphaned and not s.finished
    actions = tick(s, 5.0)
    assert [a.key for a in actions if isinstance(a, Stop)] == [t.key]
    assert cmds(actions) == [] and isinstance(actions[-1], Finished)


# --- lent slots: a task waiting on its child -----------------------------------------------------------


def lent(actions: Iterable[Action]) -> list[int]:
    return [a.body.slots for a in sent(actions, Cmd.LENT)]


def test_a_task_waiting_on_its_child_lends_its_slot_until_the_wait_ends() -> None:
    s = make(concurrency=1, prefetch=0)
    connect(s)
    t0, t1, t2 = task(0), task(1), task(2)
    assert started(assign(s, [t0])) == [t0.key] and s.credit == 0
    actions = s.handle(SlotLent(t0.key), 0.0)
    assert lent(actions) == [1] and s.slots == 2 and s.credit == 1  # the dispatcher may send one more job
    assert started(assign(s, [t1])) == [t1.key]  # the child runs on the lent slot
    assert lent(s.handle(SlotBack(t0.key), 0.0)) == [0] and s.slots == 1 and s.credit == 0
    assert started(assign(s, [t2])) == []  # the slot is back: nothing new while two tasks run on one slot
    assert started(end(s, [ok(t1)])) == []  # t0 still holds the one slot
    assert started(end(s, [ok(t0)])) == [t2.key]


def test_a_lent_slot_comes_back_when_its_task_ends_or_is_stopped() -> None:
    s = make(concurrency=1, prefetch=0)
    connect(s)
    t0, t1 = task(0), task(1)
    assign(s, [t0, t1])
    s.handle(SlotLent(t0.key), 0.0)
    s.handle(SlotLent(t0.key), 0.0)  # a second wait of the same task (another thread of it): still one slot
    assert s.slots == 2 and list(s.in_mode) == [t0.key, t1.key]
    assert lent(end(s, [ok(t0)])) == [0] and s.slots == 1  # it ended while waiting: its slot is back
    assert lent(s.handle(SlotBack(t0.key), 0.0)) == [] and s.slots == 1  # a late SlotBack changes nothing
    s.handle(SlotLent(t1.key), 0.0)
    actions = s.handle(CancelRequested(t1.key), 0.0)
    assert stopped(actions) == [t1.key] and lent(actions) == [0] and s.slots == 1
    assert lent(s.handle(SlotLent(("gone", 1)), 0.0)) == [] and s.slots == 1  # not in the mode: ignored


def test_a_new_connection_tells_the_lent_slots_again_after_ready() -> None:
    s = make(concurrency=1, prefetch=0)
    connect(s)
    t0 = task(0)
    assign(s, [t0])
    s.handle(SlotLent(t0.key), 0.0)
    s.handle(Disconnected(), 0.0)
    actions = connect(s, session="s2")
    assert cmds(actions)[:2] == ["READY", "LENT"] and lent(actions) == [1]
    assert sent(actions, Cmd.READY)[0].body.credit == 1  # concurrency + lent - held


# --- the state machine -------------------------------------------------------------------------------


@dataclass
class SimMode:
    """The mode as the state cannot see it: a FIFO queue and threads (or, with no queue, a task starts on
    arrival, as a child process or an asyncio task does)."""

    concurrency: int
    queued: bool
    order: list[Key] = field(default_factory=list)  # handed and not reported/stopped/withdrawn, in order
    waiting: list[Key] = field(default_factory=list)  # in the mode's queue, not taken by a thread
    running: set[Key] = field(default_factory=set)  # taken by a thread, not finished
    finished: dict[Key, Outcome] = field(default_factory=dict)  # finished, not yet reported to the state

    def live(self) -> list[Key]:
        return list(self.order)

    lent: set[Key] = field(default_factory=set)  # running tasks blocked on a child: one more thread each

    def remove(self, key: Key) -> None:
        self.order.remove(key)
        if key in self.waiting:
            self.waiting.remove(key)
        self.running.discard(key)
        self.finished.pop(key, None)
        self.lent.discard(key)

    def take(self) -> None:
        """Free threads take queued tasks (a finished-but-unreported task no longer holds its thread)."""
        while self.waiting and len(self.running) < self.concurrency + len(self.lent):
            self.running.add(self.waiting.pop(0))


@dataclass
class Sent:
    seq: int
    body: bytes  # the encoded body: a re-send must be identical
    frames: list[Any]
    keys: list[Key]


class WorkerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.n = 0
        self.connections = 0
        self.instance = "inst-1"
        self.armed: float | None = None
        self.finished = False
        self.lent_told: int | None = None  # the last LENT on this connection (None: none since READY)

    @initialize(
        concurrency=st.integers(1, 3),
        prefetch=st.integers(0, 3),
        auto=st.booleans(),
        queued=st.booleans(),
        drain=st.sampled_from([0.5, 3.0]),
    )
    def setup(self, concurrency: int, prefetch: int, auto: bool, queued: bool, drain: float) -> None:
        self.config = replace(
            CONFIG, concurrency=concurrency, prefetch=prefetch, prefetch_auto=auto,
            mode_queue=prefetch if queued else 0, drain_timeout=drain,
        )
        self.s = WorkerState(self.config)
        self.mode = SimMode(concurrency, queued)
        self.tasks: dict[Key, Task] = {}  # every assignment ever made
        self.held: set[Key] = set()  # assigned, and neither an outcome nor a hand-back yet
        self.ever_started: set[Key] = set()
        self.deadline: dict[Key, float] = {}  # a timed task's deadline, from when it was handed to the mode
        self.stopped: set[Key] = set()
        self.withdrawn: set[Key] = set()
        self.outcome_of: dict[Key, int] = {}  # key -> the RESULTS number that carried its outcome
        self.pending: set[Key] = set()  # ended (in the state's eyes) and not yet in a RESULTS
        self.given_back: set[Key] = set()
        self.results: dict[int, Sent] = {}
        self.acked = 0  # what the simulated dispatcher has acknowledged
        self.connected = False
        self.draining = False
        self.drain_deadline = math.inf
        self.feed(Connected(self.new_session()))

    # --- plumbing ---------------------------------------------------------------------------------

    def new_session(self) -> str:
        self.connections += 1
        return f"s{self.connections}"

    def feed(self, event: Event) -> None:
        if isinstance(event, Connected):
            self.connected = True
        elif isinstance(event, Disconnected):
            self.connected = False
        elif isinstance(event, StopRequested):
            self.drain_deadline = min(self.drain_deadline, self.now + self.config.drain_timeout)
            if self.draining:  # a second request: the deadline is now
                self.drain_deadline = self.now
            self.draining = True
        actions = self.s.handle(event, self.now)
        if self.finished:
            assert actions == [], "actions after Finished"
        self.carry_out(actions)

    def carry_out(self, actions: list[Action]) -> None:
        """Play the socket loop, the mode and the dispatcher's inbox; check each action on the way."""
        for i, a in enumerate(actions):
            if isinstance(a, Send):
                assert self.connected, f"{a.cmd.name} sent while disconnected"
                if a.cmd == Cmd.READY:
                    self.check_ready(a.body, actions[i + 1 :])
                    self.lent_told = None
                elif a.cmd == Cmd.LENT:
                    assert a.body.slots == len(self.mode.lent), f"LENT {a.body.slots}, {len(self.mode.lent)} lent"
                    self.lent_told = a.body.slots
                elif a.cmd == Cmd.RESULTS:
                    self.check_results(a, actions[i - 1] if i else None)
                elif a.cmd == Cmd.GIVEBACK:
                    self.check_giveback([(r.job_id, r.attempt) for r in a.body])
                elif a.cmd == Cmd.LEAVING:
                    assert self.draining
                elif a.cmd == Cmd.GOODBYE:
                    assert self.draining and isinstance(actions[-1], Finished)
                    assert not self.held, f"goodbye while holding {self.held}"
            elif isinstance(a, Start):
                self.check_start(a.tasks)
            elif isinstance(a, Stop):
                assert a.key in self.mode.order, f"stop of {a.key}, which is not in the mode"
                self.mode.remove(a.key)
                self.stopped.add(a.key)
            elif isinstance(a, Withdraw):
                self.check_withdraw(a.keys)
            elif isinstance(a, ArmTimer):  # as the loop does: the earlier of the two
                self.armed = a.at if self.armed is None else min(self.armed, a.at)
            elif isinstance(a, Finished):
                assert i == len(actions) - 1 and self.draining
                self.finished = True

    def check_start(self, tasks: Sequence[Task]) -> None:
        assert self.now < self.drain_deadline, "a task started at or after the drain deadline"
        for t in tasks:
            key = t.key
            assert key in self.held, f"started {key}, which it does not hold"
            assert key not in self.ever_started, f"{key} handed to the mode twice"
            if t.timeout is not None:  # its clock starts now: a slot must be free for it
                slots = self.config.concurrency + len(self.mode.lent)
                assert len(self.mode.order) < slots, f"timed {key} queued behind busy slots"
            self.ever_started.add(key)
            if t.timeout is not None:
                self.deadline[key] = self.now + t.timeout
            self.mode.order.append(key)
            if self.mode.queued:
                self.mode.waiting.append(key)
            else:
                self.mode.running.add(key)
        limit = self.config.concurrency + self.config.mode_queue + len(self.mode.lent)
        assert len(self.mode.order) <= limit, f"{len(self.mode.order)} tasks in a mode that takes {limit}"
        self.mode.take()

    def check_withdraw(self, keys: Sequence[Key]) -> None:
        slots = self.mode.order[: self.config.concurrency + len(self.mode.lent)]
        back = []
        for key in keys:
            assert key in self.mode.order, f"withdraw of {key}, which is not in the mode"
            assert key not in slots, f"withdraw of {key}, which a free slot is about to take"
            if key in self.mode.waiting:  # not taken by a thread yet: the mode gives it back
                back.append(key)
        for key in back:
            self.mode.remove(key)
            self.withdrawn.add(key)
        self.carry_out(self.s.handle(Withdrawn(back), self.now))

    def check_giveback(self, keys: list[Key]) -> None:
        for key in keys:
            assert key in self.held, f"handed back {key}, which it does not hold"
            assert key not in self.mode.order, f"handed back {key}, still in the mode"
            if key in self.ever_started:
                assert key in self.stopped or key in self.withdrawn, f"{key} ran and was handed back"
            self.held.discard(key)
            self.given_back.add(key)
        assert self.draining or self.config.prefetch_auto, "a stall hand-back without auto prefetch"

    def check_results(self, a: Send, before: Action | None) -> None:
        body: c.Results = a.body
        keys = [(e.job_id, e.attempt) for e in body.outcomes]
        encoded = msgspec.msgpack.encode(body)
        seen = self.results.get(body.seq)
        if seen is not None:  # a re-send: identical, under the same number
            assert (seen.body, seen.frames) == (encoded, list(a.frames)), f"RESULTS {body.seq} changed"
            return
        assert body.seq == max(self.results, default=0) + 1, f"RESULTS {body.seq} out of sequence"
        assert isinstance(before, SendReports) and set(keys) <= set(before.finished), "outcome before its output"
        for key in keys:
            assert key in self.pending, f"outcome of {key}, which had not ended"
            assert key not in self.outcome_of, f"second outcome of {key}"
            self.pending.discard(key)
            self.held.discard(key)
            self.outcome_of[key] = body.seq
        self.results[body.seq] = Sent(body.seq, encoded, list(a.frames), keys)

    def check_ready(self, body: c.Ready, after: list[Action]) -> None:
        running = {(r.job_id, r.attempt) for r in body.running}
        unacked = sorted(seq for seq in self.results if seq > self.acked)
        expect = set(self.held) | self.pending | {k for seq in unacked for k in self.results[seq].keys}
        assert running == expect, f"READY lists {running ^ expect} wrongly"
        cap = self.config.concurrency + self.config.prefetch + len(self.mode.lent)
        assert body.credit == max(0, cap - len(expect)) and body.credit >= 0
        told = [x.body.slots for x in after if isinstance(x, Send) and x.cmd == Cmd.LENT][:1]
        assert told == ([len(self.mode.lent)] if self.mode.lent else []), "READY not followed by the lent slots"
        assert body.results_seq == (unacked[0] if unacked else max(self.results, default=0) + 1)
        resent = [x.body.seq for x in after if isinstance(x, Send) and x.cmd == Cmd.RESULTS]
        assert resent[: len(unacked)] == unacked, "READY not followed by every unacknowledged RESULTS, in order"

    def ended_in_state(self, key: Key) -> None:
        """An outcome decided (the mode reported it, or the state timed it out or cancelled it)."""
        self.pending.add(key)

    # --- rules --------------------------------------------------------------------------------------

    @precondition(lambda self: self.connected and not self.finished)
    @rule(n=st.integers(0, 4), timed=st.lists(st.booleans(), min_size=4, max_size=4), data=st.data())
    def assign(self, n: int, timed: list[bool], data: st.DataObject) -> None:
        tasks = []
        for i in range(n):
            self.n += 1
            attempt = data.draw(st.integers(1, 2))
            t = Task(f"j{self.n}", attempt, 0.7 if timed[i] else None, (), [f"call {self.n}".encode()])
            tasks.append(t)
            self.tasks[t.key] = t
            self.held.add(t.key)
        ack = data.draw(st.integers(0, max(self.results, default=0)))
        self.note_ack(ack)
        self.feed(Assigned(tasks, ack))

    def note_ack(self, ack: int) -> None:
        self.acked = max(self.acked, ack)

    @precondition(lambda self: bool(self.mode.waiting) or bool(self.mode.running))
    @rule(data=st.data(), success=st.booleans())
    def a_task_finishes(self, data: st.DataObject, success: bool) -> None:
        self.mode.take()
        if not self.mode.running:
            return
        key = data.draw(st.sampled_from(sorted(self.mode.running)))
        self.mode.running.discard(key)
        t = self.tasks[key]
        info: dict[str, Any] = {"duration": 0.01} if success else perr.error_info(perr.EXCEPTION, "ValueError", "x")
        self.mode.finished[key] = Outcome(t.job_id, t.attempt, success, info, [b"out"] if success else [])
        self.mode.take()  # its thread is free: it takes the next one at once

    @precondition(lambda self: bool(self.mode.finished) and not self.finished)
    @rule(data=st.data())
    def the_mode_reports(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.mode.finished)), min_size=1, unique=True))
        outcomes = [self.mode.finished[k] for k in keys]
        for k in keys:
            self.mode.remove(k)
            self.ended_in_state(k)
        self.feed(TasksEnded(outcomes))

    @precondition(lambda self: self.connected and bool(self.tasks) and not self.finished)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.tasks)))
        if key in self.held and key not in self.pending:  # still held: it ends as cancelled, now
            self.ended_in_state(key)
        self.feed(CancelRequested(key))

    @precondition(lambda self: bool(self.mode.running - self.mode.lent) and not self.finished)
    @rule(data=st.data())
    def a_task_blocks_on_its_child(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.mode.running - self.mode.lent)))
        if not self.draining:  # (a drain lends nothing: no new work comes)
            self.mode.lent.add(key)
        self.feed(SlotLent(key))
        self.mode.take()

    @precondition(lambda self: bool(self.mode.lent) and not self.finished)
    @rule(data=st.data())
    def its_wait_ends(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.mode.lent)))
        self.mode.lent.discard(key)
        self.feed(SlotBack(key))

    @rule(dt=st.sampled_from([0.0005, 0.001, 0.05, 0.1, 0.3, 1.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        if self.armed is not None and self.armed <= self.now:
            self.armed = None
            self.tick()

    def tick(self) -> None:
        for key in self.mode.order:  # the state decides these outcomes now: their deadline has passed
            if self.deadline.get(key, math.inf) <= self.now:
                self.ended_in_state(key)
        self.feed(Tick())

    @precondition(lambda self: not self.finished)
    @rule()
    def spurious_tick(self) -> None:
        self.armed = None  # the state re-arms what it still needs
        self.tick()

    @precondition(lambda self: self.connected and not self.finished)
    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        ack = data.draw(st.integers(0, max(self.results, default=0)))
        self.note_ack(ack)
        self.feed(Beat(self.instance, ack))

    @precondition(lambda self: self.connected and bool(self.results) and not self.finished)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(1, max(self.results) + 1))
        actions = self.s.handle(ResendRequested(seq), self.now)
        resent = [a.body.seq for a in actions if isinstance(a, Send) and a.cmd == Cmd.RESULTS]
        assert resent == [n for n in sorted(self.results) if n > self.acked and n >= seq], f"RESEND {seq}: {resent}"
        self.carry_out(actions)

    @precondition(lambda self: self.connected and not self.finished)
    @rule()
    def tcp_connection_made_again(self) -> None:
        self.feed(Connected(self.new_session()))

    @precondition(lambda self: self.connected and not self.finished)
    @rule()
    def lose_the_dispatcher(self) -> None:
        self.feed(Disconnected())

    @precondition(lambda self: not self.connected and not self.finished and not self.s.orphaned)
    @rule()
    def connect_again(self) -> None:
        self.feed(Connected(self.new_session()))

    @precondition(lambda self: self.connected and not self.finished)
    @rule(change=st.booleans())
    def dispatcher_beat(self, change: bool) -> None:
        if change:
            self.instance += "'"
        self.feed(Beat(self.instance, None))

    @precondition(lambda self: self.connected and not self.finished)
    @rule()
    def reconnect_requested(self) -> None:
        self.feed(ReconnectRequested())

    @precondition(lambda self: not self.finished and len(self.tasks) >= 3)  # a drain with something to drain
    @rule()
    def stop_requested(self) -> None:
        self.feed(StopRequested())

    # --- invariants ---------------------------------------------------------------------------------

    @invariant()
    def the_state_holds_what_the_simulation_thinks(self) -> None:
        if not hasattr(self, "s") or self.finished:
            return
        assert set(self.s.held) == self.held - self.pending - self.given_back
        assert list(self.s.in_mode) == self.mode.order
        assert set(self.s._lent) == self.mode.lent  # lent slots come back as their wait or their task ends
        assert self.s.slots == self.config.concurrency + len(self.mode.lent)
        if self.connected and not self.draining and self.lent_told is not None:
            assert self.lent_told == len(self.mode.lent), "the dispatcher was not told of a lent slot"

    @invariant()
    def every_unacknowledged_result_is_kept(self) -> None:
        if not hasattr(self, "s") or self.finished:
            return
        unacked = [seq for seq in sorted(self.results) if seq > self.acked]
        assert [b.seq for b in self.s.retained] == unacked
        assert 0 <= self.s.credit <= self.config.concurrency + self.config.prefetch + len(self.s._lent)

    @invariant()
    def a_timer_is_armed_for_every_deadline(self) -> None:
        if not hasattr(self, "s") or self.finished:
            return
        due = [d for d in (self.s._flush_at, self.s._stall_at) if d is not None]
        due += list(self.s._deadlines.values())
        if self.s.draining and self.s._drain_at is not None:
            due.append(self.s._drain_at)
        if due:
            assert self.armed is not None and self.armed <= min(due), "a deadline nobody will wake up for"

    def teardown(self) -> None:
        """Connect, drain, let every task finish or the deadline pass: the drain ends, and every assignment
        ended as exactly one outcome or one hand-back."""
        if not hasattr(self, "s"):
            return
        if not self.finished and not self.connected and not self.s.orphaned:
            self.feed(Connected(self.new_session()))
        if not self.finished:
            self.feed(StopRequested())
        for _ in range(200):
            if self.finished:
                break
            self.mode.take()
            for key in sorted(self.mode.running):
                self.a_task_finishes_now(key)
            if self.mode.finished:
                keys = sorted(self.mode.finished)
                outcomes = [self.mode.finished[k] for k in keys]
                for k in keys:
                    self.mode.remove(k)
                    self.ended_in_state(k)
                self.feed(TasksEnded(outcomes))
            self.now += 0.25
            if self.armed is not None and self.armed <= self.now:
                self.armed = None
                self.tick()
        assert self.finished, "the drain never ended"
        if self.s.orphaned:
            return  # left without a dispatcher: it counts the rest as lost
        for key in self.tasks:
            assert (key in self.outcome_of) + (key in self.given_back) == 1, f"{key}: not exactly one end"

    def a_task_finishes_now(self, key: Key) -> None:
        self.mode.running.discard(key)
        t = self.tasks[key]
        self.mode.finished[key] = Outcome(t.job_id, t.attempt, True, {"duration": 0.01}, [b"out"])


WorkerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_worker_state_machine = WorkerMachine.TestCase

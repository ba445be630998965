"""The worker's state machine: assignments, slots, outcomes and their numbering, hand-backs, the drain. No I/O.

`WorkerState.handle(event, now)` takes one event (events.py: a message from the dispatcher, tasks ended
in the mode, a connection made or lost, a signal, a timer) and returns the actions the socket loop
(server.py) must carry out, in order: send a message, hand tasks to the mode, stop or withdraw one
there, arm a timer, finish. Time and session ids are passed in. This keeps every rule of
docs/protocol.md §11 testable without sockets, threads or clocks (tests/test_worker_state.py).

Rules worth knowing before reading:
- Slots. The mode runs `concurrency` tasks at once. An assignment waits here until the mode has room:
  `concurrency` tasks, plus `mode_queue` more for a mode that queues tasks itself (threads: its threads
  take them from one queue, so they go from task to task without waiting for the loop). The tasks in
  the mode keep the order they were handed in: the first `concurrency` of them hold a slot (running, or
  about to be taken by an idle thread); the others wait in the mode's queue and can be withdrawn.
- Lent slots. A task blocked on its own child (conveyor.current_client(); threads, processes and
  asyncio modes) lends its slot while it waits (SlotLent, SlotBack): one more task may run meanwhile,
  and LENT tells the dispatcher so, which then assigns one more job. When the wait ends, no task
  starts until the tasks in the mode are within the slots again. `slots` is concurrency plus the lent ones.
- Timeouts and cancels are decided here, for every mode alike. A task with a timeout goes to the mode
  only when a slot is free for it (the tasks behind it wait with it), so its clock starts when it can
  run. At its deadline, or on CANCEL, its outcome is decided at once and the mode is told to stop it;
  the slot is free at once (the mode replaces a thread or a child that does not stop).
- RESULTS are numbered 1, 2, ... for the life of the worker process. Each is kept, entries and frames,
  until an `ack` (ASSIGN, HEARTBEAT) covers it. Every READY (a new connection, a RECONNECT, a new
  dispatcher instance) lists everything held, unacknowledged outcomes included, and is followed by the
  unacknowledged RESULTS, in order, under their own numbers; RESEND asks for them too.
- Batching: outcomes go out at the end of the loop turn while the worker holds no more assignments
  than slots; beyond that (prefetched tiny tasks) once FLUSH_BATCH have gathered or FLUSH_DELAY passed.
- Hand-back: the assignments that have not started (waiting here, or withdrawn from the mode's queue)
  go back in one GIVEBACK when the drain starts, and with auto prefetch when no task started or ended
  for STALL_AFTER while the worker held more than its slots.
- Drain: LEAVING and the hand-back; running tasks finish until the deadline; then the rest is stopped
  and handed back, and the last RESULTS and GOODBYE go out. Without a dispatcher, tasks run until the
  deadline and the worker leaves without a word.

Over ~500 lines on purpose, as the dispatcher's scheduler: one class holds every rule that moves an
assignment, so each rule sees the others (the hypothesis test in tests/test_worker_state.py checks them
together).
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

from conveyor.errors import JobCancelled, TaskTimeout
from conveyor.protocol import Cmd
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
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
    Log,
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
from conveyor.worker.execution import Key, Outcome, Task, fit_outcome, infra_failure, is_retryable

STALL_AFTER = 0.1  # auto prefetch: no task started or ended for this long: hand the jobs not started back
FLUSH_BATCH = 64  # outcomes that go out at once even while the worker holds more jobs than slots
FLUSH_DELAY = 0.001  # how long outcomes may wait for company while it holds more jobs than slots


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What the worker says about itself in READY, and the limits the state keeps."""

    name: str
    host: str
    pid: int
    mode: str
    concurrency: int
    prefetch: int  # jobs held beyond the slots (with prefetch_auto: at most)
    prefetch_auto: bool
    tags: tuple[str, ...] = ()
    mode_queue: int = 0  # tasks the mode may hold beyond its slots, in its own queue (Mode.queue_limit)
    drain_timeout: float = 30.0  # seconds
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # bytes of a frame; a larger result becomes a failure
    shm: str = ""  # its /dev/shm (transport/shm.py namespace_id), told in READY; "" for none


@dataclass(frozen=True, slots=True)
class Batch:
    """One RESULTS message as sent, kept until acknowledged and re-sent identically."""

    seq: int
    body: c.Results
    frames: list[Any]


class WorkerState:
    def __init__(self, config: WorkerConfig):
        if config.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.config = config
        self.concurrency = config.concurrency
        self._mode_room = config.concurrency + config.mode_queue
        # Every assignment not ended, by (job id, attempt): waiting here, or handed to the mode.
        self.held: dict[Key, Task] = {}
        self._waiting: deque[Task] = deque()  # arrival order; entries no longer held are skipped
        self.in_mode: dict[Key, Task] = {}  # handed to the mode and not ended, in the order handed
        self._deadlines: dict[Key, float] = {}  # tasks with a timeout, while in the mode
        self._timeouts: list[tuple[float, Key]] = []  # heap of (deadline, key); stale entries skipped
        self._outbox: list[Outcome] = []  # outcomes not yet in a RESULTS
        self.retained: deque[Batch] = deque()  # RESULTS sent and not acknowledged, oldest first
        self.seq = 0  # the number of the last RESULTS made
        self.acked = 0  # the highest number acknowledged
        self.connected = False
        self.session = ""
        self._instance: str | None = None  # the dispatcher instance seen on this connection
        self.draining = False
        self.orphaned = False  # lost the dispatcher while draining: no reconnection, no goodbye
        self.finished = False
        self._drain_at: float | None = None
        self._flush_at: float | None = None
        self._stall_at: float | None = None
        self._armed_at: float | None = None  # the timer the loop holds for us
        self._last_progress = 0.0  # when a task last went to the mode or ended (stall detection)
        self._giveback: list[Key] | None = None  # a hand-back waiting for the mode's Withdrawn answer
        self._closed: list[Key] = []  # stopped or handed back: their reports close with the next send
        self._lent: dict[Key, int] = {}  # tasks in the mode blocked on children: how many waits (nesting)
        self._handlers: dict[type[Any], Callable[[Any, float, list[Action]], None]] = {
            Connected: self._on_connected,
            Disconnected: self._on_disconnected,
            Assigned: self._on_assigned,
            CancelRequested: self._on_cancel,
            Beat: self._on_beat,
            ReconnectRequested: self._on_reconnect,
            ResendRequested: self._on_resend,
            TasksEnded: self._on_ended,
            Withdrawn: self._on_withdrawn,
            SlotLent: self._on_lent,
            SlotBack: self._on_back,
            StopRequested: self._on_stop,
            Tick: self._on_tick,
        }

    # --- the one entry point ----------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply one event at time `now` (the loop's monotonic clock); the actions to carry out, in order."""
        if self.finished:
            return []
        out: list[Action] = []
        self._handlers[type(event)](event, now, out)
        if not self.finished:
            self._arm_next(out)
        return out

    @property
    def slots(self) -> int:
        """Tasks that may run at once now: concurrency, plus the slots lent by tasks waiting on children."""
        return self.concurrency + len(self._lent)

    @property
    def credit(self) -> int:
        """What READY announces: slots + prefetch minus every assignment still held, outcomes not
        acknowledged included (protocol §5 READY; never below 0)."""
        return max(0, self.slots + self.config.prefetch - len(self.running()))

    def running(self) -> list[Key]:
        """READY's `running`: held, or ended with an outcome not acknowledged; a job's newest attempt last."""
        keys = dict.fromkeys(self.held)
        for batch in self.retained:
            for e in batch.body.outcomes:
                keys[(e.job_id, e.attempt)] = None
        for o in self._outbox:
            keys[(o.job_id, o.attempt)] = None
        return sorted(keys, key=lambda k: k[1])  # stable: the dispatcher keeps the last attempt of a job

    def next_seq(self) -> int:
        """READY's `results_seq`: the oldest unacknowledged RESULTS number, or the next one."""
        return self.retained[0].seq if self.retained else self.seq + 1

    # --- connections --------------------------------------------------------------------------------

    def _on_connected(self, ev: Connected, now: float, out: list[Action]) -> None:
        self.connected = True
        self.session = ev.session
        self._instance = None
        self._register(out)
        self._flush(now, out)  # what finished while disconnected: after the re-sent ones, in order
        if self.draining:
            out.append(Send(Cmd.LEAVING, c.Empty()))
            self._hand_back_unstarted(now, out, "draining")
        self._settle(now, out)

    def _on_disconnected(self, ev: Disconnected, now: float, out: list[Action]) -> None:
        self.connected = False
        self.session = ""
        self._instance = None
        if self.draining:
            self.orphaned = True  # stop waiting for the dispatcher: run until the deadline, then leave
            out.append(Log(logging.WARNING, "lost the dispatcher while draining; finishing without it"))
        self._settle(now, out)

    def _register(self, out: list[Action]) -> None:
        """READY, then every unacknowledged RESULTS in order (the dispatcher applies them from results_seq)."""
        cfg = self.config
        body = c.Ready(
            name=cfg.name,
            host=cfg.host,
            pid=cfg.pid,
            mode=cfg.mode,
            concurrency=cfg.concurrency,
            credit=self.credit,
            prefetch=cfg.prefetch,
            prefetch_auto=cfg.prefetch_auto,
            tags=list(cfg.tags),
            session=self.session,
            running=[c.AttemptRef(job_id, attempt) for job_id, attempt in self.running()],
            results_seq=self.next_seq(),
            shm=cfg.shm,
        )
        out.append(Send(Cmd.READY, body))
        if self._lent:
            out.append(Send(Cmd.LENT, c.Lent(len(self._lent))))
        self._resend(0, out)

    def _resend(self, seq: int, out: list[Action]) -> None:
        for batch in self.retained:
            if batch.seq >= seq:
                out.append(Send(Cmd.RESULTS, batch.body, batch.frames))

    def _on_beat(self, ev: Beat, now: float, out: list[Action]) -> None:
        if ev.ack is not None:
            self._ack(ev.ack)
        if self._instance is not None and ev.instance != self._instance:
            out.append(Log(logging.INFO, f"dispatcher restarted (instance {ev.instance}); registering again"))
            self._register(out)
        self._instance = ev.instance
        self._settle(now, out)  # an acknowledgement can end a drain

    def _on_reconnect(self, ev: ReconnectRequested, now: float, out: list[Action]) -> None:
        if self.connected:
            self._register(out)

    def _on_resend(self, ev: ResendRequested, now: float, out: list[Action]) -> None:
        if not self.connected:
            return
        if self.retained and ev.seq < self.retained[0].seq:
            out.append(Log(logging.WARNING, f"the dispatcher asks for RESULTS {ev.seq} on, which it acknowledged"))
        self._resend(ev.seq, out)

    def _ack(self, seq: int) -> None:
        seq = min(seq, self.seq)  # never more than was sent
        if seq <= self.acked:
            return
        self.acked = seq
        retained = self.retained
        while retained and retained[0].seq <= seq:
            retained.popleft()

    # --- work ---------------------------------------------------------------------------------------

    def _on_assigned(self, ev: Assigned, now: float, out: list[Action]) -> None:
        self._ack(ev.ack)
        held = self.held
        for task in ev.tasks:
            if task.key in held:
                text = f"ignoring a second assignment of {task.job_id} attempt {task.attempt}"
                out.append(Log(logging.WARNING, text))
                continue
            held[task.key] = task
            self._waiting.append(task)
        self._fill(now, out)
        if len(held) > self.slots and self.config.prefetch_auto and self._stall_at is None:
            self._stall_at = now + STALL_AFTER
        self._settle(now, out)

    def _fill(self, now: float, out: list[Action]) -> None:
        """Hand waiting assignments to the mode, oldest first, while it has room."""
        waiting = self._waiting
        if not waiting or self.finished or (self._drain_at is not None and now >= self._drain_at):
            return  # (at the drain deadline nothing starts: what waits is handed back)
        in_mode = self.in_mode
        room = self._mode_room + len(self._lent) - len(in_mode)
        held = self.held
        batch: list[Task] = []
        while room > 0 and waiting:
            task = waiting[0]
            key = task.key
            if held.get(key) is not task:
                waiting.popleft()  # cancelled or handed back while it waited
                continue
            if task.timeout is not None:
                if len(in_mode) >= self.slots:
                    break  # its clock starts when it can run: only once a slot is free for it
                deadline = now + task.timeout
                self._deadlines[key] = deadline
                heapq.heappush(self._timeouts, (deadline, key))
            waiting.popleft()
            in_mode[key] = task
            batch.append(task)
            room -= 1
        if batch:
            self._last_progress = now
            out.append(Start(batch))

    def _on_ended(self, ev: TasksEnded, now: float, out: list[Action]) -> None:
        in_mode = self.in_mode
        held = self.held
        limit = self.config.max_message_size
        ended = 0
        for o in ev.outcomes:
            key = (o.job_id, o.attempt)
            if in_mode.pop(key, None) is None:
                continue  # stopped or withdrawn: its outcome was decided here already
            del held[key]
            if self._deadlines:
                self._deadlines.pop(key, None)
            if self._lent:
                self._unlend(key, out)
            self._outbox.append(fit_outcome(o, limit))  # a frame over ZMQ_MAXMSGSIZE would cut us off
            ended += 1
        if ended:
            self._last_progress = now
            self._fill(now, out)
            self._settle(now, out)

    def _on_cancel(self, ev: CancelRequested, now: float, out: list[Action]) -> None:
        task = self.held.pop(ev.key, None)
        if task is None:
            return  # not held (ended already, or never ours): nothing to stop
        reason = JobCancelled("the job was cancelled")
        self._end_here(task, reason, infra_failure(task, perr.CANCELLED, "JobCancelled", str(reason)), now, out)
        self._fill(now, out)
        self._settle(now, out)

    def _end_here(self, task: Task, reason: BaseException, outcome: Outcome, now: float, out: list[Action]) -> None:
        """Decide a held task's outcome here (timeout, cancel): stop it in the mode if it got there."""
        if self.in_mode.pop(task.key, None) is not None:
            self._deadlines.pop(task.key, None)
            out.append(Stop(task.key, reason))
            self._unlend(task.key, out)
        self._outbox.append(outcome)
        self._last_progress = now

    def _timed_out(self, now: float, out: list[Action]) -> None:
        heap = self._timeouts
        while heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            if self._deadlines.get(key) != deadline:
                continue  # ended before its deadline
            task = self.held.pop(key)
            reason = TaskTimeout(f"the task ran longer than its {task.timeout:g} s timeout")
            outcome = infra_failure(task, perr.TIMEOUT, "TaskTimeout", str(reason))
            outcome.info["retryable"] = is_retryable(reason, task.retry_on)
            self._end_here(task, reason, outcome, now, out)
        if len(heap) > 64 and len(heap) > 4 * len(self._deadlines):  # mostly tasks that ended in time
            self._timeouts = [(d, k) for k, d in self._deadlines.items()]
            heapq.heapify(self._timeouts)

    # --- lent slots ---------------------------------------------------------------------------------

    def _on_lent(self, ev: SlotLent, now: float, out: list[Action]) -> None:
        if ev.key not in self.in_mode or self.draining:
            return  # ended or stopped already; a drain starts nothing new anyway
        n = self._lent.get(ev.key, 0)
        self._lent[ev.key] = n + 1
        if n == 0:
            self._tell_lent(out)
            self._fill(now, out)  # a task already here may take the lent slot at once

    def _on_back(self, ev: SlotBack, now: float, out: list[Action]) -> None:
        n = self._lent.get(ev.key, 0)
        if n > 1:
            self._lent[ev.key] = n - 1
        elif n == 1:
            self._unlend(ev.key, out)

    def _unlend(self, key: Key, out: list[Action]) -> None:
        if self._lent.pop(key, None) is not None:
            self._tell_lent(out)

    def _tell_lent(self, out: list[Action]) -> None:
        if self.connected and not self.draining:
            out.append(Send(Cmd.LENT, c.Lent(len(self._lent))))

    # --- outcomes out ------------------------------------------------------------------------------

    def _settle(self, now: float, out: list[Action]) -> None:
        """After a change: when to send the outcomes gathered, and whether the drain is over."""
        if self._outbox and self.connected:
            if len(self.held) <= self.slots or len(self._outbox) >= FLUSH_BATCH:
                if self._flush_at is None or self._flush_at > now:
                    self._flush_at = now  # at the end of this loop turn, with whatever else ends in it
            elif self._flush_at is None:
                self._flush_at = now + FLUSH_DELAY  # more held than slots (tiny tasks): fewer, fuller RESULTS
        if self.draining:
            self._check_drain(now, out)

    def _flush(self, now: float, out: list[Action]) -> None:
        """Every outcome gathered, in one new RESULTS (kept until acknowledged), after the tasks' reports."""
        self._flush_at = None
        if not self._outbox or not self.connected:
            return
        outcomes, self._outbox = self._outbox, []
        entries = []
        frames: list[Any] = []
        keys = self._closed
        self._closed = []
        for o in outcomes:
            entries.append(c.OutcomeEntry(o.job_id, o.attempt, o.ok, o.info, len(o.frames)))
            frames.extend(o.frames)
            keys.append((o.job_id, o.attempt))
        self.seq += 1
        body = c.Results(self.seq, entries)
        self.retained.append(Batch(self.seq, body, frames))
        out.append(SendReports(keys))  # a task's last output and progress reach the dispatcher before its outcome
        out.append(Send(Cmd.RESULTS, body, frames))

    # --- hand-back and drain -----------------------------------------------------------------------

    def _hand_back_unstarted(self, now: float, out: list[Action], why: str) -> None:
        """Hand back every assignment no slot has taken: waiting here now, or queued in the mode beyond its
        slots (withdrawn if it has not started: the mode answers with Withdrawn)."""
        back: list[Key] = []
        held = self.held
        for task in self._waiting:
            if held.get(task.key) is task:
                del held[task.key]
                back.append(task.key)
        self._waiting.clear()
        queued = list(islice(self.in_mode, self.slots, None))  # the first `slots` hold a slot
        if queued:
            self._giveback = back
            out.append(Withdraw(queued))
        elif back:
            self._give_back(back, why, out)

    def _on_withdrawn(self, ev: Withdrawn, now: float, out: list[Action]) -> None:
        back, self._giveback = self._giveback or [], None
        for key in ev.keys:
            if self.in_mode.pop(key, None) is not None:
                del self.held[key]
                back.append(key)
        if back:
            self._give_back(back, "draining" if self.draining else "stalled", out)
        self._settle(now, out)

    def _give_back(self, keys: list[Key], why: str, out: list[Action]) -> None:
        if self.connected:
            out.append(Send(Cmd.GIVEBACK, [c.AttemptRef(job_id, attempt) for job_id, attempt in keys]))
        if why == "stalled":
            text = f"slots busy for {STALL_AFTER:g} s or more: handed {len(keys)} waiting job(s) back to the dispatcher"
        else:
            text = f"handed {len(keys)} job(s) not yet started back to the dispatcher"
        out.append(Log(logging.INFO, text))

    def _on_stop(self, ev: StopRequested, now: float, out: list[Action]) -> None:
        if self.draining:  # a second signal: the deadline is now
            self._drain_at = now
            self._check_drain(now, out)
            return
        self.draining = True
        self._drain_at = now + self.config.drain_timeout
        self._stall_at = None
        if self.connected:
            out.append(Send(Cmd.LEAVING, c.Empty()))
            self._hand_back_unstarted(now, out, "draining")
        # else: the loop connects first; READY and LEAVING go out then (_on_connected)
        if self.held:
            out.append(
                Log(logging.INFO, f"draining {len(self.held)} running task(s), up to {self.config.drain_timeout:.0f} s")
            )
        self._settle(now, out)

    def _check_drain(self, now: float, out: list[Action]) -> None:
        if self.finished or self._giveback is not None:
            return
        due = self._drain_at is not None and now >= self._drain_at
        if self.connected:
            if self.held and not due:
                return
            if self.held:  # the deadline: stop what still runs, hand it all back
                keys = list(self.held)
                self._stop_all(out)
                out.append(Send(Cmd.GIVEBACK, [c.AttemptRef(job_id, attempt) for job_id, attempt in keys]))
                out.append(Log(logging.INFO, f"handed back {len(keys)} unfinished task(s)"))
            self._flush(now, out)
            if self._closed:
                out.append(SendReports(self._closed))
                self._closed = []
            out.append(Send(Cmd.GOODBYE, c.Empty()))
        elif self.orphaned:
            if self.held and not due:
                return
            self._stop_all(out)  # the dispatcher counts these as lost and runs them elsewhere
        else:
            return  # not connected yet: the loop connects first, and READY and LEAVING go out then
        self.finished = True
        out.append(Finished())

    def _stop_all(self, out: list[Action]) -> None:
        reason = JobCancelled("the job was cancelled")
        for key in self.in_mode:
            out.append(Stop(key, reason))
        self._closed.extend(self.held)
        self.held.clear()
        self.in_mode.clear()
        self._waiting.clear()
        self._deadlines.clear()
        self._lent.clear()

    # --- time ---------------------------------------------------------------------------------------

    def _on_tick(self, ev: Tick, now: float, out: list[Action]) -> None:
        self._armed_at = None  # the loop's timer fired
        if self._timeouts and self._timeouts[0][0] <= now:
            self._timed_out(now, out)
            self._fill(now, out)
            self._settle(now, out)
        if self._stall_at is not None and self._stall_at <= now:
            self._check_stall(now, out)
        if self._flush_at is not None and self._flush_at <= now:
            self._flush(now, out)
        if self.draining:
            self._check_drain(now, out)

    def _check_stall(self, now: float, out: list[Action]) -> None:
        """Auto prefetch: no task went to the mode or ended for STALL_AFTER: hand the jobs not started back."""
        self._stall_at = None
        if len(self.held) <= self.slots or self.draining or not self.connected:
            return  # (disconnected: nobody to hand them to; the next ASSIGN looks again)
        if now - self._last_progress < STALL_AFTER:
            self._stall_at = self._last_progress + STALL_AFTER  # tasks keep moving: look again then
            return
        self._hand_back_unstarted(now, out, "stalled")

    def _arm_next(self, out: list[Action]) -> None:
        """Ask for a Tick at the earliest deadline, unless the loop's timer already fires by then."""
        deadlines: Iterable[float | None] = (self._flush_at, self._stall_at, self._drain_at if self.draining else None)
        nxt = min((d for d in deadlines if d is not None), default=None)
        if self._timeouts and (nxt is None or self._timeouts[0][0] < nxt):
            nxt = self._timeouts[0][0]
        if nxt is not None and (self._armed_at is None or nxt < self._armed_at):
            self._armed_at = nxt
            out.append(ArmTimer(nxt))

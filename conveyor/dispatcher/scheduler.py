"""The dispatcher's scheduling state machine: jobs, queues, workers, assignments. No I/O.

Events come in as method calls (submit, worker_ready, outcome, worker_gone, cancel, tick...),
each taking the current time as an argument. What must go out on the wire accumulates in
`outbox` as plain action objects, which the socket loop drains after each batch of events.
This keeps every scheduling rule testable without sockets or clocks.

A job's life: **waiting** (for its parents, graph.py) -> **scheduled** (not due: `eta`, `countdown`; on a
timer) -> **limited** (waiting for its limit keys, limits.py) -> **queued** (could be assigned now,
queues.py) -> **running** (assigned) -> succeeded | failed | cancelled | **expired** (not started by its
`expires`). Everything that waits waits here, never in a worker: a job becomes queued only when it could
be assigned now.

Rules worth knowing before reading:
- Priority: a worker with credit gets the best job among every class it serves: the highest
  priority, then the oldest (queues.py); optional aging makes waiting jobs gain priority.
- Credit: a worker announces free slots; it is never assigned more jobs than it has credit, and
  each outcome or hand-back it sends returns one credit.
- Fencing: every assignment has an attempt number. An outcome counts only if it is for the
  job's current attempt on the worker holding it; a late *success* from a worker that lost the job
  still finishes an unfinished job (once), never a finished one.
- Prefetch: a worker may hold jobs beyond its slots (its window). With `prefetch_auto` the window
  is what keeps its slots busy for PREFETCH_HORIZON given its recent task durations, up to its
  `prefetch`: tiny tasks never wait a round trip, and a slow task has no job queued behind it.
  Jobs under limit keys go only into free slots, never into a window: assignment is start.
- Retries: infrastructure failures (crash, lost worker) retry up to `infra_retries`, or the task's
  `retries` if higher; a task's own failure retries up to its `retries` when the worker marked it
  retryable (`retry_on`). A retried job keeps its priority and its place (acceptance order).

Over ~500 lines on purpose: one class holds every rule that moves a job, so each can see all of a
job's state; the structures it uses are in queues.py, limits.py, deliveries.py and model.py.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable
from typing import Any

from conveyor.dispatcher.deliveries import Deliveries
from conveyor.dispatcher.graph import EARLY_JOIN_MIN, Node, UnknownParent
from conveyor.dispatcher.limits import Limits, parse_rule
from conveyor.dispatcher.model import (
    CANCELLED,
    EXPIRED,
    FAILED,
    FINISHED_STATES,
    LIMITED,
    MAX_BACKOFF,
    NO_HISTORY,
    QUEUED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    WAITING,
    WAITING_STATES,
    Action,
    Assign,
    CancelRunning,
    ClassKey,
    Deliver,
    Job,
    Resend,
    WorkerInfo,
)
from conveyor.dispatcher.queues import ClassQueue, Queues, sort_key
from conveyor.protocol import failures as perr
from conveyor.protocol.commands import TaskOptions

PREFETCH_HORIZON = 0.002  # seconds of work a worker may hold beyond its slots (auto prefetch)
DURATION_WEIGHT = 0.2  # weight of the newest task in a worker's moving average of durations
OFFLOAD_AFTER_S = 2.0  # a job due further ahead than this keeps its call in the journal, not in memory
ROOT_ERROR_BYTES = 64 * 1024  # a root's error frames at most this large go with its dependants' failures
WITHHOLD_BYTES = 64 * 1024  # a result at least this large that dependants use is not sent to its client unasked

__all__ = [
    "CANCELLED",
    "EXPIRED",
    "FAILED",
    "FINISHED_STATES",
    "LIMITED",
    "QUEUED",
    "RUNNING",
    "SCHEDULED",
    "SUCCEEDED",
    "WAITING",
    "Action",
    "Assign",
    "CancelRunning",
    "ClassKey",
    "Deliver",
    "Job",
    "Scheduler",
    "TaskOptions",
    "WorkerInfo",
]

OFFLOADED: list[Any] = []  # the frames of a job whose call waits in the journal (compared by identity)


class Scheduler:
    def __init__(
        self,
        *,
        infra_retries: int = 3,
        liveness: float = 3.0,
        result_ttl: float = 3600.0,
        rng: random.Random | None = None,
        aging_s: float | None = None,
        limits: Limits | None = None,
    ):
        self.infra_retries = infra_retries
        self.liveness = liveness  # seconds of silence after which a worker is lost
        self.result_ttl = result_ttl
        self.rng = rng or random.Random()
        self.aging_s = aging_s  # seconds of waiting worth one priority point (None: strict priority)
        self.limits = limits or Limits()
        self.jobs: dict[str, Job] = {}  # every job not yet forgotten
        self.workers: dict[bytes, WorkerInfo] = {}
        self._free: dict[bytes, None] = {}  # workers with credit, least recently assigned first
        self.ready = Queues(QUEUED)  # queued: per class (mode, tags)
        self.waiting = Queues(LIMITED)  # limited: per (class, limit keys)
        self._delayed: list[tuple[float, int, str]] = []  # (retry at, seq, job id): retries waiting out a backoff
        self._due: list[tuple[float, int, str]] = []  # (due, seq, job id): scheduled jobs
        self._expiring: list[tuple[float, int, str]] = []  # (expires, seq, job id): jobs with an expiry
        self._limits_wake: float | None = None  # when a rate key next lets a waiting job start
        self._finished: deque[str] = deque()  # finished job ids in finishing order, for expiry
        self._seq = 0
        self.n_queued = 0  # queued, and waiting out a retry delay
        self.n_running = 0
        self.n_scheduled = 0
        self.n_waiting = 0  # waiting for parents
        self._settling: deque[Job] = deque()  # finished jobs whose dependants are still to be told
        self._now = 0.0  # the latest time an event brought
        self._propagating = False
        self.counts = {
            SUCCEEDED: 0, FAILED: 0, CANCELLED: 0, EXPIRED: 0, "retried": 0, "submitted": 0, "fenced": 0,
            "refused": 0, "limited_starts": 0,
        }
        self.held_bytes = 0  # bytes of call frames held for unfinished jobs (--max-queued-bytes bounds it)
        # What changed this turn, for the journal: jobs that finished and ids that were dropped.
        self._finished_log: list[Job] = []
        self._forgotten_log: list[str] = []
        self.outbox: list[Action] = []
        self.deliveries = Deliveries(self._forget)  # outcomes on their way to clients, until acknowledged

    # The ready queues under the names the property tests read.
    @property
    def _queues(self) -> dict[Any, ClassQueue]:
        return self.ready.by_class

    @property
    def _queued_by_class(self) -> dict[Any, int]:
        return self.ready.counts

    @property
    def n_limited(self) -> int:
        return self.waiting.total

    # --- clients ------------------------------------------------------------------------------

    def submit(
        self,
        job_id: str,
        opts: TaskOptions,
        frames: list[Any],
        owner: bytes | None,
        now: float,
        due: float | None = None,
        expires: float | None = None,
        parents: Iterable[str] = (),
        after: Iterable[str] = (),
        allow_failure: Iterable[str] = (),
        restoring: bool = False,
    ) -> Job:
        """Accept a job; a job id seen before is not queued twice (a client re-sending after a restart).

        `due` and `expires` are times on this scheduler's (monotonic) clock: not before `due`, and
        expired if not started by `expires`. `parents` (whose results the call refers to) and `after`
        must be known, else UnknownParent (while `restoring` from the journal, an unknown parent
        finished and was forgotten: it counts as done)."""
        existing = self.jobs.get(job_id)
        if existing is not None:
            if owner is not None:
                existing.owner = owner
                if existing.state in FINISHED_STATES:
                    self._deliver_to(owner, existing)
            return existing
        node = None
        if parents or after:
            node = Node(tuple(parents), tuple(after), frozenset(allow_failure))
            if not restoring:
                for parent in node.all_parents:
                    if parent not in self.jobs:
                        raise UnknownParent(job_id, parent)
        self._seq += 1
        job = Job(job_id, opts, frames, owner, self._seq, now)
        self.jobs[job_id] = job
        self.counts["submitted"] += 1
        self.held_bytes += _nbytes(frames)
        rate = opts.rate_limit
        if rate is not None and not self.limits.known(f"fn:{opts.fn}"):
            self.limits.declare(f"fn:{opts.fn}", parse_rule(rate), now)  # the caller checked the rule
        if expires is not None:
            job.expires = expires
            heapq.heappush(self._expiring, (expires, job.seq, job_id))
        job.due = due
        if node is not None:
            job.node = node
            if self._link(job, node, now):
                return job  # it waits for its parents, or already ended (a parent that failed)
        self._runnable(job, now)
        return job

    def _link(self, job: Job, node: Node, now: float) -> bool:
        """Attach a new job to its parents; True if it waits for them (or ended: a parent ended badly)."""
        blocked: Job | None = None
        uses_result = frozenset(node.parents)  # not the tuple: a fan-in over 100,000 was quadratic
        if len(node.parents) >= EARLY_JOIN_MIN:
            node.start_early_join()
        for parent_id in node.all_parents:
            parent = self.jobs.get(parent_id)
            if parent is None:
                continue  # restoring: it finished and was forgotten, so it succeeded
            if parent_id in uses_result:
                if parent.node is None:
                    parent.node = Node()
                parent.node.pins += 1  # its result stays until this job has run
            if parent.state in FINISHED_STATES:
                if parent.state != SUCCEEDED and parent_id not in node.allow_failure and blocked is None:
                    blocked = parent
                elif parent.state == SUCCEEDED and node.early is not None:
                    node.parent_result(parent_id, parent.result_frames)
                continue
            if parent.node is None:
                parent.node = Node()
            parent.node.children.append(job.id)
            node.waiting += 1
        if blocked is not None:
            self._blocked_by(job, blocked, now)
            return True
        if node.waiting:
            job.state = WAITING
            self.n_waiting += 1
            return True
        return False

    def _runnable(self, job: Job, now: float) -> None:
        """Nothing it depends on holds it any more: it waits for its due time, its limit keys, a worker.
        A dependant's countdown and expiry count from this moment."""
        opts = job.opts
        due = job.due
        if job.node is not None:
            if opts.countdown is not None:
                due = max(due or now, now + opts.countdown)
            if opts.expires_in is not None and job.expires is None:
                job.expires = now + opts.expires_in
                heapq.heappush(self._expiring, (job.expires, job.seq, job.id))
        if due is not None:
            job.due = due
            job.state = SCHEDULED
            self.n_scheduled += 1
            heapq.heappush(self._due, (due, job.seq, job.id))  # even if overdue: released in due order
        else:
            self._enqueue(job, now)

    def refuse(self, job_id: str, now: float = 0.0) -> bool:
        """Take back a job just submitted that no worker has taken (it could not be made durable); False
        if it is gone, or has started: then it stays."""
        job = self.jobs.get(job_id)
        if job is None or job.state not in WAITING_STATES or job.attempt or job.retry_at is not None:
            return False
        self._stop_waiting(job)
        job.state = CANCELLED  # its queue entries are skipped from now on
        del self.jobs[job_id]
        self.held_bytes -= _nbytes(job.frames or ())
        job.frames = None
        self.counts["submitted"] -= 1
        self.counts["refused"] += 1
        if job.node is not None:
            self._unpin_parents(job)
            for child_id in job.node.children:  # accepted after it, refused with it or never to run
                child = self.jobs.get(child_id)
                if child is not None and child.state == WAITING:
                    self.n_waiting -= 1
                    info = perr.error_info(perr.DEPENDENCY_CANCELLED, "DependencyCancelled",
                                           f"it depends on job {job_id}, which could not be accepted")
                    info["root"] = job_id
                    self._finish(child, CANCELLED, info, [], now)
        return True

    def watch(self, client: bytes, job_ids: Iterable[str]) -> list[str]:
        """Deliver these jobs' outcomes to client when they finish (now if finished). Returns unknown ids."""
        unknown = []
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is None:
                unknown.append(job_id)
            elif job.state in FINISHED_STATES:
                self._deliver_to(client, job)
            else:
                if job.watchers is None:
                    job.watchers = set()
                job.watchers.add(client)
        return unknown

    def cancel(self, job_id: str, now: float) -> bool:
        job = self.jobs.get(job_id)
        if job is None or job.state in FINISHED_STATES:
            return False
        self._stop_anywhere(job)
        info = perr.error_info(perr.CANCELLED, "JobCancelled", "the job was cancelled")
        self._finish(job, CANCELLED, info, [], now)
        return True

    def _stop_anywhere(self, job: Job) -> None:
        """An unfinished job is about to be finished from outside: stop its running attempt (its late
        outcome is fenced) or take it out of whatever it waits in."""
        if job.state == RUNNING and job.worker is not None:
            self.outbox.append(CancelRunning(job.worker, job.id, job.attempt))
            self._release(job)
        else:
            self._stop_waiting(job)

    def merge_final(
        self, job_id: str, state: str, attempts: int, history: list[dict[str, Any]], info: dict[str, Any],
        frames: list[Any], now: float,
    ) -> bool:
        """The final state the other dispatcher of a pair reached for a job while the two were apart (a
        merge, pair.py): it ends the job here if the job is still unfinished (an attempt running here is
        stopped); a final state of our own stands. True if it was taken."""
        job = self.jobs.get(job_id)
        if job is None or job.state in FINISHED_STATES or state not in FINISHED_STATES:
            return False
        self._stop_anywhere(job)
        job.attempt = max(job.attempt, attempts)
        job.history = [*job.history, *history]
        self._finish(job, state, info, frames, now)
        return True

    def forget(self, job_id: str) -> None:
        """Drop a finished job whose result was delivered and need not be kept."""
        job = self.jobs.get(job_id)
        if job is not None:
            self._forget(job)

    def _forget(self, job: Job) -> None:
        if job.node is not None and job.node.pins:
            return  # a dependant still needs its result: forgotten once they have run (_unpin_parents)
        if job.state in FINISHED_STATES and self.jobs.get(job.id) is job:
            del self.jobs[job.id]
            self._forgotten_log.append(job.id)

    def acked(self, client: bytes, seq: int) -> None:
        """The client has every JOB_DONE up to seq: jobs delivered in them may be forgotten."""
        self.deliveries.acked(client, seq)

    def delivery_failed(self, client: bytes, seq: int) -> None:
        """The JOB_DONE numbered seq could not be sent: its jobs stay until their result TTL."""
        self.deliveries.failed(client, seq)

    def client_gone(self, client: bytes) -> None:
        """A client not heard from for long (it pings every second)."""
        self.deliveries.client_gone(client)

    # --- a job's call, kept in the journal while it is not due --------------------------------------------

    def offload(self, job_id: str, now: float) -> bool:
        """Drop the call frames of a scheduled job that is durable and not due soon (the journal holds them;
        the loop reads them back when the job is assigned). True if dropped."""
        job = self.jobs.get(job_id)
        if job is None or job.state != SCHEDULED or not job.frames or job.due is None:
            return False
        if job.due - now < OFFLOAD_AFTER_S:
            return False
        self.held_bytes -= _nbytes(job.frames)
        job.frames = OFFLOADED
        return True

    def reload(self, job: Job, frames: list[Any]) -> None:
        """The call of an offloaded job, read back from the journal for its assignment."""
        job.frames = frames
        self.held_bytes += _nbytes(frames)

    # --- workers ------------------------------------------------------------------------------

    def worker_ready(
        self,
        wid: bytes,
        *,
        name: str,
        host: str,
        pid: int,
        mode: str,
        concurrency: int,
        tags: Iterable[str],
        credit: int,
        running: Iterable[tuple[str, int]],
        now: float,
        session: str = "",
        prefetch: int = 0,
        prefetch_auto: bool = False,
        results_seq: int = 1,
    ) -> WorkerInfo:
        """Register a worker, or re-register one that reconnected, keeping the assignments it still holds.

        A READY repeated on the same connection (same session) changes nothing: assignments sent on
        that connection are still on their way to the worker and must not be taken back.

        The same worker process on a new connection (same routing id, new session) lists everything it
        holds, outcomes not yet acknowledged included: an assignment it does not list is lost (an ASSIGN
        lost with a broken connection, say) and retried; one it lists that no longer counts is stopped
        (a CANCEL may have been lost too).
        """
        known = self.workers.get(wid)
        if known is not None and session and known.session == session:
            known.last_seen = now
            return known
        still_running = {job_id: attempt for job_id, attempt in running}
        if known is not None:
            results_seq = max(results_seq, known.results_next)  # what it already applied is not applied twice
            self._drop_worker(wid, keep=still_running, now=now)
        w = WorkerInfo(
            id=wid,
            name=name,
            host=host,
            pid=pid,
            mode=mode,
            concurrency=concurrency,
            tags=frozenset(tags),
            credit=max(0, credit),
            last_seen=now,
            registered_at=now,
            session=session,
            prefetch=max(0, prefetch),
            prefetch_auto=prefetch_auto,
        )
        w.window = 0 if prefetch_auto else w.prefetch  # auto: nothing beyond the slots until durations are known
        w.classes = {k: None for k in self.ready.by_class if w.serves(k)}
        w.results_next = max(1, results_seq)
        self.workers[wid] = w
        for job_id, attempt in still_running.items():
            job = self.jobs.get(job_id)
            if job is None or job.state in FINISHED_STATES:
                if known is not None:  # it runs what no longer counts: a CANCEL it never got
                    self.outbox.append(CancelRunning(wid, job_id, attempt))
                continue
            if job.state == RUNNING and job.worker == wid and job.attempt == attempt:
                w.running[job_id] = attempt
            elif job.state in (QUEUED, LIMITED) and job.retry_at is None and attempt >= job.attempt:
                # Queued again (we lost the worker, or restarted from the journal) while it kept running
                # the job: adopt that attempt rather than run the job a second time.
                self._stop_waiting(job)
                job.state = RUNNING
                job.attempt = attempt
                job.worker = wid
                w.running[job_id] = attempt
                self.n_running += 1
                self.limits.adopt(job.opts.limit_keys, now)
                _history(job).append({"attempt": attempt, "worker": w.name, "started": now})
        w.credit = max(0, min(w.credit, w.capacity - len(w.running)))
        if w.credit:
            self._free[wid] = None
        return w

    def results_in_order(self, wid: bytes, seq: int) -> bool:
        """Whether to apply the RESULTS numbered seq from this worker now: the next one in its sequence.

        An older one was applied already (a re-send). A newer one means some went missing (a broken
        connection): it is not applied, and the worker is asked once to re-send from the first missing
        one, in order. RESULTS from a worker not registered are applied as they come (late outcomes)."""
        w = self.workers.get(wid)
        if w is None:
            return True
        if seq == w.results_next:
            w.results_next += 1
            return True
        if seq > w.results_next and w.resend_asked != w.results_next:
            w.resend_asked = w.results_next
            self.outbox.append(Resend(wid, w.results_next))
        return False

    def heard_from(self, wid: bytes, now: float) -> bool:
        """Any message from a worker proves it alive. False if the worker is unknown."""
        w = self.workers.get(wid)
        if w is None:
            return False
        w.last_seen = now
        return True

    def worker_lent(self, wid: bytes, slots: int) -> None:
        """LENT: `slots` of the worker's tasks wait on their children now; each may let one more job start
        there (a one-slot worker can run the child its task waits for). A slot coming back takes its
        credit back; a job started on it meanwhile runs on, and no credit returns until it ends."""
        w = self.workers.get(wid)
        if w is None:
            return
        delta, w.lent = slots - w.lent, slots
        if w.draining:
            return
        w.credit = max(0, min(w.credit + delta, w.capacity - len(w.running)))
        if w.credit:
            self._free.setdefault(wid, None)
        else:
            self._free.pop(wid, None)

    def worker_leaving(self, wid: bytes) -> None:
        w = self.workers.get(wid)
        if w is not None:
            w.draining = True
            self._free.pop(wid, None)

    def worker_gone(self, wid: bytes, now: float) -> None:
        """The worker said goodbye: whatever it still held goes back to the queue."""
        if wid in self.workers:
            self._drop_worker(wid, keep={}, now=now)

    def expire_workers(self, now: float) -> list[WorkerInfo]:
        """Workers silent for longer than the liveness limit are lost; their jobs are retried."""
        lost = [w for w in self.workers.values() if now - w.last_seen > self.liveness]
        for w in lost:
            self._drop_worker(w.id, keep={}, now=now)
        return lost

    def outcome(
        self,
        wid: bytes,
        job_id: str,
        attempt: int,
        ok: bool,
        info: dict[str, Any],
        frames: list[Any],
        now: float,
    ) -> None:
        """A worker reports how an attempt ended. Returns the worker's credit and applies fencing."""
        w = self.workers.get(wid)
        if w is not None:
            # Only this very attempt leaves w.running: the same worker may hold a newer attempt of the
            # job (it was lost, re-registered and got the job again), which must stay tracked.
            if w.running.get(job_id) == attempt:
                del w.running[job_id]
                w.done += 1
            if ok and w.prefetch_auto:
                self._observe_duration(w, info.get("duration"))
            self._return_credit(w)  # an attempt we had fenced off still held a slot: it is free now too
        job = self.jobs.get(job_id)
        current = job is not None and job.state == RUNNING and job.worker == wid and job.attempt == attempt
        if not current:
            self.counts["fenced"] += 1  # an outcome of an attempt that no longer counts
        if job is None or job.state in FINISHED_STATES:
            return
        if not current:
            if ok:  # a late success still counts, once; stop the newer attempt if one runs
                if job.state == RUNNING and job.worker is not None:
                    self.outbox.append(CancelRunning(job.worker, job.id, job.attempt))
                    self._release(job)
                else:
                    self._stop_waiting(job)
                self._record_attempt(job, attempt, wid, None, now)
                self._finish(job, SUCCEEDED, info, frames, now)
            return
        self._release(job)
        if ok:
            self._record_attempt(job, attempt, wid, None, now)
            self._finish(job, SUCCEEDED, info, frames, now)
            return
        self._record_attempt(job, attempt, wid, info, now)
        self._failed_attempt(job, info, frames, now, retryable=bool(info.get("retryable")))

    def give_back(self, wid: bytes, job_id: str, attempt: int, now: float) -> None:
        """A draining worker returns a job it will not finish; this does not count as a failure."""
        w = self.workers.get(wid)
        if w is not None:
            if w.running.get(job_id) == attempt:
                del w.running[job_id]
            if not w.draining:
                if w.prefetch_auto:  # handed back because a slow task held its slots: count it as a slow one
                    self._observe_duration(w, 1.0)
                self._return_credit(w)
        job = self.jobs.get(job_id)
        if job is None or job.state != RUNNING or job.worker != wid or job.attempt != attempt:
            return
        self._release(job)
        for entry in reversed(job.history):
            if entry["attempt"] == attempt:
                entry["handed_back"] = True  # it never started: its expiry still applies (tick)
                break
        if job.expires is not None:  # its expiry may have come and gone while it was held: look again
            heapq.heappush(self._expiring, (job.expires, job.seq, job.id))
        self._enqueue(job, now)

    # --- time and assignment --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Release due jobs and retries whose backoff has passed, expire jobs not started in time, and
        forget results past their TTL."""
        self._now = now
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job_id = heapq.heappop(self._delayed)
            job = self.jobs.get(job_id)
            if job is not None and job.state == QUEUED and job.retry_at is not None:
                job.retry_at = None
                self.n_queued -= 1  # _enqueue counts it again
                self._enqueue(job, now)
        while self._due and self._due[0][0] <= now:
            due, _, job_id = heapq.heappop(self._due)
            job = self.jobs.get(job_id)
            if job is not None and job.state == SCHEDULED and job.due == due:
                self.n_scheduled -= 1
                self._seq += 1
                job.seq = self._seq  # among equal priorities, in the order they became due
                self._enqueue(job, now)
        while self._expiring and self._expiring[0][0] <= now:
            _, _, job_id = heapq.heappop(self._expiring)
            job = self.jobs.get(job_id)
            if job is not None and job.state in WAITING_STATES and not _ever_started(job):
                self._stop_waiting(job)
                info = perr.error_info(perr.EXPIRED, "JobExpired", "the job had not started by its expiry time")
                self._finish(job, EXPIRED, info, [], now)
        while self._finished:
            job = self.jobs.get(self._finished[0])
            if job is not None and job.finished_at is not None and now - job.finished_at < self.result_ttl:
                break
            self._finished.popleft()
            if job is not None and job.state in FINISHED_STATES:
                if job.node is not None and job.node.pins:
                    continue  # pinned by a dependant: forgotten once it has run
                del self.jobs[job.id]
                self._forgotten_log.append(job.id)

    def next_timer(self) -> float | None:
        """When the next timer is due: a retry, a due job, an expiry, a rate key allowing a start."""
        times = [h[0][0] for h in (self._delayed, self._due, self._expiring) if h]
        if self._limits_wake is not None:
            times.append(self._limits_wake)
        return min(times) if times else None

    def schedule(self, now: float) -> None:
        """Hand waiting jobs to workers with credit, best first, spreading them over the free workers.

        Passes repeat until no free worker can take another job, so no job stays queued while a
        worker able to serve it has credit; each worker gets at most one Assign per call."""
        self._limits_wake = None
        if not self._free or not (self.n_queued or self.waiting.total):
            return
        assigned: dict[bytes, list[Job]] = {}
        candidates = list(self._free)
        while candidates and (self.n_queued or self.waiting.total):
            still: list[bytes] = []
            for wid in candidates:
                w = self.workers[wid]
                if w.window > 3 and len(w.running) >= w.concurrency and w.credit < w.window // 4:
                    # Its slots are all taken and only a sliver of its window is free: wait for more
                    # outcomes rather than send a message per job (the "silly window" of TCP).
                    continue
                share = max(1, (self.n_queued + self.waiting.total) // len(candidates))
                jobs = self._pop_for(w, min(w.credit, share), now)
                if not jobs:
                    continue  # nothing waiting that it may take now: that only changes with time or outcomes
                history_entry = {"worker": w.name, "started": now}
                for job in jobs:  # already RUNNING (_pop_for)
                    job.attempt += 1
                    job.worker = wid
                    w.running[job.id] = job.attempt
                    _history(job).append({"attempt": job.attempt, **history_entry})
                self.n_running += len(jobs)
                w.credit -= len(jobs)
                del self._free[wid]
                if w.credit:
                    self._free[wid] = None  # to the back: least recently assigned goes first
                    still.append(wid)
                assigned.setdefault(wid, []).extend(jobs)
            candidates = still
        for wid, jobs in assigned.items():
            self.outbox.append(Assign(wid, jobs))
        if self.waiting.total and self._free:
            self._limits_wake = self._next_limited_start(now)

    def drain_finished(self) -> list[Job]:
        """Jobs that finished since the last call (the journal records them)."""
        out, self._finished_log = self._finished_log, []
        return out

    def drain_forgotten(self) -> list[str]:
        """Ids of finished jobs dropped since the last call (delivered, or expired)."""
        out, self._forgotten_log = self._forgotten_log, []
        return out

    def restore_finished(
        self,
        job_id: str,
        opts: TaskOptions,
        owner: bytes | None,
        state: str,
        attempts: int,
        history: list[dict[str, Any]],
        result_info: dict[str, Any],
        result_frames: list[Any],
        finished_at: float,
    ) -> Job:
        """Bring back a finished job from the journal (after a restart), result and all."""
        self._seq += 1
        job = Job(job_id, opts, [], owner, self._seq, finished_at)
        job.state = state
        job.attempt = attempts
        job.history = history
        job.result_info = result_info
        job.result_frames = result_frames
        job.finished_at = finished_at
        job.frames = None
        self.jobs[job_id] = job
        self._finished.append(job_id)
        return job

    def take_actions(self) -> list[Action]:
        out = self.outbox
        out.extend(self.deliveries.take())
        self.outbox = []
        return out

    # --- views --------------------------------------------------------------------------------

    def job_view(self, job: Job) -> dict[str, Any]:
        opts = job.opts
        view: dict[str, Any] = {
            "id": job.id,
            "state": job.state,
            "fn": opts.fn,
            "attempts": job.attempt,
            "worker": job.history[-1]["worker"] if job.history else None,
            "history": job.history,
            "submitted_at": job.submitted_at,
            "finished_at": job.finished_at,
        }
        if job.state == QUEUED and job.retry_at is not None:
            view["retry_at"] = job.retry_at
        if job.state in (FAILED, CANCELLED, EXPIRED):
            view["error"] = job.result_info
        if opts.priority:
            view["priority"] = opts.priority
        if job.due is not None:
            view["due_at"] = job.due
        if job.expires is not None:
            view["expires_at"] = job.expires
        if opts.limit_keys:
            view["limits"] = list(opts.limit_keys)
        node = job.node
        if node is not None:
            if node.all_parents:
                view["parents"] = list(node.all_parents)
            if node.children:
                view["children"] = list(node.children)
            if job.state == WAITING:
                view["waiting_for"] = node.waiting
            if node.root is not None:
                view["root"] = node.root
        return view

    def status(self, now: float) -> dict[str, Any]:
        workers = [
            {
                "name": w.name,
                "host": w.host,
                "pid": w.pid,
                "mode": w.mode,
                "concurrency": w.concurrency,
                "prefetch": w.prefetch,  # the most it may hold beyond its slots: the cap when prefetch_auto
                "prefetch_auto": w.prefetch_auto,
                "window": w.window,  # what it may hold beyond its slots right now
                "tags": sorted(w.tags),
                "running": len(w.running),
                "lent": w.lent,  # slots its tasks lend while they wait on children (LENT)
                "done": w.done,
                "draining": w.draining,
                "last_seen_ago": round(now - w.last_seen, 3),
            }
            for w in self.workers.values()
        ]
        by_class = [
            {"mode": mode, "tags": sorted(tags), "queued": n}
            for (mode, tags), n in self.ready.counts.items()
            if n
        ]
        return {
            "workers": workers,
            "queued": self.n_queued,
            "running": self.n_running,
            "delayed": len(self._delayed),
            "scheduled": self.n_scheduled,
            "waiting": self.n_waiting,
            "limited": self.waiting.total,
            "queues": by_class,
            "totals": dict(self.counts),
        }

    def limits_view(self, now: float) -> list[dict[str, Any]]:
        """Each limit key: its rule, tokens or running count, jobs waiting, the oldest one's wait."""
        oldest: dict[str, float] = {}
        for (_, keys), q in self.waiting.by_class.items():
            head = q.head()
            if head is None:
                continue
            for key in keys:
                oldest[key] = min(oldest.get(key, math.inf), head[2].submitted_at)
        out = self.limits.view(now)
        for name, t in self.limits.templates.items():  # a template's oldest wait: its keys' oldest
            since = min((oldest[k] for k in t.keys if k in oldest), default=None)
            if since is not None:
                oldest[name] = since
        for entry in out:
            since = oldest.get(str(entry["key"]))
            entry["oldest_wait_s"] = None if since is None else round(now - since, 3)
        return out

    # --- internals ----------------------------------------------------------------------------

    def _enqueue(self, job: Job, now: float) -> None:
        """The job could run now but for a worker (queued), or but for its limit keys (limited).
        Handed back or retried, it keeps its place: its order is its acceptance (or due) order."""
        job.worker = None
        order = job.seq
        since = job.submitted_at if job.due is None else max(job.submitted_at, job.due)
        key = sort_key(job, self.aging_s, since)
        limit_keys = job.opts.limit_keys
        if limit_keys:
            job.state = LIMITED
            self.waiting.push((job.class_key, limit_keys), key, order, job)
            for k in limit_keys:
                state = self.limits.state(k, now)  # a key filled in from a template: made on first use
                if state is not None:
                    state.waiting += 1
            return
        job.state = QUEUED
        cls = job.class_key
        if self.ready.push(cls, key, order, job):
            for w in self.workers.values():
                if w.serves(cls):
                    w.classes[cls] = None
        self.n_queued += 1

    def _stop_waiting(self, job: Job) -> None:
        """A waiting job leaves its queue or timer other than by being assigned (its entry stays, skipped)."""
        if job.state == QUEUED:
            self.n_queued -= 1
            if job.retry_at is None:
                cls = job.class_key
                if self.ready.taken(cls):
                    self._class_gone(cls)
            job.retry_at = None
        elif job.state == LIMITED:
            self._left_limited(job)
        elif job.state == SCHEDULED:
            self.n_scheduled -= 1
        elif job.state == WAITING:
            self.n_waiting -= 1

    def _left_limited(self, job: Job) -> None:
        keys = job.opts.limit_keys
        self.waiting.taken((job.class_key, keys))
        for k in keys:
            state = self.limits.keys.get(k)
            if state is not None and state.waiting > 0:
                state.waiting -= 1

    def _class_gone(self, cls: ClassKey) -> None:
        for w in self.workers.values():
            w.classes.pop(cls, None)

    def _pop_for(self, w: WorkerInfo, n: int, now: float) -> list[Job]:
        """Up to n jobs for this worker, best first across every class it serves; jobs under limit keys
        only into its free slots, and only while their keys allow a start now. A job with an expiry, too,
        goes only into a free slot (assignment is start: it never waits in a window past its expiry), and
        nothing of its class is prefetched past it (that would run a lesser job first)."""
        heads: list[tuple[float, int, int, Any]] = []  # (key, order, 0 ready / 1 limited, class)
        counts = self.ready.counts
        for cls in w.classes:
            if counts[cls]:
                head = self.ready.by_class[cls].head()
                if head is not None:
                    heads.append((head[0], head[1], 0, cls))
        free_slots = w.concurrency - len(w.running)
        if free_slots > 0 and self.waiting.total:
            for lcls, q in self.waiting.by_class.items():
                if w.serves(lcls[0]) and self.limits.allows(lcls[1], now):
                    head = q.head()
                    if head is not None:
                        heads.append((head[0], head[1], 1, lcls))
        heapq.heapify(heads)
        out: list[Job] = []
        while heads and len(out) < n:
            _, _, limited, cls = heapq.heappop(heads)
            if limited:
                if free_slots <= 0 or not self.limits.allows(cls[1], now):
                    continue
                q = self.waiting.by_class[cls]
                job = q.pop()
                self._left_limited(job)
                self.limits.start(cls[1], now)
                self.counts["limited_starts"] += 1
                free_slots -= 1
                nxt = q.head() if cls in self.waiting.by_class else None
                if nxt is not None and free_slots > 0 and self.limits.allows(cls[1], now):
                    heapq.heappush(heads, (nxt[0], nxt[1], 1, cls))
            else:
                q = self.ready.by_class[cls]
                if free_slots <= 0:
                    head = q.head()
                    if head is not None and head[2].expires is not None:
                        continue  # no free slot for it: its class is done for this worker this time
                job = q.pop()
                free_slots -= 1
                self.n_queued -= 1
                gone = self.ready.taken(cls)
                if gone:
                    self._class_gone(cls)
                else:
                    nxt = q.head()
                    if nxt is not None:
                        heapq.heappush(heads, (nxt[0], nxt[1], 0, cls))
            # Taken now, not when the caller marks it: a job can have a second, stale entry further down
            # (removal is lazy: adopted from a READY, then queued again), which must not be taken twice.
            job.state = RUNNING
            out.append(job)
        return out

    def _next_limited_start(self, now: float) -> float | None:
        """When a rate key next lets some waiting job start (None: only an ending attempt can)."""
        best: float | None = None
        for (_, keys), q in self.waiting.by_class.items():
            if q.head() is None:
                continue
            at = self.limits.next_allowed(keys, now)
            if at is not None and at > now and (best is None or at < best):
                best = at
        return best

    def _observe_duration(self, w: WorkerInfo, duration: Any) -> None:
        """Fold one task's run time into the worker's average and resize its prefetch window."""
        if not isinstance(duration, int | float) or not 0 <= duration < math.inf:  # NaN fails both
            return
        mean = w.mean_duration
        mean = float(duration) if mean is None else mean + DURATION_WEIGHT * (duration - mean)
        w.mean_duration = mean
        window = w.prefetch if mean <= 0 else min(w.prefetch, int(w.concurrency * PREFETCH_HORIZON / mean))
        if window != w.window:
            w.credit = max(0, w.credit + window - w.window)  # _return_credit clamps it to the new capacity
            w.window = window

    def _return_credit(self, w: WorkerInfo) -> None:
        if w.draining:
            return
        # Never more credit than slots not taken by assignments we track (a duplicate or stray outcome
        # must not let the worker be assigned beyond its concurrency).
        w.credit = max(0, min(w.credit + 1, w.capacity - len(w.running)))
        if w.credit and w.id not in self._free:
            self._free[w.id] = None

    def _release(self, job: Job) -> None:
        """A running job stops running on its worker (its limit keys' concurrency comes back)."""
        self.n_running -= 1
        if job.worker is not None:
            w = self.workers.get(job.worker)
            if w is not None:
                w.running.pop(job.id, None)
        job.worker = None
        keys = job.opts.limit_keys
        if keys:
            self.limits.end(keys)

    def _record_attempt(self, job: Job, attempt: int, wid: bytes, error: dict[str, Any] | None, now: float) -> None:
        for entry in reversed(job.history):
            if entry["attempt"] == attempt:
                entry["finished"] = now
                if error is not None:
                    entry["error"] = perr.describe(error)
                return

    def _failed_attempt(
        self, job: Job, info: dict[str, Any], frames: list[Any], now: float, retryable: bool
    ) -> None:
        kind = info.get("kind")
        if kind in perr.INFRASTRUCTURE_KINDS:
            job.infra_failures += 1
            retry = job.infra_failures <= max(self.infra_retries, job.opts.retries)
            delay = 0.0
        else:
            job.failures += 1
            retry = retryable and job.failures <= job.opts.retries
            # The exponent is capped: 2 ** 1024 no longer converts to a float (OverflowError).
            exponent = min(job.failures - 1, 64)
            delay = job.opts.retry_backoff * (2.0**exponent) * self.rng.uniform(0.5, 1.5)
        if not retry:
            self._finish(job, FAILED, info, frames, now)
            return
        self.counts["retried"] += 1
        delay = min(delay, MAX_BACKOFF)
        if not delay > 0:  # also NaN: a NaN deadline at the heap's top would stall every retry
            self._enqueue(job, now)
            return
        job.state = QUEUED
        job.retry_at = now + delay
        self.n_queued += 1
        heapq.heappush(self._delayed, (job.retry_at, job.seq, job.id))

    def _finish(self, job: Job, state: str, info: dict[str, Any], frames: list[Any], now: float) -> None:
        self._now = max(self._now, now)
        job.state = state
        job.finished_at = now
        if job.frames is not OFFLOADED:
            self.held_bytes -= _nbytes(job.frames or ())
        job.frames = None  # the call's data is no longer needed
        job.result_info = info
        job.result_frames = frames
        self.counts[state] += 1
        self._finished.append(job.id)
        self._finished_log.append(job)
        node = job.node
        # A large result its dependants use stays here: the client fetches it only if it asks (WATCH).
        withhold = node is not None and node.pins > 0 and _nbytes(frames) >= WITHHOLD_BYTES
        if job.owner is not None:
            self.deliveries.add(job.owner, job, withhold)
        if job.watchers:
            for client in job.watchers:
                if client != job.owner:
                    self.deliveries.add(client, job, withhold)
            job.watchers = None
        if node is not None:
            self._settling.append(job)
            if not self._propagating:  # a worklist, not recursion: a chain of 10,000 fails in one turn
                self._propagating = True
                try:
                    while self._settling:
                        self._settled(self._settling.popleft(), now)
                finally:
                    self._propagating = False

    def _settled(self, job: Job, now: float) -> None:
        """A job of a graph ended: its parents may let go of their results, its dependants move on."""
        node = job.node
        assert node is not None
        self._unpin_parents(job)
        good = job.state == SUCCEEDED
        for child_id in node.children:
            child = self.jobs.get(child_id)
            if child is None or child.state != WAITING or child.node is None:
                continue  # ended meanwhile (another parent failed, or it was cancelled)
            if good or job.id in child.node.allow_failure:
                if good and child.node.early is not None:
                    child.node.parent_result(job.id, job.result_frames)
                child.node.waiting -= 1
                if not child.node.waiting:
                    self.n_waiting -= 1
                    self._runnable(child, now)
            else:
                self.n_waiting -= 1
                self._blocked_by(child, job, now)

    def _blocked_by(self, job: Job, parent: Job, now: float) -> None:
        """A parent ended badly: the job ends too, blaming the job whose failure started the chain."""
        info = parent.result_info
        if info.get("kind") in (perr.DEPENDENCY_FAILED, perr.DEPENDENCY_CANCELLED):
            root, root_fn, root_error = info.get("root"), info.get("root_fn"), info.get("root_error")
        else:
            root, root_fn, root_error = parent.id, parent.opts.fn, info
        assert job.node is not None
        job.node.root = str(root)
        if parent.state == FAILED:
            out = perr.error_info(perr.DEPENDENCY_FAILED, "DependencyFailed",
                                  f"job {root} ({root_fn}) failed: {perr.describe(root_error or {})}")
            out.update(root=root, root_fn=root_fn, root_error=root_error)
            # The root's error frames (its pickled exception, passed on by every dependant in the chain):
            # the client rebuilds the root's own exception type as the cause. Shared, not copied.
            frames = list(parent.result_frames or ())
            self._finish(job, FAILED, out, frames if _nbytes(frames) <= ROOT_ERROR_BYTES else [], now)
        else:
            what = "expired" if parent.state == EXPIRED or info.get("cause") == EXPIRED else "was cancelled"
            out = perr.error_info(perr.DEPENDENCY_CANCELLED, "DependencyCancelled", f"job {root} {what}")
            out.update(root=root, root_fn=root_fn, cause=EXPIRED if what == "expired" else CANCELLED)
            self._finish(job, CANCELLED, out, [], now)

    def _unpin_parents(self, job: Job) -> None:
        """The job has run (or never will): its parents' results are no longer held for it."""
        assert job.node is not None
        job.node.drop_early()
        for parent_id in job.node.parents:
            parent = self.jobs.get(parent_id)
            if parent is None or parent.node is None or not parent.node.pins:
                continue
            parent.node.pins -= 1
            if not parent.node.pins and parent.state in FINISHED_STATES:
                expired = parent.finished_at is not None and self._now - parent.finished_at >= self.result_ttl
                if expired or (parent.delivered and not parent.unacked and not parent.opts.keep):
                    del self.jobs[parent.id]
                    self._forgotten_log.append(parent.id)

    def _deliver_to(self, client: bytes, job: Job) -> None:
        self.deliveries.add(client, job)

    def _drop_worker(self, wid: bytes, keep: dict[str, int], now: float) -> None:
        """Forget a worker; what it held, but for `keep`, fails as lost (and is retried)."""
        w = self.workers.pop(wid)
        self._free.pop(wid, None)
        for job_id, attempt in list(w.running.items()):
            if keep.get(job_id) == attempt:
                continue
            job = self.jobs.get(job_id)
            if job is None or job.state != RUNNING or job.worker != wid or job.attempt != attempt:
                continue
            self._release(job)
            info = perr.error_info(perr.LOST, "WorkerLost", f"worker {w.name} on {w.host} stopped answering")
            self._record_attempt(job, attempt, wid, info, now)
            self._failed_attempt(job, info, [], now, retryable=True)


def _ever_started(job: Job) -> bool:
    """Whether some attempt of the job was assigned and not handed back unstarted."""
    return any(not entry.get("handed_back") for entry in job.history)


def _history(job: Job) -> list[dict[str, Any]]:
    """The job's attempt records, as a list of its own (a job that never ran shares one empty list)."""
    if job.history is NO_HISTORY:
        job.history = []
    return job.history


def _nbytes(frames: Iterable[Any]) -> int:
    return sum(map(len, frames))  # bytes or zmq.Frame: len is the size in bytes


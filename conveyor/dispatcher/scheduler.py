"""The dispatcher's scheduling state machine: jobs, queues, workers, assignments. No I/O.

Events come in as method calls (submit, worker_ready, results, worker_lost, cancel, tick...),
each taking the current time as an argument. What must go out on the wire accumulates in
`outbox` as plain action objects, which the socket loop drains after each batch of events.
This keeps every scheduling rule testable without sockets or clocks.

Rules worth knowing before reading:
- Credit: a worker announces free slots; it is never assigned more jobs than it has credit, and
  each outcome or hand-back it sends returns one credit.
- Fencing: every assignment has an attempt number. An outcome counts only if it is for the
  job's current attempt on the worker holding it; a late *success* from a worker that lost the job
  still finishes an unfinished job (once), never a finished one.
- Prefetch: a worker may hold jobs beyond its slots (its window). With `prefetch_auto` the window
  is what keeps its slots busy for PREFETCH_HORIZON given its recent task durations, up to its
  `prefetch`: tiny tasks never wait a round trip, and a slow task has no job queued behind it.
- Retries: infrastructure failures (crash, lost worker) retry up to `infra_retries`, or the task's
  `retries` if higher; a task's own failure retries up to its `retries` when the worker marked it
  retryable (`retry_on`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable
from typing import Any

from conveyor.dispatcher.deliveries import Deliveries
from conveyor.dispatcher.model import (
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
    ClassKey,
    Deliver,
    Job,
    Resend,
    WorkerInfo,
)
from conveyor.protocol import failures as perr
from conveyor.protocol.commands import TaskOptions

PREFETCH_HORIZON = 0.002  # seconds of work a worker may hold beyond its slots (auto prefetch)
DURATION_WEIGHT = 0.2  # weight of the newest task in a worker's moving average of durations

__all__ = [
    "CANCELLED",
    "FAILED",
    "FINISHED_STATES",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
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


class Scheduler:
    def __init__(
        self,
        *,
        infra_retries: int = 3,
        liveness: float = 3.0,
        result_ttl: float = 3600.0,
        rng: random.Random | None = None,
    ):
        self.infra_retries = infra_retries
        self.liveness = liveness  # seconds of silence after which a worker is lost
        self.result_ttl = result_ttl
        self.rng = rng or random.Random()
        self.jobs: dict[str, Job] = {}  # every job not yet forgotten
        self.workers: dict[bytes, WorkerInfo] = {}
        self._free: dict[bytes, None] = {}  # workers with credit, least recently assigned first
        self._queues: dict[ClassKey, deque[Job]] = {}
        self._queued_by_class: _Counts = _Counts()  # queued jobs per class (absent: 0)
        self._delayed: list[tuple[float, int, str]] = []  # (ready_at, seq, job id) heap of retries
        self._finished: deque[str] = deque()  # finished job ids in finishing order, for expiry
        self._seq = 0
        self.n_queued = 0
        self.n_running = 0
        self.counts = {
            SUCCEEDED: 0, FAILED: 0, CANCELLED: 0, "retried": 0, "submitted": 0, "fenced": 0, "refused": 0,
        }
        self.held_bytes = 0  # bytes of call frames held for unfinished jobs (--max-queued-bytes bounds it)
        # What changed this turn, for the journal: jobs that finished and ids that were dropped.
        self._finished_log: list[Job] = []
        self._forgotten_log: list[str] = []
        self.outbox: list[Action] = []
        self.deliveries = Deliveries(self._forget)  # outcomes on their way to clients, until acknowledged

    # --- clients ------------------------------------------------------------------------------

    def submit(self, job_id: str, opts: TaskOptions, frames: list[Any], owner: bytes | None, now: float) -> Job:
        """Accept a job; a job id seen before is not queued twice (a client re-sending after a restart)."""
        existing = self.jobs.get(job_id)
        if existing is not None:
            if owner is not None:
                existing.owner = owner
                if existing.state in FINISHED_STATES:
                    self._deliver_to(owner, existing)
            return existing
        self._seq += 1
        job = Job(job_id, opts, frames, owner, self._seq, now)
        self.jobs[job_id] = job
        self.counts["submitted"] += 1
        self.held_bytes += _nbytes(frames)
        self._enqueue(job)
        return job

    def refuse(self, job_id: str) -> bool:
        """Take back a job just submitted that no worker has taken (it could not be made durable); False
        if it is gone, or has started: then it stays."""
        job = self.jobs.get(job_id)
        if job is None or job.state != QUEUED or job.attempt or job.retry_at is not None:
            return False
        self._leave_queue(job)
        job.state = CANCELLED  # its queue entry is skipped from now on
        del self.jobs[job_id]
        self.held_bytes -= _nbytes(job.frames or ())
        job.frames = None
        self.counts["submitted"] -= 1
        self.counts["refused"] += 1
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
        if job.state == RUNNING and job.worker is not None:
            self.outbox.append(CancelRunning(job.worker, job.id, job.attempt))
            self._release(job)
        elif job.state == QUEUED:
            self._leave_queue(job)
        info = perr.error_info(perr.CANCELLED, "JobCancelled", "the job was cancelled")
        self._finish(job, CANCELLED, info, [], now)
        return True

    def forget(self, job_id: str) -> None:
        """Drop a finished job whose result was delivered and need not be kept."""
        job = self.jobs.get(job_id)
        if job is not None:
            self._forget(job)

    def _forget(self, job: Job) -> None:
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
        w.classes = {k: None for k in self._queues if w.serves(k)}
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
            elif job.state == QUEUED and job.retry_at is None and attempt >= job.attempt:
                # Queued again (we lost the worker, or restarted from the journal) while it kept running
                # the job: adopt that attempt rather than run the job a second time.
                self._leave_queue(job)
                job.state = RUNNING
                job.attempt = attempt
                job.worker = wid
                w.running[job_id] = attempt
                self.n_running += 1
                job.history.append({"attempt": attempt, "worker": w.name, "started": now})
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
                elif job.state == QUEUED:
                    self._leave_queue(job)
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
        self._enqueue(job, front=True)

    # --- time and assignment --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Move retries whose backoff has passed back into their queues; expire old results."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job_id = heapq.heappop(self._delayed)
            job = self.jobs.get(job_id)
            if job is not None and job.state == QUEUED and job.retry_at is not None:
                job.retry_at = None
                self.n_queued -= 1  # _enqueue counts it again
                self._enqueue(job)
        while self._finished:
            job = self.jobs.get(self._finished[0])
            if job is not None and job.finished_at is not None and now - job.finished_at < self.result_ttl:
                break
            self._finished.popleft()
            if job is not None and job.state in FINISHED_STATES:
                del self.jobs[job.id]
                self._forgotten_log.append(job.id)

    def next_timer(self) -> float | None:
        return self._delayed[0][0] if self._delayed else None

    def schedule(self, now: float) -> None:
        """Hand queued jobs to workers with credit, spreading them over the free workers.

        Passes repeat until no free worker can take another job, so no job stays queued while a
        worker able to serve it has credit; each worker gets at most one Assign per call."""
        if not self.n_queued or not self._free:
            return
        assigned: dict[bytes, list[Job]] = {}
        candidates = list(self._free)
        while candidates and self.n_queued:
            still: list[bytes] = []
            for wid in candidates:
                if not self.n_queued:
                    break
                w = self.workers[wid]
                if w.window > 3 and len(w.running) >= w.concurrency and w.credit < w.window // 4:
                    # Its slots are all taken and only a sliver of its window is free: wait for more
                    # outcomes rather than send a message per job (the "silly window" of TCP).
                    continue
                share = max(1, self.n_queued // len(candidates))
                jobs = self._pop_for(w, min(w.credit, share))
                if not jobs:
                    continue  # nothing queued that it serves: queues only shrink during this call
                for job in jobs:  # already RUNNING (_pop_for)
                    job.attempt += 1
                    job.worker = wid
                    w.running[job.id] = job.attempt
                    job.history.append({"attempt": job.attempt, "worker": w.name, "started": now})
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
        view: dict[str, Any] = {
            "id": job.id,
            "state": job.state,
            "fn": job.opts.fn,
            "attempts": job.attempt,
            "worker": job.history[-1]["worker"] if job.history else None,
            "history": job.history,
            "submitted_at": job.submitted_at,
            "finished_at": job.finished_at,
        }
        if job.state == QUEUED and job.retry_at is not None:
            view["retry_at"] = job.retry_at
        if job.state in (FAILED, CANCELLED):
            view["error"] = job.result_info
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
                "done": w.done,
                "draining": w.draining,
                "last_seen_ago": round(now - w.last_seen, 3),
            }
            for w in self.workers.values()
        ]
        by_class = [
            {"mode": mode, "tags": sorted(tags), "queued": n}
            for (mode, tags), n in self._queued_by_class.items()
            if n
        ]
        return {
            "workers": workers,
            "queued": self.n_queued,
            "running": self.n_running,
            "delayed": len(self._delayed),
            "queues": by_class,
            "totals": dict(self.counts),
        }

    # --- internals ----------------------------------------------------------------------------

    def _enqueue(self, job: Job, front: bool = False) -> None:
        job.state = QUEUED
        job.worker = None
        key = job.class_key
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._queued_by_class[key] = 0
            for w in self.workers.values():
                if w.serves(key):
                    w.classes[key] = None
        if front:
            q.appendleft(job)
        else:
            q.append(job)
        self._queued_by_class[key] += 1
        self.n_queued += 1

    def _leave_queue(self, job: Job) -> None:
        """A queued job stops being queued other than by being popped (lazy removal from the deque)."""
        self.n_queued -= 1
        if job.retry_at is None:
            key = job.class_key
            self._queued_by_class[key] -= 1
            if not self._queued_by_class[key]:
                self._prune(key)
        job.retry_at = None

    def _prune(self, key: ClassKey) -> None:
        """A queue class with nothing queued goes (per-job tags would otherwise grow memory and the cost of
        every assignment forever); its stale entries go with it. It comes back with its next job."""
        del self._queues[key]
        del self._queued_by_class[key]
        for w in self.workers.values():
            w.classes.pop(key, None)

    def _pop_for(self, w: WorkerInfo, n: int) -> list[Job]:
        out: list[Job] = []
        classes = [k for k in w.classes if self._queued_by_class[k]]
        while len(out) < n and classes:
            best: deque[Job] | None = None
            best_key: ClassKey | None = None
            for key in classes:
                q = self._queues[key]
                while q and (q[0].state != QUEUED or q[0].retry_at is not None):
                    q.popleft()  # cancelled or finished while queued
                if q and (best is None or q[0].seq < best[0].seq):
                    best, best_key = q, key
            if best is None or best_key is None:
                break
            job = best.popleft()
            # Taken now, not when the caller marks it: a job can have a second, stale entry further down
            # (removal is lazy: adopted from a READY, then queued again), which must not be taken twice.
            job.state = RUNNING
            out.append(job)
            self.n_queued -= 1
            self._queued_by_class[best_key] -= 1
            if not self._queued_by_class[best_key]:
                classes.remove(best_key)
                self._prune(best_key)
        return out

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
        """A running job stops running on its worker."""
        self.n_running -= 1
        if job.worker is not None:
            w = self.workers.get(job.worker)
            if w is not None:
                w.running.pop(job.id, None)
        job.worker = None

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
            self._enqueue(job)
            return
        job.state = QUEUED
        job.retry_at = now + delay
        self.n_queued += 1
        heapq.heappush(self._delayed, (job.retry_at, job.seq, job.id))

    def _finish(self, job: Job, state: str, info: dict[str, Any], frames: list[Any], now: float) -> None:
        job.state = state
        job.finished_at = now
        self.held_bytes -= _nbytes(job.frames or ())
        job.frames = None  # the call's data is no longer needed
        job.result_info = info
        job.result_frames = frames
        self.counts[state] += 1
        self._finished.append(job.id)
        self._finished_log.append(job)
        if job.owner is not None:
            self._deliver_to(job.owner, job)
        if job.watchers:
            for client in job.watchers:
                if client != job.owner:
                    self._deliver_to(client, job)
            job.watchers = None

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


class _Counts(dict[ClassKey, int]):
    """Counts by key; a key not present counts 0 (reading it adds nothing)."""

    def __missing__(self, key: ClassKey) -> int:
        return 0


def _nbytes(frames: Iterable[Any]) -> int:
    return sum(len(f) if type(f) is bytes else memoryview(f).nbytes for f in frames)

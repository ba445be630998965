"""What the dispatcher knows about the cluster beyond scheduling: task output and progress, recent jobs,
throughput over time, per-function statistics, and the snapshots the dashboard and the metrics read.

Everything here runs on the dispatcher's loop thread, except `ask()` and the reading of `snapshot`.
The loop feeds it cheaply: `turn()` once per loop turn with the jobs that finished (a list extend),
`tick()` once per loop turn (a comparison; the real work runs once a second). Once a second the loop
folds the finished jobs into the statistics and, when a dashboard or a metrics endpoint is on,
publishes an immutable snapshot that HTTP threads read without touching scheduler state. Requests
that need scheduler state (a job's details and output, a job listing) are queued by the HTTP threads
with `ask()` and answered by the loop on its next turn.

Memory is bounded: each stream of a job's output keeps its last `output_limit` characters, all
outputs together at most `output_budget` characters (the oldest finished jobs' output goes first),
`history` summaries of finished jobs, `failures` failure records, `series_seconds` points of throughput.

The Observer (commands, queries, requests, snapshots) is here; it keeps task output in an `OutputStore`
(outputs.py) and statistics in `JobStats` and `ThroughputSeries` (stats.py).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from conveyor.dispatcher.model import WAITING_STATES, wall_clock_view
from conveyor.dispatcher.observe.outputs import OUTPUT_BUDGET, OUTPUT_LIMIT, OutputStore
from conveyor.dispatcher.observe.stats import (
    FAILURE_OUTPUT,
    FAILURES,
    HISTORY,
    JOURNAL_BUCKETS,
    SERIES_SECONDS,
    Histogram,
    JobStats,
    ThroughputSeries,
    summary_dict,
)
from conveyor.dispatcher.scheduler import FAILED, FINISHED_STATES, RUNNING, Job, Scheduler
from conveyor.protocol import Cmd
from conveyor.protocol.commands import JobsQuery, JobsReply, LogsQuery, OutputEntry, ProgressEntry

Send = Callable[[bytes, Cmd, Any], bool]  # the dispatcher's send: peer, command, body

JOBS_LIMIT = 5000  # most jobs one JOBS reply lists
SCAN_BUDGET = 200_000  # most held jobs one listing looks at (the loop thread answers it): then truncated


class Observer:
    def __init__(
        self,
        scheduler: Scheduler,
        send: Send,
        wake: Callable[[], None],
        about: Callable[[], dict[str, Any]],
        *,
        output_limit: int = OUTPUT_LIMIT,
        output_budget: int = OUTPUT_BUDGET,
        history: int = HISTORY,
        failures: int = FAILURES,
        series_seconds: int = SERIES_SECONDS,
        interval: float = 1.0,
    ):
        self.scheduler = scheduler
        self._send = send  # replies to JOBS and LOGS
        self._wake = wake  # wakes the loop from another thread (ask)
        self._about = about  # the dispatcher's identity and counters: {instance, endpoint, pid, malformed, ...}
        self.interval = interval
        self.outputs = OutputStore(output_limit, output_budget)  # by job id, while the dispatcher holds the job
        self.progress: dict[str, tuple[int, float | None, str | None, float]] = {}  # job -> (attempt, f, msg, at)
        self.stats = JobStats(history=history, failures=failures)  # folded from finished jobs once a second
        self.heartbeat_misses = 0
        self.journal = Histogram(JOURNAL_BUCKETS)
        self._journal_commits = 0
        self.series = ThroughputSeries(series_seconds)
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.next_tick = 0.0
        # Published for other threads: an immutable snapshot, replaced whole once a second.
        self.publish = False
        self.snapshot: dict[str, Any] | None = None
        self.version = 0
        self.changed = threading.Condition()
        self._requests: queue.SimpleQueue[tuple[str, dict[str, Any], Future[Any]]] = queue.SimpleQueue()
        self._asked = False

    # --- hooks the dispatcher loop calls -----------------------------------------------------------

    def turn(self, finished: list[Job], forgotten: list[str]) -> None:
        """Once per loop turn, with the jobs that finished and the ids that were dropped in it."""
        if finished:
            self.stats.finished.extend(finished)
            if self.progress:
                for job in finished:
                    self.progress.pop(job.id, None)
            if self.outputs:
                for job in finished:
                    out = self.outputs.finished(job.id)
                    if out is not None and job.state == FAILED:
                        self.stats.failure_output[job.id] = out.texts(FAILURE_OUTPUT)
                self.outputs.evict()
        if forgotten and self.outputs:
            for job_id in forgotten:
                self.outputs.drop(job_id)

    def tick(self, now: float) -> None:
        """Once per loop turn: answer queued requests; once a second, fold statistics and publish."""
        if self._asked:
            self._serve_requests(now)
        if now < self.next_tick:
            return
        self.next_tick = now + self.interval
        self.stats.fold(now)
        self.series.sample(self.scheduler, now)
        if self.publish:
            self._publish(now)

    @property
    def submits(self) -> dict[str, int]:
        """Jobs submitted since the last fold, by function: the loop counts into it on SUBMIT."""
        return self.stats.submits

    def heartbeat_missed(self) -> None:
        self.heartbeat_misses += 1

    def journal_committed(self, commits: int, seconds: float) -> None:
        if commits != self._journal_commits:
            self._journal_commits = commits
            self.journal.observe(seconds)

    def decorate_status(self, status: dict[str, Any], now: float) -> dict[str, Any]:
        """Add what STATUS_REPLY carries beyond the scheduler's view: throughput, slots, uptime."""
        busy = total = 0
        for w in status["workers"]:
            busy += w["running"]
            total += w["concurrency"]
        status["slots"] = {"busy": busy, "total": total}
        status["throughput"] = self.throughput()
        status["uptime"] = round(now - self.started, 3)
        status["started_at"] = self.started_wall
        return status

    def decorate_view(self, view: dict[str, Any], now: float) -> dict[str, Any]:
        """Add a job's progress and output to its JOB_INFO view."""
        job_id = view["id"]
        p = self.progress.get(job_id)
        if p is not None and view["state"] == RUNNING:
            view["progress"] = {"fraction": p[1], "message": p[2], "updated_ago": round(now - p[3], 3)}
        out = self.outputs.texts(job_id)
        if out is not None:
            view["output"] = out
        return view

    def output_of(self, job_id: str) -> dict[str, str] | None:
        return self.outputs.texts(job_id)

    # --- worker commands -----------------------------------------------------------------------------

    def _current(self, peer: bytes, job_id: str, attempt: int) -> Job | None:
        job = self.scheduler.jobs.get(job_id)
        if job is None or job.state != RUNNING or job.worker != peer or job.attempt != attempt:
            return None  # a report of an attempt that no longer counts
        return job

    def on_progress(self, peer: bytes, entries: list[ProgressEntry], frames: list[Any], now: float) -> None:
        """PROGRESS: keep each running job's latest report."""
        if not self.scheduler.heard_from(peer, now):
            return
        for e in entries:
            if self._current(peer, e.job_id, e.attempt) is None:
                continue
            message = None if e.message is None else e.message[:1000]
            self.progress[e.job_id] = (e.attempt, e.fraction, message, now)

    def on_output(self, peer: bytes, entries: list[OutputEntry], frames: list[Any], now: float) -> None:
        """OUTPUT: append to each running job's streams (their tails)."""
        if not self.scheduler.heard_from(peer, now):
            return
        for e in entries:
            if e.stream not in ("stdout", "stderr", "log") or self._current(peer, e.job_id, e.attempt) is None:
                continue
            self.outputs.write(e.job_id, e.attempt, e.stream, e.text)
        self.outputs.evict()

    # --- client commands -----------------------------------------------------------------------------

    def on_jobs(self, peer: bytes, q: JobsQuery, frames: list[Any], now: float) -> None:
        """JOBS: a listing of recent jobs."""
        jobs, truncated = self.list_jobs(q.states, q.since, q.fn, q.limit or 100, now)
        self._send(peer, Cmd.JOBS_REPLY, JobsReply(jobs=jobs, truncated=truncated, req=q.req))

    def on_logs(self, peer: bytes, q: LogsQuery, frames: list[Any], now: float) -> None:
        """LOGS: a job's output from the given offsets on."""
        reply = self.logs(q.id, q.offsets, now)
        reply["req"] = q.req
        self._send(peer, Cmd.LOGS_REPLY, reply)

    # --- queries (loop thread) -----------------------------------------------------------------------

    def list_jobs(
        self, states: Iterable[str] | None, since: float | None, fn: str | None, limit: int, now: float
    ) -> tuple[list[dict[str, Any]], bool]:
        """Jobs, by group: running, then not started (waiting for parents, scheduled, limited, queued;
        oldest first), then recently finished (newest first)."""
        self.stats.fold(now)
        limit = max(1, min(limit, JOBS_LIMIT))
        wanted = set(states) if states is not None else {*WAITING_STATES, RUNNING, *FINISHED_STATES}
        offset = time.time() - now  # monotonic -> wall clock
        cutoff = None if since is None else now - float(since)
        out: list[dict[str, Any]] = []

        def full() -> bool:
            return len(out) > limit

        jobs = self.scheduler.jobs
        if RUNNING in wanted:
            for w in list(self.scheduler.workers.values()):
                for job_id in w.running:
                    job = jobs.get(job_id)
                    if job is None or job.state != RUNNING or (fn is not None and job.opts.fn != fn):
                        continue
                    if cutoff is not None and job.submitted_at < cutoff:
                        continue
                    out.append(self._live_summary(job, offset, now))
                    if full():
                        break
                if full():
                    break
        over_budget = False
        waiting = wanted & WAITING_STATES
        if waiting and not full():
            for scanned, job in enumerate(jobs.values()):  # insertion order: oldest first
                if scanned >= SCAN_BUDGET:  # a filter that matches nothing must not walk a million jobs
                    over_budget = True
                    break
                if job.state not in waiting or (fn is not None and job.opts.fn != fn):
                    continue
                if cutoff is not None and job.submitted_at < cutoff:
                    continue
                out.append(self._live_summary(job, offset, now))
                if full():
                    break
        finished = wanted & FINISHED_STATES
        if finished and not full():
            wall_cutoff = None if cutoff is None else cutoff + offset
            for s in reversed(self.stats.recent):
                if s[2] not in finished or (fn is not None and s[1] != fn):
                    continue
                if wall_cutoff is not None and s[7] < wall_cutoff:
                    break  # newest first: everything after this is older
                out.append(summary_dict(s))
                if full():
                    break
        truncated = len(out) > limit or over_budget
        return out[:limit], truncated

    def _live_summary(self, job: Job, offset: float, now: float) -> dict[str, Any]:
        started = job.history[-1]["started"] + offset if job.state == RUNNING and job.history else None
        d: dict[str, Any] = {
            "id": job.id,
            "fn": job.opts.fn,
            "state": job.state,
            "worker": job.history[-1]["worker"] if job.history and job.state == RUNNING else None,
            "attempts": job.attempt,
            "submitted_at": job.submitted_at + offset,
            "started_at": started,
            "finished_at": None,
            "duration": None if started is None else round(now + offset - started, 6),
            "error": None,
        }
        p = self.progress.get(job.id)
        if p is not None and job.state == RUNNING:
            d["progress"] = {"fraction": p[1], "message": p[2]}
        if job.opts.priority:
            d["priority"] = job.opts.priority
        if job.due is not None and job.state != RUNNING:
            d["due_at"] = job.due + offset
        if job.expires is not None and job.state != RUNNING:
            d["expires_at"] = job.expires + offset
        if job.opts.limit_keys and job.state != RUNNING:
            d["limits"] = list(job.opts.limit_keys)
        if job.node is not None and job.node.all_parents:
            d["parents"] = list(job.node.all_parents)
        return d

    def logs(self, job_id: str, offsets: dict[str, Any], now: float) -> dict[str, Any]:
        job = self.scheduler.jobs.get(job_id)
        state: str | None = job.state if job is not None else None
        if state is None:
            self.stats.fold(now)
            for s in reversed(self.stats.recent):
                if s[0] == job_id:
                    state = s[2]
                    break
        streams = self.outputs.since(job_id, offsets)
        reply: dict[str, Any] = {
            "id": job_id,
            "state": state,
            "attempt": job.attempt if job is not None else None,
            "streams": streams,
        }
        p = self.progress.get(job_id)
        if p is not None and state == RUNNING:
            reply["progress"] = {"fraction": p[1], "message": p[2], "updated_ago": round(now - p[3], 3)}
        return reply

    def job_details(self, job_id: str, now: float) -> dict[str, Any] | None:
        """Everything known about one job: its view, progress and output, or what the history kept."""
        job = self.scheduler.jobs.get(job_id)
        offset = time.time() - now
        if job is not None:
            view = self.decorate_view(wall_clock_view(self.scheduler.job_view(job), offset), now)
            view["held"] = True
            return view
        self.stats.fold(now)
        for f in reversed(self.stats.failures):
            if f["id"] == job_id:
                return {**f, "state": FAILED, "held": False}
        for s in reversed(self.stats.recent):
            if s[0] == job_id:
                return {**summary_dict(s), "held": False}
        return None

    # --- requests from other threads (the dashboard) ---------------------------------------------

    def ask(self, kind: str, **args: Any) -> Future[Any]:
        """Queue a query for the loop thread (thread-safe); the future resolves on its next turn."""
        fut: Future[Any] = Future()
        self._requests.put((kind, args, fut))
        self._asked = True
        self._wake()
        return fut

    def _serve_requests(self, now: float) -> None:
        self._asked = False
        while True:
            try:
                kind, args, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if kind == "job":
                    fut.set_result(self.job_details(str(args["id"]), now))
                elif kind == "jobs":
                    states, since, fn = args.get("states"), args.get("since"), args.get("fn")
                    fut.set_result(self.list_jobs(states, since, fn, args.get("limit", 100), now))
                elif kind == "logs":
                    fut.set_result(self.logs(str(args["id"]), args.get("offsets") or {}, now))
                else:
                    fut.set_exception(ValueError(f"unknown request {kind!r}"))
            except Exception as exc:
                fut.set_exception(exc)

    # --- once a second -------------------------------------------------------------------------------

    def throughput(self) -> dict[str, float]:
        """Jobs finished per second, averaged over the last 10 s and the last 60 s."""
        return self.series.throughput()

    def status(self, now: float) -> dict[str, Any]:
        """What `conveyor status --json` prints (the STATUS_REPLY body without its req)."""
        st = self.scheduler.status(now)
        about = self._about()
        st["dispatcher"] = {"instance": about["instance"], "endpoint": about["endpoint"], "pid": os.getpid()}
        st["journal"] = about.get("journal", {"state": "off"})
        st["connections"] = about.get("connections", {})
        if "pair" in about:  # a standby pair: role, state, epoch, replication
            st["pair"] = about["pair"]
        return self.decorate_status(st, now)

    def _publish(self, now: float) -> None:
        status = self.status(now)
        workers = status["workers"]
        workers.sort(key=lambda w: (-w["running"], w["name"]))
        offset = time.time() - now
        running = []
        for job_id, (attempt, fraction, message, at) in list(self.progress.items())[-100:]:
            job = self.scheduler.jobs.get(job_id)
            if job is None or job.state != RUNNING:
                continue
            running.append(
                {
                    "id": job_id,
                    "fn": job.opts.fn,
                    "worker": job.history[-1]["worker"] if job.history else None,
                    "attempt": attempt,
                    "fraction": fraction,
                    "message": message,
                    "started_at": job.history[-1]["started"] + offset if job.history else None,
                    "updated_at": at + offset,
                }
            )
        snapshot = {
            "version": self.version + 1,
            "time": time.time(),
            "status": status,
            "series": self.series.columns(),
            "failures": list(reversed(self.stats.failures))[:50],
            "recent": [summary_dict(s) for s in list(self.stats.recent)[-50:]][::-1],
            "running_jobs": running,
            "functions": self.stats.export_functions(),
            "heartbeat_misses": self.heartbeat_misses,
            "journal": self.journal.export(),
            "malformed": self._about()["malformed"],
            "output_chars": self.outputs.chars,
            "limits": self.scheduler.limits_view(now),
        }
        with self.changed:
            self.snapshot = snapshot
            self.version += 1
            self.changed.notify_all()

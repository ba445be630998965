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
"""

from __future__ import annotations

import bisect
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from conveyor.dispatcher.scheduler import CANCELLED, FAILED, FINISHED_STATES, QUEUED, RUNNING, SUCCEEDED, Job
from conveyor.protocol import Cmd, Message, ProtocolError
from conveyor.protocol import errors as perr

if TYPE_CHECKING:
    from conveyor.dispatcher.server import Dispatcher

OUTPUT_LIMIT = 64 * 1024  # characters kept per stream of a job (the tail)
OUTPUT_BUDGET = 256 * 1024 * 1024  # characters of output held for all jobs together
HISTORY = 10_000  # summaries of recently finished jobs (`conveyor jobs`)
FAILURES = 100  # failure records with tracebacks (the dashboard)
FAILURE_OUTPUT = 16 * 1024  # characters of each stream kept with a failure record
SERIES_SECONDS = 600  # throughput history: one point per second
MAX_FUNCTIONS = 200  # functions with their own statistics; the rest count as "(other)"
JOBS_LIMIT = 5000  # most jobs one JOBS reply lists
TRACEBACK_CHARS = 16 * 1024

# Histogram buckets (upper bounds, seconds) for task durations and queue waits, and for journal commits.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
JOURNAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf), a sum and a count. Observing is a bisect."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def export(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum, "count": self.count}


class FunctionStats:
    __slots__ = ("cancelled", "duration", "failed", "retried", "submitted", "succeeded", "wait")

    def __init__(self) -> None:
        self.submitted = 0
        self.succeeded = 0
        self.failed = 0
        self.cancelled = 0
        self.retried = 0
        self.duration = Histogram(DURATION_BUCKETS)
        self.wait = Histogram(DURATION_BUCKETS)


class StreamTail:
    """The last `limit` characters of a stream, and how many characters it has had in all (`end`)."""

    __slots__ = ("end", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.end = 0

    def append(self, text: str, limit: int) -> int:
        """Add text; returns the change in characters held."""
        before = self.size
        self.parts.append(text)
        self.size += len(text)
        self.end += len(text)
        if self.size > 2 * limit:  # amortised: one join per `limit` characters at most
            tail = "".join(self.parts)[-limit:]
            self.parts = [tail]
            self.size = len(tail)
        return self.size - before

    def text(self, limit: int) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0][-limit:] if self.parts else ""

    def since(self, offset: int, limit: int) -> tuple[int, str]:
        """(start, text): the characters from `offset` on that are still held; start > offset if some were lost."""
        held = self.text(limit)
        start = self.end - len(held)
        if offset >= self.end:
            return self.end, ""
        if offset <= start:
            return start, held
        return offset, held[offset - start :]


class JobOutput:
    __slots__ = ("attempt", "size", "streams")

    def __init__(self, attempt: int):
        self.attempt = attempt
        self.streams: dict[str, StreamTail] = {}
        self.size = 0

    def texts(self, limit: int) -> dict[str, str]:
        return {name: tail.text(limit) for name, tail in self.streams.items() if tail.end}


def _fn_label(fn: str, known: dict[str, FunctionStats]) -> str:
    if fn in known or len(known) < MAX_FUNCTIONS:
        return fn
    return "(other)"


class Observer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        output_limit: int = OUTPUT_LIMIT,
        output_budget: int = OUTPUT_BUDGET,
        history: int = HISTORY,
        failures: int = FAILURES,
        series_seconds: int = SERIES_SECONDS,
        interval: float = 1.0,
    ):
        self.dispatcher = dispatcher
        self.scheduler = dispatcher.scheduler
        self.output_limit = output_limit
        self.output_budget = output_budget
        self.interval = interval
        self.outputs: dict[str, JobOutput] = {}  # by job id, while the dispatcher holds the job
        self.output_chars = 0
        self._finished_outputs: OrderedDict[str, None] = OrderedDict()  # finished jobs with output, oldest first
        self.progress: dict[str, tuple[int, float | None, str | None, float]] = {}  # job -> (attempt, f, msg, at)
        self.recent: deque[tuple[Any, ...]] = deque(maxlen=history)
        self.failures: deque[dict[str, Any]] = deque(maxlen=failures)
        self._failure_output: dict[str, dict[str, str]] = {}
        self._finished: list[Job] = []  # finished since the last tick, folded in once a second
        self.submits: dict[str, int] = {}  # jobs submitted this second, by function (the loop counts on SUBMIT)
        self.functions: dict[str, FunctionStats] = {}
        self.heartbeat_misses = 0
        self.journal = Histogram(JOURNAL_BUCKETS)
        self._journal_commits = 0
        self.series: deque[tuple[float, ...]] = deque(maxlen=series_seconds)
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.next_tick = 0.0
        self._last_tick: tuple[float, int, int, int] | None = None  # (now, succeeded, failed, cancelled)
        # Published for other threads: an immutable snapshot, replaced whole once a second.
        self.publish = False
        self.snapshot: dict[str, Any] | None = None
        self.version = 0
        self.changed = threading.Condition()
        self._requests: queue.SimpleQueue[tuple[str, dict[str, Any], Future[Any]]] = queue.SimpleQueue()
        self._asked = False
        dispatcher._handlers.update(
            {
                Cmd.PROGRESS: self._on_progress,
                Cmd.OUTPUT: self._on_output,
                Cmd.JOBS: self._on_jobs,
                Cmd.LOGS: self._on_logs,
            }
        )

    # --- hooks the dispatcher loop calls -----------------------------------------------------------

    def turn(self, finished: list[Job], forgotten: list[str]) -> None:
        """Once per loop turn, with the jobs that finished and the ids that were dropped in it."""
        if finished:
            self._finished.extend(finished)
            if self.progress:
                for job in finished:
                    self.progress.pop(job.id, None)
            if self.outputs:
                for job in finished:
                    out = self.outputs.get(job.id)
                    if out is not None:
                        self._finished_outputs[job.id] = None
                        if job.state == FAILED:
                            self._failure_output[job.id] = out.texts(FAILURE_OUTPUT)
                if self.output_chars > self.output_budget:
                    self._evict()
        if forgotten and self.outputs:
            for job_id in forgotten:
                self._drop_output(job_id)

    def tick(self, now: float) -> None:
        """Once per loop turn: answer queued requests; once a second, fold statistics and publish."""
        if self._asked:
            self._serve_requests(now)
        if now < self.next_tick:
            return
        self.next_tick = now + self.interval
        self._fold(now)
        self._sample(now)
        if self.publish:
            self._publish(now)

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
        out = self.outputs.get(job_id)
        if out is not None:
            view["output"] = out.texts(self.output_limit)
        return view

    def output_of(self, job_id: str) -> dict[str, str] | None:
        out = self.outputs.get(job_id)
        return out.texts(self.output_limit) if out is not None else None

    # --- worker commands -----------------------------------------------------------------------------

    def _current(self, peer: bytes, job_id: str, attempt: int) -> Job | None:
        job = self.scheduler.jobs.get(job_id)
        if job is None or job.state != RUNNING or job.worker != peer or job.attempt != attempt:
            return None  # a report of an attempt that no longer counts
        return job

    def _on_progress(self, peer: bytes, msg: Message, now: float) -> None:
        if not self.scheduler.heard_from(peer, now):
            return
        for entry in msg.body:
            job_id, attempt, fraction, message = str(entry[0]), int(entry[1]), entry[2], entry[3]
            if self._current(peer, job_id, attempt) is None:
                continue
            if fraction is not None:
                fraction = float(fraction)
                if not 0.0 <= fraction <= 1.0:
                    raise ProtocolError("progress fraction out of range")
            if message is not None:
                message = str(message)[:1000]
            self.progress[job_id] = (attempt, fraction, message, now)

    def _on_output(self, peer: bytes, msg: Message, now: float) -> None:
        if not self.scheduler.heard_from(peer, now):
            return
        limit = self.output_limit
        for entry in msg.body:
            job_id, attempt, stream, text = str(entry[0]), int(entry[1]), str(entry[2]), entry[3]
            if not isinstance(text, str):
                raise ProtocolError("output text must be a string")
            if stream not in ("stdout", "stderr", "log") or self._current(peer, job_id, attempt) is None:
                continue
            out = self.outputs.get(job_id)
            if out is None or out.attempt < attempt:
                if out is not None:  # a new attempt starts with empty streams; readers' offsets still grow
                    self.output_chars -= out.size
                    old = out
                    out = JobOutput(attempt)
                    for name, previous in old.streams.items():
                        fresh = StreamTail()
                        fresh.end = previous.end
                        out.streams[name] = fresh
                else:
                    out = JobOutput(attempt)
                self.outputs[job_id] = out
            tail = out.streams.get(stream)
            if tail is None:
                tail = out.streams[stream] = StreamTail()
            delta = tail.append(text[-limit:] if len(text) > limit else text, limit)
            out.size += delta
            self.output_chars += delta
        if self.output_chars > self.output_budget:
            self._evict()

    def _drop_output(self, job_id: str) -> None:
        out = self.outputs.pop(job_id, None)
        if out is not None:
            self.output_chars -= out.size
            self._finished_outputs.pop(job_id, None)

    def _evict(self) -> None:
        """Over budget: drop the output of the jobs that finished longest ago."""
        while self.output_chars > self.output_budget and self._finished_outputs:
            job_id, _ = self._finished_outputs.popitem(last=False)
            out = self.outputs.pop(job_id, None)
            if out is not None:
                self.output_chars -= out.size

    # --- client commands -----------------------------------------------------------------------------

    def _on_jobs(self, peer: bytes, msg: Message, now: float) -> None:
        body = msg.body if isinstance(msg.body, dict) else {}
        states = body.get("states")
        if states is not None and (not isinstance(states, list) or not all(isinstance(s, str) for s in states)):
            raise ProtocolError("states must be a list of strings")
        since = body.get("since")
        if since is not None and not isinstance(since, int | float):
            raise ProtocolError("since must be a number of seconds")
        fn = body.get("fn")
        limit = int(body.get("limit") or 100)
        jobs, truncated = self.list_jobs(states, since, None if fn is None else str(fn), limit, now)
        self.dispatcher._send(peer, Cmd.JOBS_REPLY, {"req": body.get("req"), "jobs": jobs, "truncated": truncated})

    def _on_logs(self, peer: bytes, msg: Message, now: float) -> None:
        body = msg.body
        reply = self.logs(str(body["id"]), body.get("offsets") or {}, now)
        reply["req"] = body.get("req")
        self.dispatcher._send(peer, Cmd.LOGS_REPLY, reply)

    # --- queries (loop thread) -----------------------------------------------------------------------

    def list_jobs(
        self, states: Iterable[str] | None, since: float | None, fn: str | None, limit: int, now: float
    ) -> tuple[list[dict[str, Any]], bool]:
        """Jobs, newest first within each group: running, queued, then recently finished."""
        self._fold(now)
        limit = max(1, min(limit, JOBS_LIMIT))
        wanted = set(states) if states is not None else {QUEUED, RUNNING, *FINISHED_STATES}
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
        if QUEUED in wanted and not full():
            for job in jobs.values():  # insertion order: oldest first
                if job.state != QUEUED or (fn is not None and job.opts.fn != fn):
                    continue
                if cutoff is not None and job.submitted_at < cutoff:
                    continue
                out.append(self._live_summary(job, offset, now))
                if full():
                    break
        finished = wanted & FINISHED_STATES
        if finished and not full():
            wall_cutoff = None if cutoff is None else cutoff + offset
            for s in reversed(self.recent):
                if s[2] not in finished or (fn is not None and s[1] != fn):
                    continue
                if wall_cutoff is not None and s[7] < wall_cutoff:
                    break  # newest first: everything after this is older
                out.append(_summary_dict(s))
                if full():
                    break
        truncated = len(out) > limit
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
        return d

    def logs(self, job_id: str, offsets: dict[str, Any], now: float) -> dict[str, Any]:
        job = self.scheduler.jobs.get(job_id)
        state: str | None = job.state if job is not None else None
        if state is None:
            self._fold(now)
            for s in reversed(self.recent):
                if s[0] == job_id:
                    state = s[2]
                    break
        out = self.outputs.get(job_id)
        streams: dict[str, dict[str, Any]] = {}
        if out is not None:
            for name, tail in out.streams.items():
                offset = offsets.get(name, 0)
                start, text = tail.since(int(offset) if isinstance(offset, int) else 0, self.output_limit)
                streams[name] = {"start": start, "end": tail.end, "text": text}
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
            view = self.decorate_view(self.scheduler.job_view(job), now)
            view["submitted_at"] = job.submitted_at + offset
            if job.finished_at is not None:
                view["finished_at"] = job.finished_at + offset
            view["history"] = [_wall_attempt(h, offset) for h in job.history]
            view["held"] = True
            return view
        self._fold(now)
        for f in reversed(self.failures):
            if f["id"] == job_id:
                return {**f, "state": FAILED, "held": False}
        for s in reversed(self.recent):
            if s[0] == job_id:
                return {**_summary_dict(s), "held": False}
        return None

    # --- requests from other threads (the dashboard) ---------------------------------------------

    def ask(self, kind: str, **args: Any) -> Future[Any]:
        """Queue a query for the loop thread (thread-safe); the future resolves on its next turn."""
        fut: Future[Any] = Future()
        self._requests.put((kind, args, fut))
        self._asked = True
        try:
            self.dispatcher._wake_w.send(b"o")
        except OSError:
            pass
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

    def _stats(self, fn: str) -> FunctionStats:
        st = self.functions.get(fn)
        if st is None:
            label = _fn_label(fn, self.functions)
            st = self.functions.get(label)
            if st is None:
                st = self.functions[label] = FunctionStats()
        return st

    def _fold_submits(self) -> None:
        if self.submits:
            for fn, n in self.submits.items():
                self._stats(fn).submitted += n
            self.submits.clear()

    def _fold(self, now: float) -> None:
        """Turn the jobs finished since the last fold into statistics, summaries and failure records."""
        if not self._finished:
            self._fold_submits()
            return
        finished, self._finished = self._finished, []
        offset = time.time() - now
        self._fold_submits()
        failure_output = self._failure_output
        for job in finished:
            st = self._stats(job.opts.fn)
            state = job.state
            history = job.history
            if state == SUCCEEDED:
                st.succeeded += 1
            elif state == FAILED:
                st.failed += 1
            elif state == CANCELLED:
                st.cancelled += 1
            started = finished_at = None
            if history:
                first, last = history[0], history[-1]
                started = last["started"]
                finished_at = last.get("finished")
                st.wait.observe(max(0.0, first["started"] - job.submitted_at))
                if len(history) > 1:
                    st.retried += sum(1 for h in history[:-1] if "error" in h)
            duration = None
            if state == SUCCEEDED and isinstance(job.result_info.get("duration"), float):
                duration = job.result_info["duration"]
            elif started is not None and finished_at is not None:
                duration = finished_at - started
            if duration is not None and state != CANCELLED:
                st.duration.observe(duration)
            error = None if state == SUCCEEDED else perr.describe(job.result_info or {})
            end = job.finished_at if job.finished_at is not None else now
            self.recent.append(
                (
                    job.id,
                    job.opts.fn,
                    state,
                    history[-1]["worker"] if history else None,
                    job.attempt,
                    job.submitted_at + offset,
                    None if started is None else started + offset,
                    end + offset,
                    duration,
                    error,
                )
            )
            if state == FAILED:
                info = job.result_info or {}
                tb = str(info.get("traceback") or "")
                self.failures.append(
                    {
                        "id": job.id,
                        "fn": job.opts.fn,
                        "worker": history[-1]["worker"] if history else None,
                        "attempts": job.attempt,
                        "submitted_at": job.submitted_at + offset,
                        "started_at": None if started is None else started + offset,
                        "finished_at": end + offset,
                        "duration": duration,
                        "error": {
                            "kind": info.get("kind"),
                            "type": info.get("type"),
                            "message": str(info.get("message", ""))[:2000],
                            "traceback": tb[-TRACEBACK_CHARS:],
                        },
                        "output": failure_output.pop(job.id, None) or {},
                    }
                )
        if failure_output and len(failure_output) > 4 * FAILURES:
            failure_output.clear()  # outputs of failures already folded elsewhere; never grows without bound

    def _sample(self, now: float) -> None:
        counts = self.scheduler.counts
        s, f, c = counts[SUCCEEDED], counts[FAILED], counts[CANCELLED]
        last = self._last_tick
        self._last_tick = (now, s, f, c)
        if last is None:
            return
        dt = now - last[0]
        if dt <= 0:
            return
        busy = slots = 0
        for w in self.scheduler.workers.values():
            busy += len(w.running)
            slots += w.concurrency
        self.series.append(
            (
                round(time.time(), 3),
                self.scheduler.n_queued,
                self.scheduler.n_running,
                round((s - last[1]) / dt, 3),
                round((f - last[2]) / dt, 3),
                round((c - last[3]) / dt, 3),
                len(self.scheduler.workers),
                busy,
                slots,
            )
        )

    def throughput(self) -> dict[str, float]:
        """Jobs finished per second, averaged over the last 10 s and the last 60 s."""
        out = {}
        points = list(self.series)[-60:]
        for label, n in (("last_10s", 10), ("last_60s", 60)):
            window = points[-n:]
            out[label] = round(sum(p[3] + p[4] + p[5] for p in window) / len(window), 3) if window else 0.0
        return out

    def status(self, now: float) -> dict[str, Any]:
        """What `conveyor status --json` prints (the STATUS_REPLY body without its req)."""
        st = self.scheduler.status(now)
        d = self.dispatcher
        st["dispatcher"] = {"instance": d.instance, "endpoint": d.endpoint, "pid": os.getpid()}
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
        columns = ("t", "queued", "running", "succeeded", "failed", "cancelled", "workers", "busy", "slots")
        points = list(self.series)
        series = {name: [p[i] for p in points] for i, name in enumerate(columns)}
        functions = {}
        for fn, st in self.functions.items():
            functions[fn] = {
                "submitted": st.submitted,
                "succeeded": st.succeeded,
                "failed": st.failed,
                "cancelled": st.cancelled,
                "retried": st.retried,
                "duration": st.duration.export(),
                "wait": st.wait.export(),
            }
        snapshot = {
            "version": self.version + 1,
            "time": time.time(),
            "status": status,
            "series": series,
            "failures": list(reversed(self.failures))[:50],
            "recent": [_summary_dict(s) for s in list(self.recent)[-50:]][::-1],
            "running_jobs": running,
            "functions": functions,
            "heartbeat_misses": self.heartbeat_misses,
            "journal": self.journal.export(),
            "malformed": self.dispatcher.malformed,
            "output_chars": self.output_chars,
        }
        with self.changed:
            self.snapshot = snapshot
            self.version += 1
            self.changed.notify_all()


def _summary_dict(s: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": s[0],
        "fn": s[1],
        "state": s[2],
        "worker": s[3],
        "attempts": s[4],
        "submitted_at": s[5],
        "started_at": s[6],
        "finished_at": s[7],
        "duration": None if s[8] is None else round(s[8], 6),
        "error": s[9],
    }


def _wall_attempt(h: dict[str, Any], offset: float) -> dict[str, Any]:
    """An attempt record with wall-clock times (the dispatcher keeps monotonic ones)."""
    out = {**h, "started": h["started"] + offset}
    if "finished" in h:
        out["finished"] = h["finished"] + offset
    return out


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1d', '1h30m' -> seconds."""
    import re

    text = text.strip().lower()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 10m, 2h, 1d")
    return sum(float(n) * _UNITS[u] for n, u in parts)

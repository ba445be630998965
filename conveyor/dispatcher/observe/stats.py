"""The statistics the dispatcher keeps for the dashboard and the metrics: finished jobs folded into
per-function counts and histograms, summaries of recent jobs and failure records (`JobStats`), and the
cluster's load and throughput over time (`ThroughputSeries`).

Apart from observe.py because these are plain data with their own upkeep: the loop only hands finished
jobs over (a list extend) and counts submissions; `fold()` does the real work, once a second or before a
query reads the result, and `sample()` adds one point a second. All of it runs on the loop thread.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from typing import Any

from conveyor.dispatcher.scheduler import CANCELLED, EXPIRED, FAILED, SUCCEEDED, Job, Scheduler
from conveyor.protocol import failures as perr

HISTORY = 10_000  # summaries of recently finished jobs (`conveyor jobs`)
FAILURES = 100  # failure records with tracebacks (the dashboard)
FAILURE_OUTPUT = 16 * 1024  # characters of each stream kept with a failure record
MAX_FUNCTIONS = 200  # functions with their own statistics; the rest count as "(other)"
TRACEBACK_CHARS = 16 * 1024
SERIES_SECONDS = 600  # throughput history: one point per second

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
    __slots__ = ("cancelled", "duration", "expired", "failed", "retried", "submitted", "succeeded", "wait")

    def __init__(self) -> None:
        self.submitted = 0
        self.succeeded = 0
        self.failed = 0
        self.cancelled = 0
        self.expired = 0
        self.retried = 0
        self.duration = Histogram(DURATION_BUCKETS)
        self.wait = Histogram(DURATION_BUCKETS)


def _fn_label(fn: str, known: dict[str, FunctionStats]) -> str:
    if fn in known or len(known) < MAX_FUNCTIONS:
        return fn
    return "(other)"


class JobStats:
    """Finished jobs folded into `functions` (statistics by function), `recent` (summaries, see
    `summary_dict`) and `failures` (records with traceback and output), at most `history` and `failures` long."""

    def __init__(self, *, history: int = HISTORY, failures: int = FAILURES):
        self.recent: deque[tuple[Any, ...]] = deque(maxlen=history)
        self.failures: deque[dict[str, Any]] = deque(maxlen=failures)
        self.failure_output: dict[str, dict[str, str]] = {}  # output of failed jobs not folded yet, by job id
        self.finished: list[Job] = []  # finished since the last fold
        self.submits: dict[str, int] = {}  # jobs submitted since the last fold, by function (the loop counts on SUBMIT)
        self.functions: dict[str, FunctionStats] = {}

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

    def fold(self, now: float) -> None:
        """Turn the jobs finished since the last fold into statistics, summaries and failure records."""
        if not self.finished:
            self._fold_submits()
            return
        finished, self.finished = self.finished, []
        offset = time.time() - now
        self._fold_submits()
        failure_output = self.failure_output
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
            elif state == EXPIRED:
                st.expired += 1
            if history:
                st.wait.observe(max(0.0, history[0]["started"] - job.submitted_at))
                if len(history) > 1:
                    st.retried += sum(1 for h in history[:-1] if "error" in h)
            summary = _summary(job, offset, now)
            duration = summary[8]
            if duration is not None and state != CANCELLED:
                st.duration.observe(duration)
            self.recent.append(summary)
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
                        "started_at": summary[6],
                        "finished_at": summary[7],
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

    def remember(self, jobs: list[Job], now: float) -> None:
        """Finished jobs restored from the journal: listed again (`conveyor jobs`), not counted again."""
        offset = time.time() - now
        for job in sorted(jobs, key=lambda j: j.finished_at or 0.0):
            self.recent.append(_summary(job, offset, now))

    def export_functions(self) -> dict[str, dict[str, Any]]:
        """The statistics by function, as the snapshot carries them."""
        functions = {}
        for fn, st in self.functions.items():
            functions[fn] = {
                "submitted": st.submitted,
                "succeeded": st.succeeded,
                "failed": st.failed,
                "cancelled": st.cancelled,
                "expired": st.expired,
                "retried": st.retried,
                "duration": st.duration.export(),
                "wait": st.wait.export(),
            }
        return functions


class ThroughputSeries:
    """Load and finish rates of the cluster over time: one point a second, the last `seconds` of them."""

    COLUMNS = ("t", "queued", "running", "succeeded", "failed", "cancelled", "workers", "busy", "slots")

    def __init__(self, seconds: int = SERIES_SECONDS):
        self.points: deque[tuple[float, ...]] = deque(maxlen=seconds)  # one value per column
        self._last: tuple[float, int, int, int] | None = None  # (now, succeeded, failed, cancelled)

    def sample(self, scheduler: Scheduler, now: float) -> None:
        counts = scheduler.counts
        s, f, c = counts[SUCCEEDED], counts[FAILED], counts[CANCELLED]
        last = self._last
        self._last = (now, s, f, c)
        if last is None:
            return
        dt = now - last[0]
        if dt <= 0:
            return
        busy = slots = 0
        for w in scheduler.workers.values():
            busy += len(w.running)
            slots += w.concurrency
        self.points.append(
            (
                round(time.time(), 3),
                scheduler.n_queued,
                scheduler.n_running,
                round((s - last[1]) / dt, 3),
                round((f - last[2]) / dt, 3),
                round((c - last[3]) / dt, 3),
                len(scheduler.workers),
                busy,
                slots,
            )
        )

    def throughput(self) -> dict[str, float]:
        """Jobs finished per second, averaged over the last 10 s and the last 60 s."""
        out = {}
        points = list(self.points)[-60:]
        for label, n in (("last_10s", 10), ("last_60s", 60)):
            window = points[-n:]
            out[label] = round(sum(p[3] + p[4] + p[5] for p in window) / len(window), 3) if window else 0.0
        return out

    def columns(self) -> dict[str, list[float]]:
        """The points as the snapshot carries them: one list per column."""
        points = list(self.points)
        return {name: [p[i] for p in points] for i, name in enumerate(self.COLUMNS)}


def _summary(job: Job, offset: float, now: float) -> tuple[Any, ...]:
    """A finished job's summary in `JobStats.recent` (wall-clock times); fields as in summary_dict."""
    history = job.history
    started = finished_at = None
    if history:
        started = history[-1]["started"]
        finished_at = history[-1].get("finished")
    duration = None
    if job.state == SUCCEEDED and isinstance(job.result_info.get("duration"), float):
        duration = job.result_info["duration"]
    elif started is not None and finished_at is not None:
        duration = finished_at - started
    error = None if job.state == SUCCEEDED else perr.describe(job.result_info or {})
    end = job.finished_at if job.finished_at is not None else now
    return (
        job.id, job.opts.fn, job.state, history[-1]["worker"] if history else None, job.attempt,
        job.submitted_at + offset, None if started is None else started + offset, end + offset, duration, error,
    )


def summary_dict(s: tuple[Any, ...]) -> dict[str, Any]:
    """A summary in `JobStats.recent` as the JOBS reply and the dashboard show it."""
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

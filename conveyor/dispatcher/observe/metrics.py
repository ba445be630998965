"""Prometheus metrics of the dispatcher (`conveyor dispatcher --metrics-port N`).

The loop never touches a prometheus_client object: it keeps plain counters and bucket counts
(stats.py), and once a second publishes a snapshot of them (observe.py). A scrape, in prometheus_client's own
HTTP thread, turns the latest snapshot into metric families, so its cost is paid by the scrape and
metrics are at most a second old.

Metrics (all prefixed `conveyor_`):

| name | type | labels |
|---|---|---|
| jobs_submitted_total | counter | function |
| jobs_total | counter | function, state (succeeded, failed, cancelled, expired): jobs that finished |
| jobs_retried_total | counter | function: failed attempts that were retried (counted when the job finishes) |
| jobs_queued, jobs_delayed, jobs_running | gauge | |
| jobs_scheduled, jobs_limited | gauge | not due yet; waiting for limit keys |
| limit_waiting, limit_running | gauge | key: jobs waiting for it; attempts running under it |
| limit_starts_total | counter | key: attempts started under it |
| limited_starts_total | counter | attempts started after waiting for limit keys |
| queue_depth | gauge | mode, tags: queued jobs per queue class |
| workers | gauge | mode, host |
| worker_slots, worker_busy_slots | gauge | mode, host |
| task_duration_seconds | histogram | function |
| queue_wait_seconds | histogram | function: submission to first start |
| heartbeat_misses_total | counter | workers declared lost after missing heartbeats |
| journal_commit_seconds | histogram | one per journal transaction |
| malformed_messages_total | counter | |
| throughput_jobs_per_second | gauge | window (10s, 60s) |
| output_held_characters | gauge | task output held in memory |
| pair_active, pair_degraded, pair_epoch | gauge | a standby pair only (docs/standby.md) |
| dispatcher_info | gauge (1) | instance, endpoint |
| dispatcher_start_time_seconds | gauge | |
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from conveyor.dispatcher.observe.observer import Observer


def _buckets(h: dict[str, Any]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs of an exported Histogram, ending with +Inf."""
    out = []
    running = 0
    for bound, count in zip([*h["bounds"], math.inf], h["counts"], strict=True):
        running += count
        out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(running)))
    return out


class ConveyorCollector(Collector):
    def __init__(self, observer: Observer):
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        snap = self.observer.snapshot
        if snap is None:
            return
        status = snap["status"]
        functions: dict[str, Any] = snap["functions"]

        submitted = CounterMetricFamily("conveyor_jobs_submitted", "Jobs accepted from clients.", labels=["function"])
        finished = CounterMetricFamily(
            "conveyor_jobs", "Jobs that finished, by final state.", labels=["function", "state"]
        )
        retried = CounterMetricFamily(
            "conveyor_jobs_retried", "Failed attempts that were retried (counted when the job finishes).",
            labels=["function"],
        )
        duration = HistogramMetricFamily(
            "conveyor_task_duration_seconds", "Run time of a job's last attempt.", labels=["function"]
        )
        wait = HistogramMetricFamily(
            "conveyor_queue_wait_seconds", "Time from submission to the first start.", labels=["function"]
        )
        for fn, f in sorted(functions.items()):
            submitted.add_metric([fn], f["submitted"])
            for state in ("succeeded", "failed", "cancelled", "expired"):
                finished.add_metric([fn, state], f.get(state, 0))
            retried.add_metric([fn], f["retried"])
            duration.add_metric([fn], _buckets(f["duration"]), f["duration"]["sum"])
            wait.add_metric([fn], _buckets(f["wait"]), f["wait"]["sum"])
        yield submitted
        yield finished
        yield retried
        yield duration
        yield wait

        yield GaugeMetricFamily("conveyor_jobs_queued", "Queued jobs, including those waiting out a retry delay.",
                                value=status["queued"])
        yield GaugeMetricFamily("conveyor_jobs_delayed", "Jobs waiting out a retry delay.", value=status["delayed"])
        yield GaugeMetricFamily("conveyor_jobs_running", "Jobs running on workers.", value=status["running"])
        yield GaugeMetricFamily("conveyor_jobs_scheduled", "Jobs not due yet (eta, countdown).",
                                value=status.get("scheduled", 0))
        yield GaugeMetricFamily("conveyor_jobs_limited", "Jobs waiting for their limit keys.",
                                value=status.get("limited", 0))
        yield CounterMetricFamily("conveyor_limited_starts", "Attempts started under limit keys.",
                                  value=status["totals"].get("limited_starts", 0))
        lim_waiting = GaugeMetricFamily("conveyor_limit_waiting", "Jobs waiting for this limit key.", labels=["key"])
        lim_running = GaugeMetricFamily("conveyor_limit_running", "Attempts running under the key.", labels=["key"])
        lim_starts = CounterMetricFamily("conveyor_limit_starts", "Attempts started under the key.", labels=["key"])
        for k in snap.get("limits", []):
            if isinstance(k.get("template"), str):
                continue  # a key filled in from a template: counted in its template's row (bounded labels)
            lim_waiting.add_metric([k["key"]], k["waiting"])
            lim_running.add_metric([k["key"]], k["running"])
            lim_starts.add_metric([k["key"]], k["starts"])
        yield lim_waiting
        yield lim_running
        yield lim_starts
        depth = GaugeMetricFamily("conveyor_queue_depth", "Queued jobs per queue class.", labels=["mode", "tags"])
        for q in status["queues"]:
            depth.add_metric([q["mode"] or "any", ",".join(q["tags"])], q["queued"])
        yield depth

        workers: dict[tuple[str, str], list[int]] = {}
        for w in status["workers"]:
            agg = workers.setdefault((w["mode"], w["host"]), [0, 0, 0])
            agg[0] += 1
            agg[1] += w["concurrency"]
            agg[2] += w["running"]
        n = GaugeMetricFamily("conveyor_workers", "Registered workers.", labels=["mode", "host"])
        slots = GaugeMetricFamily("conveyor_worker_slots", "Task slots of registered workers.", labels=["mode", "host"])
        busy = GaugeMetricFamily("conveyor_worker_busy_slots", "Slots running a task.", labels=["mode", "host"])
        for (mode, host), (count, total, running) in sorted(workers.items()):
            n.add_metric([mode, host], count)
            slots.add_metric([mode, host], total)
            busy.add_metric([mode, host], running)
        yield n
        yield slots
        yield busy

        yield CounterMetricFamily(
            "conveyor_heartbeat_misses", "Workers declared lost after missing their heartbeats.",
            value=snap["heartbeat_misses"],
        )
        journal = HistogramMetricFamily("conveyor_journal_commit_seconds", "Duration of journal transactions.")
        journal.add_metric([], _buckets(snap["journal"]), snap["journal"]["sum"])
        yield journal
        journal_state = status.get("journal", {}).get("state", "off")
        full = GaugeMetricFamily("conveyor_journal_full", "1 while the journal refuses new jobs (full, failing).")
        full.add_metric([], 1.0 if journal_state in ("full", "failing") else 0.0)
        yield full
        yield CounterMetricFamily("conveyor_jobs_refused", "Jobs refused because they could not be made durable.",
                                  value=status.get("journal", {}).get("refused", 0) or 0)
        yield CounterMetricFamily("conveyor_accept_failures", "Connections the dispatcher could not accept (EMFILE).",
                                  value=status.get("connections", {}).get("accept_failures", 0))
        yield CounterMetricFamily("conveyor_malformed_messages", "Messages dropped as malformed.",
                                  value=snap["malformed"])
        rate = GaugeMetricFamily("conveyor_throughput_jobs_per_second", "Jobs finished per second.",
                                 labels=["window"])
        rate.add_metric(["10s"], status["throughput"]["last_10s"])
        rate.add_metric(["60s"], status["throughput"]["last_60s"])
        yield rate
        yield GaugeMetricFamily("conveyor_output_held_characters", "Task output held in memory.",
                                value=snap["output_chars"])
        pair = status.get("pair")
        if pair is not None:  # a standby pair (docs/standby.md)
            yield GaugeMetricFamily("conveyor_pair_active", "1 while this dispatcher of a pair is active.",
                                    value=1.0 if pair["state"] == "active" else 0.0)
            yield GaugeMetricFamily("conveyor_pair_degraded", "1 while active without an in-sync backup (one copy).",
                                    value=1.0 if pair["replication"] == "degraded" else 0.0)
            yield GaugeMetricFamily("conveyor_pair_epoch", "The epoch this dispatcher is active in, or has seen.",
                                    value=pair["epoch"])
        d = status["dispatcher"]
        info = GaugeMetricFamily(
            "conveyor_dispatcher_info", "The dispatcher instance.", labels=["instance", "endpoint"]
        )
        info.add_metric([d["instance"], str(d["endpoint"])], 1)
        yield info
        yield GaugeMetricFamily("conveyor_dispatcher_start_time_seconds", "Unix time the dispatcher started.",
                                value=status["started_at"])


class MetricsServer:
    def __init__(self, server: Any, thread: threading.Thread):
        self._server = server
        self._thread = thread
        self.port: int = server.server_port
        self.host: str = server.server_address[0]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_metrics(observer: Observer, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve /metrics from a thread; port 0 picks a free port (see `.port`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConveyorCollector(observer))
    observer.publish = True
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)

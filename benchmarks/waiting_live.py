"""Work that waits on a real cluster (issue 14): priority overtaking, due-to-start latency, a rate limit's
worst window. Real dispatcher and worker processes on 127.0.0.1; the figures of docs/scheduling.md.

    python -m benchmarks.waiting_live                # all three, about a minute
    python -m benchmarks.waiting_live --delayed 200  # fewer delayed jobs

- overtaking: one threads worker with one slot runs a backlog of 5 ms priority-0 jobs; every 0.1 s a
  priority-5 job is submitted (50 of them). Reported per prefetch setting (auto, and a fixed 8): the latency from
  submit to its start (p50, p99, max) and how many priority-0 jobs started in between (the window).
- delayed: N jobs with an eta at spread instants over a few seconds, on an idle cluster (4 workers x 4
  threads). Reported: due-to-start latency at the dispatcher (its assignment time) and in the task
  (its first line), p50 / p99 / max.
- rate: a key `api=50/s,burst=5`, 8 workers x 2 threads, 300 jobs. Reported: the worst window, the
  largest (starts in [t_i, t_j]) - rate * (t_j - t_i) over every pair, which the limit bounds by the
  burst; at the dispatcher and at the workers (which add delivery jitter).

Results go to benchmarks/results/waiting-live-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def stamp(seconds: float, value: Any) -> dict[str, Any]:
    """The task: when it started (wall clock), after sleeping `seconds`."""
    started = time.time()
    if seconds:
        time.sleep(seconds)
    return {"value": value, "started": started, "pid": os.getpid()}


@contextmanager
def cluster(workers: int, concurrency: int, *dispatcher_args: str, worker_args: tuple[str, ...] = ()) -> Iterator[Any]:
    """A dispatcher (with a journal) and `workers` threads workers; yields a connected Client."""
    from conveyor.client import Client

    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "log", "ab")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "conveyor"]
        dispatcher = subprocess.Popen([*cmd, "dispatcher", "--bind", "tcp://127.0.0.1:0", "--journal",
                                       f"{tmp}/journal.db", "--log-level", "warning", *dispatcher_args],
                                      stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        procs = [dispatcher]
        client = None
        try:
            assert dispatcher.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(dispatcher.stdout, selectors.EVENT_READ)
                if not sel.select(30):
                    raise TimeoutError("the dispatcher did not start")
            address = dispatcher.stdout.readline().decode().strip()
            procs += [subprocess.Popen([*cmd, "worker", "--connect", address, "--mode", "threads", "--concurrency",
                                        str(concurrency), "--log-level", "warning", *worker_args],
                                       stdout=log, stderr=log, cwd=ROOT) for _ in range(workers)]
            client = Client(address)
            client.wait_for_workers(workers, timeout=120)
            yield client
        finally:
            if client is not None:
                client.close()
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            if dispatcher.stdout is not None:
                dispatcher.stdout.close()
            log.close()


def percentiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 2)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(v[-1] * 1000, 2), "n": len(v)}


def case_overtaking(prefetch: str, samples: int = 20) -> dict[str, Any]:
    with cluster(1, 1, worker_args=("--prefetch", prefetch)) as client:
        backlog = [client.submit(stamp, 0.005, i) for i in range(400 + samples * 25)]
        urgent: list[tuple[float, Any]] = []
        deadline = time.monotonic() + 60
        while client.status()["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        urgent_opts = client.options(priority=5)
        for i in range(samples):
            time.sleep(0.1)
            urgent.append((time.time(), urgent_opts.submit(stamp, 0, f"u{i}")))
        urgent_started = [(at, f.result(60)["started"]) for at, f in urgent]
        lows = sorted(f.result(120)["started"] for f in backlog)
    latency = [started - at for at, started in urgent_started]
    behind = [sum(1 for t in lows if at < t < started) for at, started in urgent_started]
    return {"case": "overtaking", "prefetch": prefetch, "latency": percentiles(latency),
            "low_jobs_started_in_between_max": max(behind), "low_job_s": 0.005}


def case_delayed(n: int) -> dict[str, Any]:
    with cluster(4, 4) as client:
        start = time.time() + 2.0
        spread_s = max(2.0, n / 250)
        dues = [start + spread_s * i / n for i in range(n)]
        futs = [client.options(eta=datetime.fromtimestamp(due, UTC), keep=True).submit(stamp, 0, i) for i, due in
                enumerate(dues)]
        in_task = [f.result(120)["started"] - due for f, due in zip(futs, dues, strict=True)]
        infos = []
        for i in range(0, n, 500):
            infos += client.job_info(*[f.job_id for f in futs[i:i + 500]])
        at_dispatcher = [v["history"][0]["started"] - due for v, due in zip(infos, dues, strict=True) if v]
    early = sum(1 for x in at_dispatcher if x < -0.001)
    return {"case": "delayed", "jobs": n, "spread_s": spread_s, "at_dispatcher": percentiles(at_dispatcher),
            "in_task": percentiles(in_task), "started_early": early}


def worst_window(starts: list[float], rate: float) -> float:
    s = sorted(starts)
    worst = 0.0
    for i, t0 in enumerate(s):
        for j in range(i, len(s)):
            worst = max(worst, (j - i + 1) - rate * (s[j] - t0))
    return worst


def case_rate(n: int = 300, rate: float = 50.0, burst: int = 5) -> dict[str, Any]:
    with cluster(8, 2, "--limit", f"api={rate:g}/s,burst={burst}") as client:
        api = client.options(limits=["api"], keep=True)
        futs = [api.submit(stamp, 0.01, i) for i in range(n)]
        at_workers = [f.result(120)["started"] for f in futs]
        pids = {f.result()["pid"] for f in futs}
        infos = []
        for i in range(0, n, 500):
            infos += client.job_info(*[f.job_id for f in futs[i:i + 500]])
        at_dispatcher = [h["started"] for v in infos if v for h in v["history"]]
    span = max(at_workers) - min(at_workers)
    return {"case": "rate", "rule": f"{rate:g}/s,burst={burst}", "jobs": n, "workers": 8, "worker_pids": len(pids),
            "worst_window_at_dispatcher": round(worst_window(at_dispatcher, rate), 3),
            "worst_window_at_workers": round(worst_window(at_workers, rate), 3),
            "achieved_rate_per_s": round((n - 1) / span, 2) if span else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.waiting_live", description=__doc__.split("\n")[0])
    parser.add_argument("--delayed", type=int, default=1000, help="delayed jobs (default 1000)")
    parser.add_argument("--samples", type=int, default=50, help="priority-5 jobs per overtaking case (default 50)")
    args = parser.parse_args(argv)
    results = []
    for prefetch in ("auto", "8"):
        r = case_overtaking(prefetch, args.samples)
        lat = r["latency"]
        print(f"overtaking, prefetch {prefetch}: submit to start p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, "
              f"max {lat['max_ms']} ms; at most {r['low_jobs_started_in_between_max']} priority-0 jobs in between")
        results.append(r)
    r = case_delayed(args.delayed)
    d, t = r["at_dispatcher"], r["in_task"]
    print(f"{args.delayed} delayed jobs: due to assignment p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max "
          f"{d['max_ms']} ms; due to the task's first line p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms; "
          f"{r['started_early']} early")
    results.append(r)
    r = case_rate()
    print(f"rate {r['rule']} at 8 workers, {r['jobs']} jobs: worst window burst + "
          f"{r['worst_window_at_dispatcher'] - 5:+.3f} at the dispatcher, {r['worst_window_at_workers'] - 5:+.3f} "
          f"at the workers; {r['achieved_rate_per_s']}/s achieved")
    results.append(r)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"waiting-live-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"results": results, "python": sys.version, "cpus": os.cpu_count(),
                                "load_avg": os.getloadavg()}, indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

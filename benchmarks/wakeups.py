"""Where a sequential round trip's time goes: thread wake-ups per round trip, by backend and thread (issue 19).

    python -m benchmarks.wakeups                # 2,000 round trips per backend, 3 rounds, medians
    python -m benchmarks.wakeups --samples 500 --rounds 1

On a 2-vCPU machine a lone round trip is mostly threads and processes waking one another, and each
wake-up costs tens of microseconds whatever Python does around it. Linux counts, per thread, the times
it blocked and had to be woken again (`voluntary_ctxt_switches` in /proc/PID/task/TID/status). This
reads them for every thread of every process of a backend before and after N sequential
`submit(noop).result()` round trips (after a warm-up), and divides by N. The backends, in one run:

- bare: the bare pyzmq client -> ROUTER broker -> worker pipeline (benchmarks/bare.py), the floor of
  four ZeroMQ hops;
- pool: concurrent.futures.ProcessPoolExecutor(2);
- conveyor threads / conveyor processes: a local cluster, one worker with 2 slots, journal on.

Threads are grouped by process role and by kind: ZeroMQ's I/O threads ("ZMQbg/IO/0") apart from the
Python threads. Linux only. Results go to benchmarks/results/wakeups-<UTC>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil

from benchmarks import bare
from benchmarks.tasks import noop

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 300
RoundTrip = Callable[[], None]
Pids = Callable[[], list[tuple[str, int]]]  # (role, pid) of every process, asked after the warm-up
Backend = AbstractContextManager[tuple[RoundTrip, Pids]]


def _switches(pids: list[tuple[str, int]]) -> Counter[str]:
    """Voluntary context switches so far, by "role/thread kind" (ZeroMQ I/O threads apart)."""
    out: Counter[str] = Counter()
    for role, pid in pids:
        for task in glob.glob(f"/proc/{pid}/task/*"):
            try:
                with open(f"{task}/comm") as f:
                    name = f.read().strip()
                with open(f"{task}/status") as f:
                    status = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            kind = "zmq I/O" if name.startswith("ZMQbg") else "python"
            out[f"{role}/{kind}"] += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return out


def _and_children(role: str, pid: int) -> list[tuple[str, int]]:
    """A process and its descendants (a worker's fork server and children, a pool's processes)."""
    return [(role, pid), *((f"{role} children", c.pid) for c in psutil.Process(pid).children(recursive=True))]


@contextmanager
def _bare() -> Iterator[tuple[RoundTrip, Pids]]:
    with bare.pipeline() as (round_trip, (broker, worker)):
        yield round_trip, lambda: [("client", os.getpid()), ("broker", broker), ("worker", worker)]


@contextmanager
def _pool() -> Iterator[tuple[RoundTrip, Pids]]:
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        yield (lambda: pool.submit(noop).result(10)), lambda: _and_children("client", os.getpid())


@contextmanager
def _conveyor(mode: str) -> Iterator[tuple[RoundTrip, Pids]]:
    from conveyor import Client, LocalCluster

    state = tempfile.mkdtemp(prefix="conveyor-wakeups-")
    cluster = LocalCluster(workers=1, mode=mode, concurrency=2, quiet=True, journal=os.path.join(state, "j.db"))
    try:
        client = Client(cluster.start())
        try:
            client.wait_for_workers(1, timeout=60)
            view = client if mode == "processes" else client.options(mode=mode)
            assert cluster.dispatcher is not None
            dispatcher, worker = cluster.dispatcher.pid, cluster.workers[0].pid
            yield (lambda: view.submit(noop).result(10)), lambda: [
                ("client", os.getpid()), ("dispatcher", dispatcher), *_and_children("worker", worker)
            ]
        finally:
            client.close()
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def _sample(backend: Backend, samples: int) -> dict[str, float]:
    with backend as (round_trip, processes):
        for _ in range(WARMUP):
            round_trip()
        pids = processes()
        before = _switches(pids)
        us: list[float] = []
        for _ in range(samples):
            t = time.perf_counter_ns()
            round_trip()
            us.append((time.perf_counter_ns() - t) / 1000)
        after = _switches(pids)
    by_thread = {k: round((n - before.get(k, 0)) / samples, 2) for k, n in after.items()}
    by_thread = {k: v for k, v in by_thread.items() if v >= 0.01}
    return {"p50_us": statistics.median(us), "wakeups": round(sum(by_thread.values()), 2), **by_thread}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wakeups", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not os.path.exists(f"/proc/{os.getpid()}/task"):
        print("error: this counts wake-ups from /proc/PID/task: Linux only", file=sys.stderr)
        sys.exit(1)
    cases: dict[str, Callable[[], Backend]] = {
        "bare": _bare,
        "pool": _pool,
        "conveyor threads": lambda: _conveyor("threads"),
        "conveyor processes": lambda: _conveyor("processes"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, case in cases.items():
            row = _sample(case(), args.samples)
            runs[name].append(row)
            print(f"[round {r + 1}/{args.rounds}] {name:19} p50 {row['p50_us']:6.0f} µs, "
                  f"{row['wakeups']:5.2f} wake-ups per round trip")
    medians = {name: {k: round(statistics.median(row.get(k, 0.0) for row in rows), 2)
                      for k in dict.fromkeys(k for row in rows for k in row)} for name, rows in runs.items()}
    print("\nmedians, wake-ups per round trip by process and thread kind:")
    for name, m in medians.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k not in ("p50_us", "wakeups"))
        print(f"  {name:19} p50 {m['p50_us']:6.0f} µs, {m['wakeups']:5.2f} in all: {parts}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"wakeups-{stamp}.json")
    doc = {"timestamp": stamp, "samples": args.samples, "rounds": args.rounds, "cpus": os.cpu_count(),
           "runs": runs, "medians": medians}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()

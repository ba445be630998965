"""Where a sequential round trip's time goes: context switches per round trip, by backend (issue 19).

    python -m benchmarks.wakeups                # 2,000 round trips per backend, 3 rounds, medians
    python -m benchmarks.wakeups --samples 500 --rounds 1

On a 2-vCPU machine a lone round trip is mostly threads and processes waking one another: each wake-up
is a context switch, and each costs tens of microseconds here whatever Python does around it. This counts
them system-wide with `perf stat -e context-switches -a` (Linux; needs perf and permission for
system-wide events) while one backend runs N sequential `submit(noop).result()` round trips, subtracts
the machine's idle rate measured just before, and divides by N. The backends, in one run:

- bare: the bare pyzmq client -> ROUTER broker -> worker pipeline (benchmarks/bare.py), the floor;
- pool: concurrent.futures.ProcessPoolExecutor(2);
- conveyor threads / conveyor processes: a local cluster, one worker with 2 slots, journal on.

Results go to benchmarks/results/wakeups-<UTC>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import bare
from benchmarks.tasks import noop

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 200
RoundTrip = Callable[[], None]


def _count_switches(run: Callable[[], None]) -> tuple[int, float]:
    """(context switches system-wide, seconds) while run() runs."""
    with tempfile.NamedTemporaryFile("r", suffix=".perf") as out:
        perf = subprocess.Popen(
            ["perf", "stat", "-a", "-x", ",", "-e", "context-switches", "-o", out.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.2)  # perf has opened its counters
        started = time.perf_counter()
        try:
            run()
        finally:
            elapsed = time.perf_counter() - started
            perf.send_signal(signal.SIGINT)
            perf.wait(10)
        for line in out.read().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] == "context-switches":
                return int(fields[0]), elapsed
    raise RuntimeError("perf stat printed no context-switches count")


def _timed(round_trip: RoundTrip, samples: int) -> tuple[float, int, float]:
    """(p50 µs, context switches, seconds) of `samples` round trips after a warm-up."""
    for _ in range(WARMUP):
        round_trip()
    us: list[float] = []

    def run() -> None:
        for _ in range(samples):
            t = time.perf_counter_ns()
            round_trip()
            us.append((time.perf_counter_ns() - t) / 1000)

    switches, elapsed = _count_switches(run)
    return statistics.median(us), switches, elapsed


@contextmanager
def _pool() -> Iterator[RoundTrip]:
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        yield lambda: pool.submit(noop).result(10)


@contextmanager
def _conveyor(mode: str) -> Iterator[RoundTrip]:
    from conveyor import Client, LocalCluster

    state = tempfile.mkdtemp(prefix="conveyor-wakeups-")
    cluster = LocalCluster(workers=1, mode=mode, concurrency=2, quiet=True, journal=os.path.join(state, "j.db"))
    try:
        client = Client(cluster.start())
        try:
            client.wait_for_workers(1, timeout=60)
            view = client if mode == "processes" else client.options(mode=mode)
            yield lambda: view.submit(noop).result(10)
        finally:
            client.close()
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def _bare(samples: int) -> tuple[float, int, float]:
    holder: dict[str, Any] = {}
    switches, elapsed = _count_switches(lambda: holder.update(bare.measure(samples, WARMUP)))
    return holder["p50_us"], switches, elapsed  # (the warm-up and start are inside this count: see note)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wakeups", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if shutil.which("perf") is None:
        print("error: perf is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        sys.exit(1)
    idle_switches, idle_s = _count_switches(lambda: time.sleep(2))
    idle_rate = idle_switches / idle_s
    cases: dict[str, Callable[[], tuple[float, int, float]]] = {
        "bare": lambda: _bare(args.samples),
        "pool": lambda: _with(_pool(), args.samples),
        "conveyor threads": lambda: _with(_conveyor("threads"), args.samples),
        "conveyor processes": lambda: _with(_conveyor("processes"), args.samples),
    }
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, case in cases.items():
            p50, switches, elapsed = case()
            n = args.samples + (WARMUP if name == "bare" else 0)
            per = (switches - idle_rate * elapsed) / n
            rows[name].append({"p50_us": p50, "switches_per_round_trip": per})
            print(f"[round {r + 1}/{args.rounds}] {name:19} p50 {p50:7.0f} µs  {per:5.1f} context switches per round trip")
    summary = {
        name: {k: statistics.median(x[k] for x in runs) for k in ("p50_us", "switches_per_round_trip")}
        for name, runs in rows.items()
    }
    print("\nmedians:")
    for name, s in summary.items():
        print(f"  {name:19} p50 {s['p50_us']:7.0f} µs  {s['switches_per_round_trip']:5.1f} switches")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"wakeups-{stamp}.json")
    doc = {"timestamp": stamp, "samples": args.samples, "rounds": args.rounds, "idle_switches_per_s": idle_rate,
           "cpus": os.cpu_count(), "runs": rows, "medians": summary}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"results: {path}")


def _with(backend: Any, samples: int) -> tuple[float, int, float]:
    with backend as round_trip:
        return _timed(round_trip, samples)


if __name__ == "__main__":
    main()

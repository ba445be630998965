"""Dependencies on a real local cluster (issue 15): fan-in start latency and chain throughput.

    python -m benchmarks.graph                          # 100,000-parent fan-in, 10,000-link chain
    python -m benchmarks.graph --parents 10000 --links 1000 --journal /tmp/j.db   # smaller, durable

One dispatcher and one threads-mode worker, as child processes. Prints one line per case and writes
everything to benchmarks/results/graph-<UTC>.json.

- fan_in: N no-op parents that each return the wall-clock time they ended, and one job whose argument
  is the list of their futures, all in one batch (so the fan-in is linked before any parent runs and
  every value goes by reference). Its body returns how long after the last parent ended it started,
  its N values decoded: the target is 50 ms or less.
- chain: L no-op links, each `prev.then(inc)`, in one batch; the rate (links per second, first submit
  to last result) against the rate of L one-by-one round trips (`submit(inc, x).result()` in a loop):
  the target is 20 % or more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FAN_IN_TARGET_MS = 50.0
CHAIN_TARGET = 0.20


def stamp(_: Any = None) -> float:
    """A no-op parent: the wall-clock time it ended."""
    return time.time()


def gap_ms(stamps: list[float]) -> dict[str, float]:
    """The fan-in's body: how long after the last parent ended it started (its arguments decoded)."""
    started = time.time()
    last = max(stamps)
    return {"gap_ms": (started - last) * 1000.0, "parents": len(stamps), "started": started, "last_parent": last}


def inc(x: int) -> int:
    return x + 1


def case_fan_in(client: Any, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with client.batch():
        parents = [client.submit(stamp) for _ in range(n)]
        fan_in = client.options(keep=True).submit(gap_ms, parents)  # kept: its history is read below
    out = fan_in.result(timeout=600)
    if out["parents"] != n:
        raise AssertionError(f"the fan-in received {out['parents']} values, not {n}")
    # Where the gap went: until the dispatcher assigned it (its attempt's start), then on the worker.
    [view] = client.job_info(fan_in.job_id)
    assigned = view["history"][0]["started"] if view and view.get("history") else None
    split = {}
    if assigned is not None:
        split = {"to_assign_ms": round((assigned - out["last_parent"]) * 1000.0, 2),
                 "assign_to_body_ms": round((out["started"] - assigned) * 1000.0, 2)}
    return {"case": "fan_in", "parents": n, "gap_ms": round(out["gap_ms"], 2), **split,
            "total_s": round(time.perf_counter() - t0, 3), "target_ms": FAN_IN_TARGET_MS,
            "target_met": out["gap_ms"] <= FAN_IN_TARGET_MS}


def case_chain(client: Any, links: int, one_by_one: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    x = 0
    for _ in range(one_by_one):
        x = client.submit(inc, x).result(timeout=60)
    single_rate = one_by_one / (time.perf_counter() - t0)
    if x != one_by_one:
        raise AssertionError(f"one by one: {x} != {one_by_one}")
    t0 = time.perf_counter()
    with client.batch():
        fut = client.submit(inc, 0)
        for _ in range(links - 1):
            fut = fut.then(inc)
    last = fut.result(timeout=600)
    chain_rate = links / (time.perf_counter() - t0)
    if last != links:
        raise AssertionError(f"the chain's last value is {last}, not {links}")
    ratio = chain_rate / single_rate
    return {"case": "chain", "links": links, "chain_per_s": round(chain_rate, 1), "one_by_one": one_by_one,
            "one_by_one_per_s": round(single_rate, 1), "ratio": round(ratio, 3), "target": CHAIN_TARGET,
            "target_met": ratio >= CHAIN_TARGET}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parents", type=int, default=100_000, help="parents of the fan-in")
    parser.add_argument("--links", type=int, default=10_000, help="links of the chain")
    parser.add_argument("--one-by-one", type=int, default=2_000, help="round trips for the one-by-one rate")
    parser.add_argument("--concurrency", type=int, default=8, help="the worker's threads")
    parser.add_argument("--journal", default=None, help="a journal file for the dispatcher (default: none)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    if min(args.parents, args.links, args.one_by_one, args.concurrency) < 1:
        print("error: --parents, --links, --one-by-one and --concurrency must be at least 1", file=sys.stderr)
        return 2
    from conveyor import Client
    from conveyor.client.local import LocalCluster

    cluster = LocalCluster(workers=1, mode="threads", concurrency=args.concurrency, journal=args.journal)
    address = cluster.start()
    results = []
    try:
        with Client(address, max_pending=max(100_000, args.parents + 10)) as client:
            client.wait_for_workers(1)
            for case in (lambda: case_fan_in(client, args.parents),
                         lambda: case_chain(client, args.links, args.one_by_one)):
                result = case()
                print(json.dumps(result))
                results.append(result)
    finally:
        cluster.stop()
    doc = {"benchmark": "graph", "timestamp": datetime.now(UTC).isoformat(), "journal": bool(args.journal),
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"graph-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

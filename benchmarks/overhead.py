"""Where the per-task overhead goes, and what the journal costs.

    python -m benchmarks.overhead                    # CPU µs per task in client, dispatcher, worker
    python -m benchmarks.overhead --prefetch 64      # the same with a prefetching worker
    python -m benchmarks.overhead --journal-cost     # bulk and one-by-one, journal normal / full / off

CPU per task: the psutil CPU time each process (the worker with its children) spent over N
one-by-one no-op tasks and over a bulk map, divided by the task count. Journal cost: medians of
`--repeats` alternating runs with the journal on (`--journal-sync normal` and `full`) and off.
Every run starts its own local cluster (one worker, 2 slots) on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import psutil

from conveyor import Client, LocalCluster

NOOP = "benchmarks.tasks:noop"


def _cpu(proc: psutil.Process, with_children: bool = True) -> float:
    times = proc.cpu_times()
    total = times.user + times.system
    if with_children:
        for child in proc.children(recursive=True):
            try:
                t = child.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
    return total


def _one_by_one(client: Client, n: int) -> None:
    for fut in [client.submit(NOOP, i) for i in range(n)]:
        fut.result()


def _bulk(client: Client, n: int) -> None:
    assert sum(1 for _ in client.map(NOOP, range(n), chunksize=256)) == n


def cpu_per_task(mode: str, prefetch: int | None, tasks: int) -> None:
    shown = "auto" if prefetch is None else prefetch
    with LocalCluster(workers=1, mode=mode, concurrency=2, prefetch=prefetch) as cluster:
        assert cluster.address and cluster.dispatcher is not None
        with Client(cluster.address) as client:
            client.wait_for_workers(1)
            _one_by_one(client, 200)  # warm up every child and import
            me = psutil.Process()
            dispatcher = psutil.Process(cluster.dispatcher.pid)
            worker = psutil.Process(cluster.workers[0].pid)
            runs: list[tuple[str, Callable[[Client, int], None], int]] = [
                ("one-by-one", _one_by_one, tasks),
                ("bulk map (chunksize 256)", _bulk, tasks * 10),
            ]
            for label, run, n in runs:
                before = (_cpu(me, False), _cpu(dispatcher), _cpu(worker))
                started = time.perf_counter()
                run(client, n)
                elapsed = time.perf_counter() - started
                after = (_cpu(me, False), _cpu(dispatcher), _cpu(worker))
                us = [(b - a) / n * 1e6 for a, b in zip(before, after, strict=True)]
                print(
                    f"{mode} prefetch={shown} {label}: {n / elapsed:,.0f} tasks/s; CPU µs per task: "
                    f"client {us[0]:.1f}, dispatcher {us[1]:.1f}, worker {us[2]:.1f}"
                )


def journal_cost(repeats: int, tasks: int) -> None:
    results: dict[str, dict[str, list[float]]] = {k: {"bulk": [], "one": []} for k in ("normal", "full", "off")}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for setting in results:  # alternate, so drifting machine load hits every setting alike
                journal = None if setting == "off" else os.path.join(tmp, f"{setting}-{rep}.db")
                sync = "full" if setting == "full" else "normal"
                cluster = LocalCluster(workers=1, mode="processes", concurrency=2, journal=journal, journal_sync=sync)
                with cluster, Client(cluster.address) as client:
                    client.wait_for_workers(1)
                    _bulk(client, tasks // 10)  # warm up
                    started = time.perf_counter()
                    _bulk(client, tasks * 10)
                    results[setting]["bulk"].append(tasks * 10 / (time.perf_counter() - started))
                    started = time.perf_counter()
                    _one_by_one(client, tasks)
                    results[setting]["one"].append(tasks / (time.perf_counter() - started))
    off = {k: statistics.median(v) for k, v in results["off"].items()}
    for setting in ("normal", "full", "off"):
        medians = {k: statistics.median(v) for k, v in results[setting].items()}
        cost = "" if setting == "off" else "  cost: " + ", ".join(
            f"{k} {100 * (1 - medians[k] / off[k]):.1f} %" for k in ("bulk", "one")
        )
        print(f"journal {setting:>6}: bulk {medians['bulk']:,.0f}/s, one-by-one {medians['one']:,.0f}/s{cost}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="threads", choices=["threads", "processes", "asyncio"])
    parser.add_argument("--prefetch", type=lambda v: None if v == "auto" else int(v), default=None,
                        help="auto (the default) or a fixed number of jobs")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--journal-cost", action="store_true", help="measure the journal instead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.journal_cost:
        journal_cost(args.repeats, args.tasks // 2)
    else:
        cpu_per_task(args.mode, args.prefetch, args.tasks)


if __name__ == "__main__":
    main()

"""CPU-bound speed-up and idle memory of interpreters mode beside threads and processes (issue 20).

Run with a Python >= 3.12 that has the interpreters extra, from the repository root:
    PYTHONPATH=$PWD /tmp/conveyor-py313/bin/python -m benchmarks.interpreters --out /tmp/interp-bench.json
For each mode, one worker with --concurrency N runs N CPU-bound tasks at once (and one alone); the
speed-up is N x (time of one) / (time of N at once). Idle memory is the RSS of the worker process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from typing import Any

import psutil

from conveyor.client import Client, LocalCluster
from conveyor.demo.subinterpreters import free_threaded_pythons

MODES = ("threads", "processes", "interpreters")


def measure(mode: str, concurrency: int, loops: int) -> dict[str, Any]:
    with LocalCluster(workers=1, mode=mode, concurrency=concurrency) as cluster:
        assert cluster.address is not None
        client = Client(cluster.address)
        client.options(mode=mode).submit("benchmarks.spin:spin", 1000).result(timeout=120)  # warm up
        time.sleep(1.0)
        worker = psutil.Process(cluster.workers[0].pid)
        tree = [worker, *worker.children(recursive=True)]
        idle_rss_mib = sum(p.memory_info().rss for p in tree) / 2**20
        t0 = time.perf_counter()
        client.options(mode=mode).submit("benchmarks.spin:spin", loops).result(timeout=600)
        one_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        futures = [client.options(mode=mode).submit("benchmarks.spin:spin", loops) for _ in range(concurrency)]
        for f in futures:
            f.result(timeout=600)
        many_s = time.perf_counter() - t0
        client.close()
    return {"mode": mode, "concurrency": concurrency, "one_task_s": round(one_s, 3),
            "n_tasks_at_once_s": round(many_s, 3), "speedup": round(concurrency * one_s / many_s, 2),
            "idle_rss_mib": round(idle_rss_mib, 1), "processes_in_tree": len(tree)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--loops", type=int, default=5_000_000)
    ap.add_argument("--out", default="interpreters-bench.json")
    args = ap.parse_args()
    gil = getattr(sys, "_is_gil_enabled", None)
    load_before = [round(x, 2) for x in os.getloadavg()]
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "gil_enabled": True if gil is None else bool(gil()),
        "free_threaded_build": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
        # threads mode is measured with this Python only: any other free-threaded one is listed, not used
        "free_threaded_pythons_found": free_threaded_pythons(),
        "cpus": psutil.cpu_count(),
        "modes": [measure(m, args.concurrency, args.loops) for m in MODES],
    }
    # other programs on the machine take cores from the workers: say how busy it was
    result["load_average_before"] = load_before
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

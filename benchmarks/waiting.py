"""What work that waits costs the dispatcher's scheduler (issue 14): memory per job and CPU per assignment.

    python -m benchmarks.waiting                 # 1,000,000 jobs per case
    python -m benchmarks.waiting --jobs 100000   # smaller

Each case runs in a fresh interpreter on the pure Scheduler (no sockets: the figures are the scheduler's
own), and prints one line; all of them go to benchmarks/results/waiting-<UTC>.json.

- assignment: N jobs queued over P priorities and C queue classes (tags), 8 workers of 64 slots that
  serve every class; then every job is assigned and finished. Reported: CPU µs per assignment, and RSS
  per queued job. Flat CPU across P and C means scheduling is O(log n) per task and does not grow with
  the number of classes a worker serves (up to the 100 measured).
- delayed: N jobs due in an hour, their calls offloaded to the journal as a durable dispatcher does
  (Scheduler.offload). Reported: RSS per scheduled job.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def case_assignment(n: int, priorities: int, classes: int) -> dict[str, Any]:
    from conveyor.dispatcher.scheduler import Assign, Scheduler
    from conveyor.protocol.commands import TaskOptions

    s = Scheduler(rng=random.Random(1))
    tags = [frozenset({f"t{i}"}) for i in range(classes)]
    opts = [[TaskOptions(fn="b:noop", tags=tags[c], priority=p) for p in range(priorities)] for c in range(classes)]
    rng = random.Random(2)
    frames = [b"call"]
    before = _rss()
    for i in range(n):
        s.submit(f"j{i:07d}", opts[rng.randrange(classes)][rng.randrange(priorities)], frames, b"client", 0.0)
    queued_rss = _rss() - before
    for w in range(8):
        s.worker_ready(f"w{w}".encode(), name=f"w{w}", host="h", pid=1, mode="threads", concurrency=64,
                       tags=[f"t{i}" for i in range(classes)], credit=64, running=(), now=0.0)
    started = time.process_time()
    assigned = 0
    now = 0.0
    while assigned < n:
        now += 0.001
        s.schedule(now)
        for a in s.take_actions():
            if isinstance(a, Assign):
                for job in a.jobs:
                    assigned += 1
                    s.outcome(a.worker, job.id, job.attempt, True, {}, [], now)
        s.take_actions()
        s.drain_finished()
    cpu = time.process_time() - started
    return {
        "case": "assignment", "jobs": n, "priorities": priorities, "classes": classes,
        "cpu_us_per_assignment": round(cpu / n * 1e6, 3), "rss_bytes_per_queued_job": round(queued_rss / n, 1),
    }


def case_delayed(n: int) -> dict[str, Any]:
    from conveyor.dispatcher.scheduler import Scheduler
    from conveyor.protocol.commands import TaskOptions

    s = Scheduler()
    opts = TaskOptions(fn="b:noop")
    before = _rss()
    for i in range(n):
        job_id = f"d{i:07d}"
        s.submit(job_id, opts, [b"call"], b"client", 0.0, due=3600.0)
        s.offload(job_id, 0.0)  # durable: the journal holds its call
    per_job = (_rss() - before) / n
    return {"case": "delayed", "jobs": n, "rss_bytes_per_scheduled_job": round(per_job, 1),
            "scheduled": s.n_scheduled}


def _run_case(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.waiting", "--case", *args],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.waiting", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # one case, in this (fresh) interpreter
        kind, *rest = args.case
        result = case_delayed(int(rest[0])) if kind == "delayed" else case_assignment(*map(int, rest))
        print(json.dumps(result))
        return 0
    results = []
    for priorities, classes in ((1, 1), (10, 1), (1, 100), (10, 100)):
        r = _run_case(["assignment", str(args.jobs), str(priorities), str(classes)])
        print(f"{args.jobs:,} queued over {priorities} priorities and {classes} classes: "
              f"{r['cpu_us_per_assignment']} µs CPU per assignment, {r['rss_bytes_per_queued_job']} B per queued job")
        results.append(r)
    r = _run_case(["delayed", str(args.jobs)])
    print(f"{args.jobs:,} delayed jobs (calls in the journal): {r['rss_bytes_per_scheduled_job']} B each")
    results.append(r)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"waiting-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"results": results, "python": sys.version, "cpus": os.cpu_count()}, indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

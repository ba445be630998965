"""What schedules cost the dispatcher (issue 16): 10,000 schedules firing every minute.

    python -m benchmarks.schedules                       # 10,000 schedules, 3 minutes
    python -m benchmarks.schedules --schedules 1000 --minutes 2

A real dispatcher (with its journal) loads N schedules `* * * * *` from a schedules file; one threads
worker runs the jobs they create (a no-op). The dispatcher's CPU time is sampled every second (with a
STATUS query, which costs it a little too); the same run with no schedules is the baseline. Reported:

- between fires: the dispatcher's CPU, as % of one core, from the moment a fire's jobs are all done until
  the next minute (what holding N schedules costs: one heap, no timer per schedule);
- per fire: CPU seconds from the minute until its jobs are done (creating, journaling, assigning and
  finishing N jobs), and how long that took.

Results go to benchmarks/results/schedules-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from conveyor.client import Client

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "conveyor", *cmd], stdout=subprocess.PIPE,
                            stderr=open(log, "ab"), cwd=ROOT)


def run(n: int, minutes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schedules.toml"
        path.write_text("".join(
            f'[schedules.s{i:05d}]\ncron = "* * * * *"\ntask = "benchmarks.tasks:noop"\n' for i in range(n)))
        dispatcher = _start(["dispatcher", "--bind", "tcp://127.0.0.1:0", "--journal", f"{tmp}/journal.db",
                             "--schedules", str(path), "--log-level", "warning"], Path(tmp) / "dispatcher.log")
        assert dispatcher.stdout is not None
        address = dispatcher.stdout.readline().decode().strip()
        worker = _start(["worker", "--connect", address, "--mode", "threads", "--concurrency", "64",
                         "--log-level", "warning"], Path(tmp) / "worker.log")
        proc = psutil.Process(dispatcher.pid)
        client = Client(address)
        try:
            client.wait_for_workers(1, timeout=60)
            samples: list[tuple[float, float, int]] = []  # (wall, CPU seconds, unfinished jobs)
            end = (time.time() // 60 + 1 + minutes) * 60
            while time.time() < end:
                t = proc.cpu_times()
                status = client.status()
                samples.append((time.time(), t.user + t.system, status["queued"] + status["running"]))
                time.sleep(1.0)
        finally:
            client.close()
            for p in (worker, dispatcher):
                p.terminate()
                p.wait(30)
            if dispatcher.stdout is not None:
                dispatcher.stdout.close()
    return summarize(n, samples)


def summarize(n: int, samples: list[tuple[float, float, int]]) -> dict[str, Any]:
    """Split the samples at each minute: the fire (until nothing is unfinished) and the quiet rest."""
    fires, quiet_cpu, quiet_s = [], 0.0, 0.0
    minutes = sorted({int(w // 60) for w, _, _ in samples})
    for m in minutes[1:]:  # the first minute is partial (startup)
        inside = [s for s in samples if int(s[0] // 60) == m]
        if len(inside) < 8:
            continue
        done = 0 if n == 0 else next((i for i, s in enumerate(inside) if i > 0 and s[2] == 0), None)
        if done is None:
            continue
        before = [s for s in samples if s[0] < m * 60][-1]  # the last sample before the minute
        if n:
            fires.append({"cpu_s": round(inside[done][1] - before[1], 3),
                          "took_s": round(inside[done][0] - m * 60, 2)})
        rest = inside[done:]
        quiet_cpu += rest[-1][1] - rest[0][1]
        quiet_s += rest[-1][0] - rest[0][0]
    return {
        "schedules": n, "fires": fires,
        "between_fires_cpu_percent": round(100 * quiet_cpu / quiet_s, 3) if quiet_s else None,
        "quiet_seconds_measured": round(quiet_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--minutes", type=int, default=3)
    args = parser.parse_args(argv)
    baseline = run(0, args.minutes)
    result = run(args.schedules, args.minutes)
    result["baseline_cpu_percent"] = baseline["between_fires_cpu_percent"]
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"schedules-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

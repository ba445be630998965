"""What a standby pair costs, and how fast it fails over (issue 17).

    python -m benchmarks.standby                        # 300 latency samples, 20,000 jobs, 10 failovers
    python -m benchmarks.standby --failovers 5 --jobs 5000

Real processes on 127.0.0.1, each dispatcher with its own journal (sync normal):
- ACCEPTED latency: one job at a time, the time from submit() to its ACCEPTED; a single dispatcher
  against a pair in sync (ACCEPTED waits for the backup's commit too);
- acceptance throughput: a burst of no-op jobs (no worker: only acceptance is measured), jobs/s until
  the last ACCEPTED;
- failover: `kill -9` of the active, then a client-like probe (a STATUS every 50 ms to the other, which is
  the Binary Star vote) until it answers as active; the killed one is started again (it joins passive)
  and the pair is back in sync before the next kill. Default --failover-timeout (2 s).

Results go to benchmarks/results/standby-<UTC>.json. Timing on a shared machine is noisy: the load
average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zmq

from conveyor.client import Client
from conveyor.protocol import Cmd, encode
from conveyor.protocol import commands as c
from conveyor.protocol.frames import split

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "conveyor", *args, "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), cwd=ROOT)


class _Pair:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        p = [_port() for _ in range(4)]
        self.addr = {"primary": f"tcp://127.0.0.1:{p[0]}", "backup": f"tcp://127.0.0.1:{p[1]}"}
        self.pair = {"primary": f"tcp://127.0.0.1:{p[2]}", "backup": f"tcp://127.0.0.1:{p[3]}"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> None:
        other = "backup" if role == "primary" else "primary"
        self.procs[role] = _start(["dispatcher", "--bind", self.addr[role], "--journal", str(self.tmp / f"{role}.db"),
                                   "--role", role, "--peer", self.pair[other], "--pair-bind", self.pair[role]],
                                  self.tmp / f"{role}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)


def _state(address: str, timeout_s: float = 0.5) -> str | None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        cmd, raw, _ = split(sock.recv_multipart())
        if cmd == Cmd.REDIRECT:
            return "passive"
        body = c.decode_body(cmd, raw)
        pair = body.dispatcher.get("pair", {})
        return f"{pair.get('state')}/{pair.get('replication')}"
    finally:
        sock.close()


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _acceptance(address: str | list[str], samples: int, jobs: int) -> dict[str, Any]:
    with Client(address, connect_timeout=20) as client:
        conn = client._conn
        assert conn is not None
        latencies = []
        for i in range(samples):
            started = time.perf_counter()
            f = client.submit("benchmarks.tasks:noop", i)
            conn.wait_accepted([f], 10)
            latencies.append(time.perf_counter() - started)
            assert f._accepted
        started = time.perf_counter()
        futures = [client.submit("benchmarks.tasks:noop", i) for i in range(jobs)]
        conn.wait_accepted(futures, 300)
        seconds = time.perf_counter() - started
        assert all(f._accepted for f in futures)
    latencies.sort()
    return {
        "accepted_latency_ms": {"p50": round(1000 * statistics.median(latencies), 3),
                                "p99": round(1000 * _p99(latencies), 3),
                                "samples": samples},
        "acceptance_jobs_per_s": round(jobs / seconds), "jobs": jobs,
    }


def _p99(ordered: list[float]) -> float:
    """The nearest-rank 99th percentile of sorted samples (the largest of fewer than 100)."""
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def run(samples: int, jobs: int, failovers: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = _port()
        single = _start(["dispatcher", "--bind", f"tcp://127.0.0.1:{port}", "--journal", f"{tmp}/single.db"],
                        Path(tmp) / "single.log")
        try:
            out["single"] = _acceptance(f"tcp://127.0.0.1:{port}", samples, jobs)
        finally:
            single.terminate()
            single.wait(15)
    with tempfile.TemporaryDirectory() as tmp:
        pair = _Pair(Path(tmp))
        try:
            pair.start("primary")
            pair.start("backup")
            _wait(lambda: _state(pair.addr["primary"]) == "active/in-sync", 30, "the pair in sync")
            out["pair_in_sync"] = _acceptance([pair.addr["primary"], pair.addr["backup"]], samples, jobs)
            times = []
            active = "primary"
            for _ in range(failovers):
                other = "backup" if active == "primary" else "primary"
                _wait(lambda: _state(pair.addr[active]) == "active/in-sync", 60, "in sync before the kill")  # noqa: B023
                killed = time.monotonic()
                os.kill(pair.procs[active].pid, signal.SIGKILL)
                pair.procs[active].wait()
                _wait(lambda: (_state(pair.addr[other], 0.2) or "").startswith("active"), 60, "the takeover")  # noqa: B023
                times.append(time.monotonic() - killed)
                pair.start(active)  # the old active joins passive
                _wait(lambda: _state(pair.addr[active]) == "passive", 30, "the rejoin")  # noqa: B023
                active = other
            times.sort()
            out["failover_s"] = {
                "samples": [round(t, 3) for t in times], "p50": round(statistics.median(times), 3),
                "p99": round(_p99(times), 3), "failover_timeout_s": 2.0,
            } if times else {}
        finally:
            pair.stop()
    out["loadavg"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--failovers", type=int, default=10)
    args = parser.parse_args(argv)
    result = {"benchmark": "standby", "at": datetime.now(UTC).isoformat(timespec="seconds"),
              **run(args.samples, args.jobs, args.failovers)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"standby-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

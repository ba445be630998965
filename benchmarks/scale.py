"""How the dispatcher scales: many connected workers, a long queue (issue 6).

    python -m benchmarks.scale                      # 1,000 workers, 1,000,000 queued tasks, then the sweeps
    python -m benchmarks.scale --smoke              # tiny sizes, under 20 s (CI)
    python -m benchmarks.scale --workers 1000 --tasks 1000000 --no-sweep

One run: a real dispatcher subprocess (`python -m conveyor dispatcher`, journal on unless
`--no-journal`), W simulated workers (zmq DEALER sockets speaking CNV/2 from `conveyor.protocol`,
spread over a few processes, heartbeating every second) and one real `conveyor.Client`.

- Phase 1 (submit): the workers are registered with credit 0; the client submits N no-op tasks
  (`Client.submit`, one job each). Measured: wall time until the dispatcher reports all N queued
  (every SUBMIT handled, journal committed), the dispatcher's CPU per accepted job and its RSS.
- Phase 2 (drain): the workers register again with credit (`--concurrency` slots each) and answer
  every ASSIGN at once with RESULTS. Measured: wall time until the client holds every result,
  throughput, and the dispatcher's CPU per task (psutil user + system time / N).

Sweeps (unless `--no-sweep`): the same run at other queue lengths and worker counts, `--repeats`
times each (medians, min and max), and once with the journal off. If scheduling is O(1) per task,
CPU per task stays flat across both. During each run the dispatcher is sampled twice a second
(CPU, RSS, queued and finished counts), which also gives CPU per task against the queue length as
it grows (submit) and shrinks (drain) within one run.

Writes benchmarks/results/scale-<UTC timestamp>.json (with the machine's description) and, with
matplotlib (`pip install '.[demo]'`), docs/scaling.png (`--plot PATH`, `--no-plot`).
Every process started here is stopped at the end, also on Ctrl-C or an error.

Over 500 lines on purpose: a benchmark script read top to bottom (simulated workers, the run, the
sweeps, the plot); splitting it would scatter one experiment over files.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import psutil
import zmq

from benchmarks.machine import describe_machine, describe_source, load_average
from conveyor import Client
from conveyor.client.local import conveyor_command
from conveyor.protocol import Cmd, ProtocolError, decode, encode
from conveyor.protocol.payload import encode_value

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
PLOT_PATH = os.path.join(REPO_ROOT, "docs", "scaling.png")
NOOP = "benchmarks.tasks:noop"
HEARTBEAT = 1.0  # seconds between a simulated worker's heartbeats (the dispatcher's default interval)
SAMPLE_EVERY = 0.5  # seconds between samples of the dispatcher
STOP_TIMEOUT = 10.0
MIN_INTERVAL_TASKS = 500  # a sampling interval counts in the per-queue-length curve only past this many tasks


# --- the simulated workers (a child process: python -m benchmarks.scale --simulate N ...) ---------------


@dataclass(slots=True)
class SimWorker:
    sock: zmq.Socket[bytes]
    name: str
    session: str = ""
    answered: bool = False  # the dispatcher answered the last READY (any HEARTBEAT after it)
    seq: int = 0  # the number of its last RESULTS (protocol 2: numbered, applied in order)


def _ready(w: SimWorker, concurrency: int, credit: int) -> list[bytes]:
    body = {
        "name": w.name,
        "host": "127.0.0.1",
        "pid": os.getpid(),
        "mode": "threads",
        "concurrency": concurrency,
        "tags": [],
        "session": w.session,
        "prefetch": 0,
        "credit": credit,
        "running": [],
        "results_seq": w.seq + 1,
    }
    return encode(Cmd.READY, body)


def simulate(connect: str, n: int, concurrency: int, label: str) -> int:
    """Run n simulated workers on one thread until stdin says `stop` (or closes).

    stdin commands: `go` (register again with `concurrency` credit: start taking tasks), `stop`
    (GOODBYE on every socket, exit). stdout: `registered` once every worker was answered, `going`
    once every worker was answered after `go`, and at exit one JSON line of counters.
    """
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, n + 64)
    result = encode_value(None)  # the RESULTS value frame of every task: the no-op's return value
    workers: list[SimWorker] = []
    by_sock: dict[zmq.Socket[bytes], SimWorker] = {}
    poller = zmq.Poller()
    stdin = sys.stdin.fileno()
    poller.register(stdin, zmq.POLLIN)
    for i in range(n):
        sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, f"w-{uuid.uuid4().hex[:12]}".encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(connect)
        w = SimWorker(sock, f"sim-{label}-{i}", uuid.uuid4().hex[:12])
        workers.append(w)
        by_sock[sock] = w
        poller.register(sock, zmq.POLLIN)
    credit = 0
    for w in workers:
        w.sock.send_multipart(_ready(w, concurrency, credit))
    pending_report: str | None = "registered"
    done = assigns = reconnects = 0
    next_beat = time.monotonic() + HEARTBEAT
    beat = encode(Cmd.HEARTBEAT, {"role": "worker"})
    goodbye = encode(Cmd.GOODBYE, {})
    stopping = False
    try:
        while not stopping:
            timeout = max(0.0, next_beat - time.monotonic())
            for item, _ in poller.poll(int(timeout * 1000) + 1):
                if item == stdin:
                    line = os.read(stdin, 4096).decode()
                    if not line or "stop" in line:
                        stopping = True
                    elif "go" in line:
                        credit = concurrency
                        for w in workers:  # a new session: the dispatcher re-registers it, with credit
                            w.session = uuid.uuid4().hex[:12]
                            w.answered = False
                            w.sock.send_multipart(_ready(w, concurrency, credit))
                        pending_report = "going"
                    continue
                assert isinstance(item, zmq.Socket)
                w = by_sock[item]
                while True:
                    try:
                        parts = item.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = decode(parts)
                    except ProtocolError:
                        continue
                    if msg.cmd == Cmd.ASSIGN:
                        entries = [[e[0], e[1], True, {"duration": 0.0}, 1] for e in msg.body["tasks"]]
                        w.seq += 1
                        body = {"seq": w.seq, "outcomes": entries}
                        item.send_multipart(encode(Cmd.RESULTS, body, result * len(entries)))
                        done += len(entries)
                        assigns += 1
                    elif msg.cmd == Cmd.HEARTBEAT:
                        w.answered = True
                    elif msg.cmd == Cmd.RECONNECT:  # the dispatcher lost us (missed heartbeats)
                        reconnects += 1
                        item.send_multipart(_ready(w, concurrency, credit))
                    elif msg.cmd in (Cmd.SHUTDOWN, Cmd.ERROR):
                        stopping = True
            now = time.monotonic()
            if now >= next_beat:
                for w in workers:
                    w.sock.send_multipart(beat)
                next_beat = now + HEARTBEAT
            if pending_report is not None and all(w.answered for w in workers):
                print(pending_report, flush=True)
                pending_report = None
        for w in workers:
            with contextlib.suppress(zmq.ZMQError):
                w.sock.send_multipart(goodbye, zmq.NOBLOCK)
    finally:
        for w in workers:
            w.sock.close(linger=200)
        ctx.term()
    print(json.dumps({"done": done, "assigns": assigns, "reconnects": reconnects}), flush=True)
    return 0


# --- processes of one run -------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM if this benchmark dies (even by SIGKILL), so nothing leaks."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid, wait, then SIGKILL by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: nothing after {timeout:g} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline().decode().strip()
            if line:
                return line
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


@dataclass(slots=True)
class Sample:
    t: float  # seconds since the run started
    phase: str  # idle | submit | drain
    queued: int
    succeeded: int
    workers: int
    cpu: float  # dispatcher CPU seconds so far (user + system)
    rss: int  # dispatcher resident set size, bytes


@dataclass(slots=True)
class RunResult:
    workers: int
    tasks: int
    journal: bool
    procs: int
    concurrency: int
    idle_cpu_ms_per_s: float = 0.0  # the dispatcher with W workers registered and nothing to do (heartbeats)
    rss_idle: int = 0
    submit_loop_seconds: float = 0.0  # the client's submit() calls alone
    submit_seconds: float = 0.0  # until the dispatcher held every job queued
    submit_rate: float = 0.0
    submit_cpu_us: float = 0.0  # dispatcher CPU per accepted job
    rss_full: int = 0  # with every job queued
    rss_peak: int = 0
    bytes_per_job: float = 0.0
    client_rss_full: int = 0
    drain_seconds: float = 0.0  # from `go` to the client holding every result
    drain_rate: float = 0.0
    drain_cpu_us: float = 0.0  # dispatcher CPU per task while draining
    sim_cpu_us: float = 0.0  # simulated workers' CPU per task while draining (all processes)
    client_cpu_us: float = 0.0  # this process's CPU per task while draining (the client's I/O thread)
    workers_registered_at_end: int = 0
    reconnects: int = 0
    load_before: list[float] | None = None
    samples: list[Sample] = field(default_factory=list)


class Sampler(threading.Thread):
    """Twice a second: the dispatcher's CPU and RSS (psutil) and its queued/succeeded counts (STATUS)."""

    def __init__(self, monitor: Client, proc: psutil.Process, started: float):
        super().__init__(name="scale-sampler", daemon=True)
        self.monitor = monitor
        self.proc = proc
        self.started = started
        self.phase = "idle"
        self.samples: list[Sample] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def take(self) -> Sample:
        cpu, rss = _cpu(self.proc), int(self.proc.memory_info().rss)
        status = self.monitor.status(timeout=30.0)
        s = Sample(
            round(time.monotonic() - self.started, 3), self.phase, int(status["queued"]),
            int(status["totals"]["succeeded"]), len(status["workers"]), cpu, rss,
        )
        self.samples.append(s)
        return s

    def run(self) -> None:
        try:
            while not self.halt.wait(SAMPLE_EVERY):
                self.take()
        except BaseException as exc:  # reported by the run, which then fails
            self.error = exc


def _wait_for(cond: Any, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:g} s")
        time.sleep(every)


def one_run(workers: int, tasks: int, *, journal: bool, procs: int, concurrency: int, quiet: bool) -> RunResult:
    """Start a dispatcher and the simulated workers, submit `tasks`, drain them, stop everything."""
    res = RunResult(workers, tasks, journal, procs, concurrency, load_before=load_average())

    def say(text: str) -> None:
        if not quiet:
            print("   ", text, flush=True)

    started = time.monotonic()
    # Generous bounds on every wait: 1M tasks take about a minute each way on 2 vCPUs.
    budget = 120.0 + tasks / 2000.0
    children: list[subprocess.Popen[bytes]] = []
    clients: list[Client] = []
    sampler: Sampler | None = None
    with tempfile.TemporaryDirectory(prefix="conveyor-scale-") as tmp:
        log_path = os.path.join(tmp, "dispatcher.log")
        try:
            with open(log_path, "wb") as log_file:
                args = ["dispatcher", "--bind", "tcp://127.0.0.1:0", "--log-level", "warning",
                        "--max-queued", str(max(tasks + 1000, 1_000_000))]
                args += ["--journal", os.path.join(tmp, "journal.db")] if journal else ["--no-journal"]
                dispatcher = subprocess.Popen(
                    conveyor_command(*args), stdout=subprocess.PIPE, stderr=log_file, cwd=REPO_ROOT,
                    preexec_fn=_die_with_parent, start_new_session=True,
                )
            children.append(dispatcher)
            address = _read_line(dispatcher, 30.0, "the dispatcher's endpoint")
            dproc = psutil.Process(dispatcher.pid)
            sizes = [workers // procs + (1 if i < workers % procs else 0) for i in range(procs)]
            sims: list[subprocess.Popen[bytes]] = []
            for i, n in enumerate(sizes):
                sim = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.scale", "--simulate", str(n), "--connect", address,
                     "--concurrency", str(concurrency), "--label", str(i)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT,
                    preexec_fn=_die_with_parent, start_new_session=True,
                )
                children.append(sim)
                sims.append(sim)
            for sim in sims:
                line = _read_line(sim, 60.0, "simulated workers registering")
                if line != "registered":
                    raise RuntimeError(f"simulated workers said {line!r}")
            monitor = Client(address, connect_timeout=30.0)
            clients.append(monitor)
            _wait_for(lambda: len(monitor.status()["workers"]) >= workers, 30.0, f"{workers} workers registered")
            say(f"{workers} workers registered ({time.monotonic() - started:.1f} s)")
            sampler = Sampler(monitor, dproc, started)
            cpu0, t0 = _cpu(dproc), time.monotonic()
            time.sleep(2.0)  # idle: what heartbeating W workers costs
            res.idle_cpu_ms_per_s = (_cpu(dproc) - cpu0) / (time.monotonic() - t0) * 1000
            res.rss_idle = int(dproc.memory_info().rss)
            sampler.take()
            sampler.start()

            # Phase 1: submit everything while no worker has credit.
            client = Client(address, max_pending=tasks + 1000, connect_timeout=30.0)
            clients.append(client)
            me = psutil.Process()
            sampler.phase = "submit"
            cpu0, t0 = _cpu(dproc), time.monotonic()
            futures = [client.submit(NOOP, i) for i in range(tasks)]
            res.submit_loop_seconds = time.monotonic() - t0
            # JOB_INFO travels behind every SUBMIT on this connection: its answer means all were handled.
            if client.job_info(futures[-1].job_id, timeout=budget)[0] is None:
                raise RuntimeError("the last job submitted is unknown to the dispatcher")
            _wait_for(lambda: monitor.status()["queued"] >= tasks, budget, f"{tasks} tasks queued", every=0.02)
            res.submit_seconds = time.monotonic() - t0
            res.submit_cpu_us = (_cpu(dproc) - cpu0) / tasks * 1e6
            res.submit_rate = tasks / res.submit_seconds
            time.sleep(0.3)  # the journal commit of the last turn and its ACCEPTED
            res.rss_full = int(dproc.memory_info().rss)
            res.bytes_per_job = (res.rss_full - res.rss_idle) / tasks
            res.client_rss_full = int(me.memory_info().rss)
            say(f"submitted {tasks:,} in {res.submit_seconds:.1f} s (client loop {res.submit_loop_seconds:.1f} s), "
                f"dispatcher RSS {res.rss_full / 2**20:,.0f} MiB")

            # Phase 2: the workers take credit; every ASSIGN is answered at once.
            sampler.phase = "drain"
            sim_procs = [psutil.Process(s.pid) for s in sims]
            sim0 = sum(_cpu(p) for p in sim_procs)
            me0 = _cpu(me)
            cpu0, t0 = _cpu(dproc), time.monotonic()
            for sim in sims:
                assert sim.stdin is not None
                sim.stdin.write(b"go\n")
                sim.stdin.flush()
            deadline = t0 + budget
            for fut in futures:
                fut.result(timeout=max(0.1, deadline - time.monotonic()))
            res.drain_seconds = time.monotonic() - t0
            res.drain_cpu_us = (_cpu(dproc) - cpu0) / tasks * 1e6
            res.sim_cpu_us = (sum(_cpu(p) for p in sim_procs) - sim0) / tasks * 1e6
            res.client_cpu_us = (_cpu(me) - me0) / tasks * 1e6
            res.drain_rate = tasks / res.drain_seconds
            del futures
            sampler.halt.set()
            sampler.join(STOP_TIMEOUT)
            if sampler.error is not None:
                raise sampler.error
            last = sampler.take()
            res.workers_registered_at_end = last.workers
            res.rss_peak = max(s.rss for s in sampler.samples)
            say(f"drained in {res.drain_seconds:.1f} s: {res.drain_rate:,.0f} tasks/s, "
                f"dispatcher {res.drain_cpu_us:.1f} µs CPU per task")
            for sim in sims:  # say goodbye, collect the counters
                assert sim.stdin is not None
                with contextlib.suppress(OSError):
                    sim.stdin.write(b"stop\n")
                    sim.stdin.flush()
            for sim in sims:
                with contextlib.suppress(TimeoutError, RuntimeError, ValueError):
                    res.reconnects += int(json.loads(_read_line(sim, 10.0, "counters"))["reconnects"])
        except BaseException:
            with contextlib.suppress(OSError):
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    tail = f.read()[-2000:]
                if tail.strip():
                    print(f"dispatcher log (tail):\n{tail}", file=sys.stderr)
            raise
        finally:
            if sampler is not None:
                sampler.halt.set()
                if sampler.is_alive():
                    sampler.join(STOP_TIMEOUT)
                res.samples = sampler.samples
            for c in clients:
                with contextlib.suppress(Exception):
                    c.close()
            for proc in reversed(children):  # workers first, then the dispatcher
                _stop_process(proc)
    return res


# --- analysis -------------------------------------------------------------------------------------


def per_queue_length(samples: Sequence[Sample], phase: str) -> list[tuple[float, float]]:
    """(queue length in the middle of the interval, dispatcher CPU µs per job in it) for each sampling interval."""
    out: list[tuple[float, float]] = []
    for a, b in itertools.pairwise(samples):
        if b.phase != phase or a.phase not in (phase, "idle" if phase == "submit" else "submit"):
            continue
        n = (b.queued - a.queued) if phase == "submit" else (b.succeeded - a.succeeded)
        if n >= MIN_INTERVAL_TASKS:
            out.append(((a.queued + b.queued) / 2, (b.cpu - a.cpu) / n * 1e6))
    return out


def binned(points: Sequence[tuple[float, float]], edges: Sequence[float]) -> list[dict[str, float]]:
    """Medians of the per-interval CPU by queue-length bin (log-spaced edges)."""
    out = []
    for lo, hi in itertools.pairwise(edges):
        ys = [y for x, y in points if lo <= x < hi]
        if ys:
            out.append({"queue_from": lo, "queue_to": hi, "intervals": len(ys), "median_us": statistics.median(ys),
                        "min_us": min(ys), "max_us": max(ys)})
    return out


def summarize(runs: Sequence[RunResult]) -> dict[str, Any]:
    keys = ("submit_seconds", "submit_rate", "submit_cpu_us", "rss_full", "bytes_per_job", "drain_seconds",
            "drain_rate", "drain_cpu_us", "sim_cpu_us", "client_cpu_us", "idle_cpu_ms_per_s")
    out: dict[str, Any] = {"workers": runs[0].workers, "tasks": runs[0].tasks, "journal": runs[0].journal,
                           "repeats": len(runs)}
    for k in keys:
        values = [float(getattr(r, k)) for r in runs]
        out[k] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def print_table(groups: Sequence[dict[str, Any]]) -> None:
    head = (f"{'workers':>7} {'tasks':>9} {'jrnl':>4} {'n':>2} | {'submit s':>8} {'jobs/s':>8} {'CPU µs':>12} "
            f"{'RSS':>9} {'B/job':>6} | {'drain s':>7} {'tasks/s':>8} {'CPU µs':>12} {'idle ms/s':>9}")
    print(head)
    print("-" * len(head))

    def m(g: dict[str, Any], k: str) -> float:
        return float(g[k]["median"])

    def spread(g: dict[str, Any], k: str) -> str:
        return f"{m(g, k):.1f}" + (f" ±{(g[k]['max'] - g[k]['min']) / 2:.1f}" if g["repeats"] > 1 else "")

    for g in groups:
        print(f"{g['workers']:>7,} {g['tasks']:>9,} {'on' if g['journal'] else 'off':>4} {g['repeats']:>2} | "
              f"{m(g, 'submit_seconds'):>8.1f} {m(g, 'submit_rate'):>8,.0f} {spread(g, 'submit_cpu_us'):>12} "
              f"{_mib(m(g, 'rss_full')):>9} {m(g, 'bytes_per_job'):>6,.0f} | {m(g, 'drain_seconds'):>7.1f} "
              f"{m(g, 'drain_rate'):>8,.0f} {spread(g, 'drain_cpu_us'):>12} {m(g, 'idle_cpu_ms_per_s'):>9.1f}")
    print("CPU µs: dispatcher CPU per task (median ±half the min-max range over repeats); B/job: RSS growth per "
          "queued job; idle: dispatcher CPU with the workers registered and nothing queued (heartbeats)")


def plot(doc: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install '.[demo]'): no plot", file=sys.stderr)
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    main = doc["main"]
    for phase, color, label in (("submit", "tab:blue", "submit (accept + journal)"),
                                ("drain", "tab:orange", "drain (assign + result + deliver)")):
        curve = main["per_queue_length"][phase]
        if curve:
            xs = [math.sqrt(max(b["queue_from"], 1) * b["queue_to"]) for b in curve]
            ax1.plot(xs, [b["median_us"] for b in curve], "o-", color=color, ms=3,
                     label=f"{label}, within the {main['tasks']:,} run")
    for phase, color in (("submit", "tab:blue"), ("drain", "tab:orange")):
        pts = [g for g in doc["queue_sweep"]]
        if pts:
            xs = [g["tasks"] for g in pts]
            ys = [g[f"{phase}_cpu_us"]["median"] for g in pts]
            err = [[y - g[f"{phase}_cpu_us"]["min"] for g, y in zip(pts, ys, strict=True)],
                   [g[f"{phase}_cpu_us"]["max"] - y for g, y in zip(pts, ys, strict=True)]]
            ax1.errorbar(xs, ys, yerr=err, fmt="s", color=color, mfc="white", capsize=3,
                         label=f"{phase}, whole runs of N tasks (x = N)")
    ax1.set_xscale("log")
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("queued jobs")
    ax1.set_ylabel("dispatcher CPU per task (µs)")
    ax1.set_title(f"Queue length ({main['workers']:,} workers)")
    ax1.legend(fontsize=7, loc="upper right")
    ax1.grid(alpha=0.3)
    pts = doc["worker_sweep"]
    if pts:
        xs = [g["workers"] for g in pts]
        for phase, color in (("submit", "tab:blue"), ("drain", "tab:orange")):
            ys = [g[f"{phase}_cpu_us"]["median"] for g in pts]
            err = [[y - g[f"{phase}_cpu_us"]["min"] for g, y in zip(pts, ys, strict=True)],
                   [g[f"{phase}_cpu_us"]["max"] - y for g, y in zip(pts, ys, strict=True)]]
            ax2.errorbar(xs, ys, yerr=err, fmt="o-", color=color, capsize=3, label=f"{phase}: CPU per task")
        ax2.set_xscale("log")
        ax2.set_ylim(bottom=0)
        ax2.set_xlabel("connected workers")
        ax2.set_ylabel("dispatcher CPU per task (µs)")
        ax2.set_title(f"Workers ({pts[0]['tasks']:,} tasks)")
        ax2.grid(alpha=0.3)
        twin = ax2.twinx()
        twin.plot(xs, [g["drain_rate"]["median"] for g in pts], "^--", color="tab:green", label="drain tasks/s")
        twin.set_ylabel("drain throughput (tasks/s)")
        twin.set_ylim(bottom=0)
        lines = ax2.get_legend_handles_labels()
        lines2 = twin.get_legend_handles_labels()
        ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    fig.suptitle(f"Conveyor dispatcher scaling, {doc['machine'].get('cpu_usable')} vCPUs, journal on "
                 f"(flat = O(1) per task)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- main -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    workers: int
    tasks: int
    procs: int
    concurrency: int
    repeats: int
    main_repeats: int
    queue_sweep: list[int]  # queue lengths at `workers` (the main size is added)
    worker_sweep: list[int]  # worker counts at `sweep_tasks`
    sweep_tasks: int
    journal: bool
    journal_off_point: bool  # also `workers` x `sweep_tasks` with the journal off


def _groups(runs: list[RunResult]) -> Iterator[list[RunResult]]:
    seen: dict[tuple[int, int, bool], list[RunResult]] = {}
    for r in runs:
        seen.setdefault((r.workers, r.tasks, r.journal), []).append(r)
    yield from seen.values()


def run_plan(plan: Plan, quiet: bool) -> tuple[list[RunResult], list[RunResult]]:
    """The main runs, then the sweep runs, interleaved by repeat so load drift hits every point alike."""
    def go(w: int, n: int, journal: bool) -> RunResult:
        procs = max(1, min(plan.procs, w))
        print(f"run: {w:,} workers in {procs} processes, {n:,} tasks, journal {'on' if journal else 'off'}",
              flush=True)
        return one_run(w, n, journal=journal, procs=procs, concurrency=plan.concurrency, quiet=quiet)

    main = [go(plan.workers, plan.tasks, plan.journal) for _ in range(plan.main_repeats)]
    points: list[tuple[int, int, bool]] = []
    for n in plan.queue_sweep:
        if n != plan.tasks:
            points.append((plan.workers, n, plan.journal))
    for w in plan.worker_sweep:
        if (w, plan.sweep_tasks, plan.journal) not in points and not (w == plan.workers and
                                                                      plan.sweep_tasks == plan.tasks):
            points.append((w, plan.sweep_tasks, plan.journal))
    if plan.journal_off_point:
        points.append((plan.workers, plan.sweep_tasks, not plan.journal))
    sweep = [go(w, n, j) for _ in range(plan.repeats) for w, n, j in points]
    return main, sweep


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the finally blocks stop every child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (50 workers, 5,000 tasks), < 20 s")
    parser.add_argument("--workers", type=int, default=None, help="simulated workers [1000]")
    parser.add_argument("--tasks", type=int, default=None, help="tasks queued then drained [1,000,000]")
    parser.add_argument("--procs", type=int, default=None, help="processes holding the simulated workers [4]")
    parser.add_argument("--concurrency", type=int, default=2, help="slots (credit) per simulated worker [2]")
    parser.add_argument("--repeats", type=int, default=None, help="runs per sweep point [3]")
    parser.add_argument("--main-repeats", type=int, default=1, help="runs at the main size [1]")
    parser.add_argument("--no-sweep", action="store_true", help="the main size only")
    parser.add_argument("--no-journal", action="store_true", help="run the dispatcher with --no-journal")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for scale-<UTC timestamp>.json")
    parser.add_argument("--plot", default=PLOT_PATH, help="where to save the figure [docs/scaling.png]")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="only the table")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot from a scale-*.json")
    parser.add_argument("--simulate", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulate is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us through stdin, or SIGTERM
        return simulate(args.connect, args.simulate, args.concurrency, args.label)

    if args.smoke:
        workers, tasks = args.workers or 50, args.tasks or 5_000
        plan = Plan(workers, tasks, args.procs or 2, args.concurrency, args.repeats or 1, args.main_repeats,
                    queue_sweep=[1_000], worker_sweep=[10], sweep_tasks=tasks, journal=not args.no_journal,
                    journal_off_point=False)
    else:
        workers, tasks = args.workers or 1000, args.tasks or 1_000_000
        sweep_tasks = min(100_000, tasks)
        plan = Plan(workers, tasks, args.procs or 4, args.concurrency, args.repeats or 3, args.main_repeats,
                    queue_sweep=[n for n in (10_000, 100_000) if n < tasks],
                    worker_sweep=[w for w in (10, 100, 1000) if w <= workers] or [workers],
                    sweep_tasks=sweep_tasks, journal=not args.no_journal, journal_off_point=True)
    if args.no_sweep:
        plan.queue_sweep, plan.worker_sweep, plan.journal_off_point = [], [], False

    if args.replot:
        with open(args.replot, encoding="utf-8") as f:
            saved = plot(json.load(f), args.plot)
        print(f"plot: {saved}")
        return 0 if saved else 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    load_before = load_average()
    source = describe_source(REPO_ROOT)
    main_runs, sweep_runs = run_plan(plan, args.quiet)

    groups = [summarize(g) for g in _groups(main_runs + sweep_runs)]
    main_group = groups[0]
    edges = [0.0] + [10 ** (e / 4) for e in range(8, 4 * 7 + 1)]  # 100 ... 10M, four bins per decade
    submit_curve = [p for r in main_runs for p in per_queue_length(r.samples, "submit")]
    drain_curve = [p for r in main_runs for p in per_queue_length(r.samples, "drain")]
    main_group["per_queue_length"] = {"submit": binned(submit_curve, edges), "drain": binned(drain_curve, edges)}
    main_group["rss_peak"] = max(r.rss_peak for r in main_runs)
    main_group["client_rss_full"] = max(r.client_rss_full for r in main_runs)
    main_group["workers_registered_at_end"] = min(r.workers_registered_at_end for r in main_runs)
    main_group["reconnects"] = sum(r.reconnects for r in main_runs)

    def pick(workers: int | None, tasks: int | None) -> list[dict[str, Any]]:
        out = [g for g in groups if g["journal"] == plan.journal and (workers is None or g["workers"] == workers)
               and (tasks is None or g["tasks"] == tasks)]
        return out

    queue_sweep = sorted(pick(plan.workers, None), key=lambda g: g["tasks"]) if plan.queue_sweep else []
    worker_sweep = sorted(pick(None, plan.sweep_tasks), key=lambda g: g["workers"]) if plan.worker_sweep else []
    target_rss = 1 << 30
    targets = {
        "rss_below_1_GiB": main_group["rss_full"]["median"] < target_rss and main_group["rss_peak"] < target_rss,
        "submit_below_30_s": main_group["submit_seconds"]["median"] < 30.0,
    }
    def ratio(sweep: list[dict[str, Any]], key: str) -> float | None:
        """Last over first; None when the first is too short for the CPU clock (10 ms ticks) to see."""
        first = sweep[0][key]["median"]
        return sweep[-1][key]["median"] / first if first > 0 else None

    flat: dict[str, float | None] = {}
    if len(queue_sweep) > 1:
        flat["drain_cpu_ratio_longest_to_shortest_queue"] = ratio(queue_sweep, "drain_cpu_us")
        flat["submit_cpu_ratio_longest_to_shortest_queue"] = ratio(queue_sweep, "submit_cpu_us")
    if len(worker_sweep) > 1:
        flat["drain_cpu_ratio_most_to_fewest_workers"] = ratio(worker_sweep, "drain_cpu_us")
    doc: dict[str, Any] = {
        "benchmark": "scale",
        "timestamp": started_at.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "plan": asdict(plan),
        "machine": describe_machine(),
        "source": source,
        "load_average": {"before": load_before, "after": load_average()},
        "targets": targets,
        "flatness": flat,
        "main": main_group,
        "queue_sweep": queue_sweep,
        "worker_sweep": worker_sweep,
        "groups": groups,
        "runs": [asdict(r) for r in main_runs + sweep_runs],
    }
    print()
    print_table(groups)
    print()
    print(f"at {main_group['tasks']:,} queued: dispatcher RSS {_mib(main_group['rss_full']['median'])} "
          f"(peak {_mib(main_group['rss_peak'])}; target < 1 GiB: {'met' if targets['rss_below_1_GiB'] else 'MISSED'})"
          f"; submit {main_group['submit_seconds']['median']:.1f} s (target < 30 s: "
          f"{'met' if targets['submit_below_30_s'] else 'MISSED'}); client RSS {_mib(main_group['client_rss_full'])}")
    for curve_name in ("submit", "drain"):
        bins = main_group["per_queue_length"][curve_name]
        if bins:
            cells = ", ".join(f"~{math.sqrt(max(b['queue_from'], 1) * b['queue_to']):,.0f}: {b['median_us']:.0f}"
                              for b in bins)
            print(f"{curve_name} CPU µs per task by queue length within the main run: {cells}")
    for k, v in flat.items():
        print(f"{k}: {v:.2f} (1.0 = flat)" if v is not None else f"{k}: too short to measure")
    print(f"load average before {load_before}, after {load_average()}")
    os.makedirs(args.out, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"scale-{stamp}{'-smoke' if args.smoke else ''}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"results: {os.path.relpath(path, REPO_ROOT)}")
    if not args.no_plot and not args.smoke:
        saved = plot(doc, args.plot)
        if saved:
            print(f"plot: {saved}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted: every process this benchmark started was stopped", file=sys.stderr)
        raise SystemExit(130) from None

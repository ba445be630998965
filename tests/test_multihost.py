"""Conveyor across hosts: a dispatcher, workers and a client each in its own network namespace.

Host a runs the dispatcher bound to a's address, b and c run workers in different modes, d runs the
client (a subprocess inside d). Only the private test subnet of these namespaces is ever used.
"""

from __future__ import annotations

import json
import queue
import selectors
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from tests import netns
from tests.conftest import ROOT, stop_process, wait_until

HEARTBEAT = "0.2"
PORT = 5555


def conveyor(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", *args]


def start_dispatcher(host: netns.Host, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = open(tmp / f"dispatcher-{host.name}.log", "ab")  # noqa: SIM115 - closed with the process
    proc = host.popen(  # a non-loopback address without keys: --insecure (only test namespaces can reach it)
        conveyor("dispatcher", "--bind", f"tcp://{host.address}:{PORT}", "--no-journal", "--insecure",
                 "--heartbeat-interval", HEARTBEAT),
        stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
    )
    log.close()
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(20), "the dispatcher did not print its endpoint"
    endpoint = proc.stdout.readline().decode().strip()
    assert endpoint == f"tcp://{host.address}:{PORT}", endpoint
    return proc, endpoint


def start_worker(host: netns.Host, address: str, mode: str, name: str, tmp: Path) -> subprocess.Popen[bytes]:
    log = open(tmp / f"worker-{name}.log", "ab")  # noqa: SIM115
    proc = host.popen(
        conveyor("worker", "--connect", address, "--mode", mode, "--concurrency", "2", "--name", name,
                 "--heartbeat-interval", HEARTBEAT, "--drain-timeout", "5"),
        stdout=log, stderr=log, cwd=ROOT,
    )
    log.close()
    return proc


def status_from(host: netns.Host, address: str) -> dict[str, Any]:
    """`conveyor status --json` run inside `host`."""
    res = host.run(conveyor("status", "--json", "--dispatcher", address), cwd=ROOT, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def workers_seen(host: netns.Host, address: str) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in status_from(host, address)["workers"]}


class LineReader:
    """Reads a process's stdout lines on a thread, so the test can wait for them with a deadline."""

    def __init__(self, stream: IO[bytes]):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s") from None


def logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(tmp.glob("*.log")))


def test_tasks_spread_over_hosts_and_survive_a_host_cut(netns_network: Any, tmp_path: Path) -> None:
    net = netns_network(["a", "b", "c", "d"])
    a, b, c, d = net["a"], net["b"], net["c"], net["d"]
    dispatcher, address = start_dispatcher(a, tmp_path)
    procs = [
        start_worker(b, address, "threads", "worker-b", tmp_path),
        start_worker(c, address, "processes", "worker-c", tmp_path),
    ]
    client: subprocess.Popen[bytes] | None = None
    try:
        seen = wait_until(lambda: (w := workers_seen(d, address)) and len(w) == 2 and w, 30,
                          what="both workers to register")
        # each worker is reported with the address it uses to reach the dispatcher: its own host's
        assert {n: w["host"] for n, w in seen.items()} == {"worker-b": b.address, "worker-c": c.address}
        assert {n: w["mode"] for n, w in seen.items()} == {"worker-b": "threads", "worker-c": "processes"}

        count = 24
        client = d.popen(conveyor_client(address, count, 0.4), stdout=subprocess.PIPE, cwd=ROOT)
        assert client.stdout is not None
        reader = LineReader(client.stdout)
        results: dict[int, dict[str, Any]] = {}
        cut_after: int | None = None
        while True:
            line = reader.next(90)
            assert line is not None, f"the client ended early (exit {client.wait()})\n{logs(tmp_path)}"
            event = json.loads(line)
            if "done" in event:
                break
            assert "error" not in event, event
            assert event["i"] not in results, f"task {event['i']} reported twice"
            results[event["i"]] = event
            if cut_after is None and event["worker"] == "worker-c":
                c.cut()  # c is busy (2 slots, more queued): its running tasks must move to b
                cut_after = len(results)
        assert client.wait(30) == 0

        assert sorted(results) == list(range(count)), "a task was lost"
        assert all(r["value"] == r["i"] ** 2 for r in results.values())
        assert cut_after is not None, "no task ran on worker-c before the cut"
        done_by = {r["worker"] for r in results.values()}
        assert done_by == {"worker-b", "worker-c"}, done_by
        moved = [r for r in results.values() if r["attempts"] > 1]
        assert moved and all(r["worker"] == "worker-b" for r in moved), (moved, logs(tmp_path))
        st = status_from(d, address)
        assert st["queued"] == 0 and st["running"] == 0
        assert [w["name"] for w in st["workers"]] == ["worker-b"], "worker-c should be declared lost"

        c.restore()  # c comes back: its worker reconnects and registers again
        wait_until(lambda: "worker-c" in workers_seen(d, address), 30, what="worker-c to come back")
    finally:
        if client is not None:
            stop_process(client)
        for proc in procs:
            stop_process(proc)
        stop_process(dispatcher)
        if dispatcher.stdout is not None:
            dispatcher.stdout.close()
    assert [p.returncode for p in procs] == [0, 0], logs(tmp_path)


def conveyor_client(address: str, count: int, seconds: float) -> list[str]:
    return [sys.executable, "-m", "tests.multihost_client", address, str(count), str(seconds)]


def test_worker_started_before_the_dispatcher_connects_when_it_appears(netns_network: Any, tmp_path: Path) -> None:
    net = netns_network(["a", "b", "d"])
    a, b, d = net["a"], net["b"], net["d"]
    address = f"tcp://{a.address}:{PORT}"
    worker = start_worker(b, address, "asyncio", "early-b", tmp_path)
    dispatcher: subprocess.Popen[bytes] | None = None
    try:
        log = tmp_path / "worker-early-b.log"
        wait_until(lambda: "dispatcher unreachable" in log.read_text(errors="replace"), 30,
                   what="the worker to find no dispatcher")
        assert worker.poll() is None, "the worker gave up instead of waiting"
        dispatcher, _ = start_dispatcher(a, tmp_path)
        seen = wait_until(lambda: workers_seen(d, address).get("early-b"), 30, what="early-b to connect")
        assert seen["host"] == b.address and seen["mode"] == "asyncio"
        res = d.run(conveyor("submit", "--wait", "--dispatcher", address, "tests.tasks:add", "2", "3"), cwd=ROOT)
        assert (res.returncode, res.stdout.strip()) == (0, "5"), res.stderr
    finally:
        stop_process(worker)
        if dispatcher is not None:
            stop_process(dispatcher)
            if dispatcher.stdout is not None:
                dispatcher.stdout.close()
    assert worker.returncode == 0, logs(tmp_path)


@pytest.mark.skipif(not netns.netem_available(), reason="tc netem is not available (kernel without sch_netem)")
def test_tasks_complete_over_a_slow_lossy_link(netns_network: Any, tmp_path: Path) -> None:
    net = netns_network(["a", "b", "d"])
    a, b, d = net["a"], net["b"], net["d"]
    dispatcher, address = start_dispatcher(a, tmp_path)
    b.netem(delay_ms=40, jitter_ms=10, loss_pct=2)
    worker = start_worker(b, address, "threads", "slow-b", tmp_path)
    try:
        wait_until(lambda: "slow-b" in workers_seen(d, address), 30, what="slow-b to register")
        res = d.run(conveyor_client(address, 10, 0.05), cwd=ROOT, timeout=90)
        assert res.returncode == 0, res.stdout + res.stderr
        values = {e["i"]: e["value"] for e in map(json.loads, res.stdout.splitlines()) if "i" in e}
        assert values == {i: i * i for i in range(10)}
    finally:
        b.clear_netem()
        stop_process(worker)
        stop_process(dispatcher)
        if dispatcher.stdout is not None:
            dispatcher.stdout.close()

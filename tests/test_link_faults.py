"""Broken links between hosts (network namespaces): a cut longer than liveness, then TCP connections reset as
a NAT box or a conntrack flush does, on the client's side, on the dispatcher's side, and on a worker's link,
under load. Every job's outcome reaches its client exactly once.

Host a runs the dispatcher, b a threads worker, d the client (tests/multihost_client.py, printing one JSON
line per finished job). The reset: `iptables -I OUTPUT -p tcp ... -j REJECT --reject-with tcp-reset`
inside one namespace for 2 s. docs/reliability.md lists the link faults covered and points here.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests import netns
from tests.conftest import ROOT, stop_process, wait_until
from tests.test_multihost import (
    PORT,
    LineReader,
    conveyor_client,
    logs,
    start_dispatcher,
    start_worker,
    status_from,
    workers_seen,
)

COUNT = 300
TASK_S = 0.05


def _reset_rule(host: netns.Host, peer: str, port_flag: str) -> list[str]:
    """The iptables rule that resets every TCP connection of host to peer's dispatcher port."""
    return ["OUTPUT", "-p", "tcp", "-d", peer, port_flag, str(PORT), "-j", "REJECT", "--reject-with", "tcp-reset"]


def _reset_for(host: netns.Host, rule: list[str], seconds: float) -> None:
    res = host.run(["iptables", "-I", *rule])
    assert res.returncode == 0, res.stderr
    try:
        time.sleep(seconds)  # the fault lasts this long: a real 2 s window of resets, not a wait for a result
    finally:
        host.run(["iptables", "-D", *rule])


def _run_client_with_fault(net: netns.Network, tmp: Path, fault: Any) -> dict[int, dict[str, Any]]:
    """Start the client on d with COUNT jobs; once 20 are done, inject `fault`; collect every result."""
    d = net["d"]
    address = f"tcp://{net['a'].address}:{PORT}"
    client = d.popen(conveyor_client(address, COUNT, TASK_S), stdout=subprocess.PIPE, cwd=ROOT)
    assert client.stdout is not None
    reader = LineReader(client.stdout)
    results: dict[int, dict[str, Any]] = {}
    injected = False
    try:
        while True:
            line = reader.next(120)
            assert line is not None, f"the client ended early (exit {client.wait()})\n{logs(tmp)}"
            event = json.loads(line)
            if "done" in event:
                break
            assert "error" not in event, event
            assert event["i"] not in results, f"job {event['i']} resolved twice"
            results[event["i"]] = event
            if not injected and len(results) >= 20:
                injected = True
                fault()
        assert client.wait(30) == 0
    finally:
        stop_process(client)
    assert injected, "the fault was never injected"
    return results


def _cluster(netns_network: Any, tmp: Path) -> tuple[netns.Network, list[subprocess.Popen[bytes]]]:
    net = netns_network(["a", "b", "d"])
    dispatcher, address = start_dispatcher(net["a"], tmp)
    worker = start_worker(net["b"], address, "threads", "worker-b", tmp)
    wait_until(lambda: "worker-b" in workers_seen(net["d"], address), 30, what="the worker to register")
    return net, [dispatcher, worker]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _check(results: dict[int, dict[str, Any]], net: netns.Network, tmp: Path) -> None:
    assert sorted(results) == list(range(COUNT)), f"{COUNT - len(results)} futures never resolved\n{logs(tmp)}"
    assert all(r["value"] == r["i"] ** 2 for r in results.values())
    st = status_from(net["d"], f"tcp://{net['a'].address}:{PORT}")
    assert st["queued"] == 0 and st["running"] == 0


def test_the_client_host_is_cut_then_its_connections_are_reset(netns_network: Any, tmp_path: Path) -> None:
    """The seen defect: about 280 of 300 futures never resolved."""
    net, procs = _cluster(netns_network, tmp_path)
    d, a = net["d"], net["a"]

    def fault() -> None:
        d.cut()
        time.sleep(8)  # a cut longer than liveness (the fault itself, not a wait)
        d.restore()
        _reset_for(d, _reset_rule(d, a.address, "--dport"), 2)

    try:
        results = _run_client_with_fault(net, tmp_path, fault)
        _check(results, net, tmp_path)
    finally:
        _stop(procs)


def test_the_dispatcher_resets_its_connections_to_the_client(netns_network: Any, tmp_path: Path) -> None:
    net, procs = _cluster(netns_network, tmp_path)
    d, a = net["d"], net["a"]
    try:
        results = _run_client_with_fault(net, tmp_path, lambda: _reset_for(a, _reset_rule(a, d.address, "--sport"), 2))
        _check(results, net, tmp_path)
    finally:
        _stop(procs)


def test_a_workers_link_is_reset_under_load(netns_network: Any, tmp_path: Path) -> None:
    """RESULTS queued on the worker's broken connection are sent again, fenced by attempt, counted once."""
    net, procs = _cluster(netns_network, tmp_path)
    b, a = net["b"], net["a"]
    try:
        results = _run_client_with_fault(net, tmp_path, lambda: _reset_for(b, _reset_rule(b, a.address, "--dport"), 2))
        _check(results, net, tmp_path)
        assert workers_seen(net["d"], f"tcp://{a.address}:{PORT}").keys() == {"worker-b"}
    finally:
        _stop(procs)

"""The standby pair across hosts (network namespaces): issue 17's promises over real processes.

Hosts: a runs the primary dispatcher, b the backup, w the witness, k a threads worker, c the clients and the
sampler (tests/standby_netns_agent.py: it probes both dispatchers every 50 ms with one raw STATUS each, a
REDIRECT meaning "not serving"). The test's own namespace reaches none of them, so everything that talks
to a dispatcher runs in host c. Each test prints what it measured (see it with -s).

- Promise 5 with a witness: the pair's link split (blackhole routes in a and b for each other only), under
  load; at no sampled instant do both serve, the side without the vote never accepts, and after the heal
  every acknowledged job (connected and detached) has one result.
- Promise 3: the active's host cut off from everything; the backup takes over on the witness's lease and
  the work finishes there; restored, the old active comes back passive in the higher epoch and stays so.
- Promise 6: the active killed (`kill -9`) and its journal directory destroyed while it is down; what was
  acknowledged in sync finishes from the other; the destroyed one comes back passive and is sent the journal.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.conftest import ROOT, stop_process, wait_until
from tests.test_multihost import LineReader

PORT = 5555  # clients and workers
PAIR_PORT = 5556  # the pair's link
WITNESS_PORT = 5557
FAILOVER_S = 1.0
HEARTBEAT = "0.2"
Sample = dict[str, Any]


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


class NetPair:
    """The primary on host a, the backup on b, the witness on w, a worker on k; clients run on c."""

    def __init__(self, net: netns.Network, tmp: Path, witness: bool = True):
        self.net, self.tmp, self.witness = net, tmp, witness
        self.host = {"primary": net["a"], "backup": net["b"]}
        self.addr = {role: f"tcp://{h.address}:{PORT}" for role, h in self.host.items()}
        self.pair_addr = {role: f"tcp://{h.address}:{PAIR_PORT}" for role, h in self.host.items()}
        self.witness_addr = f"tcp://{net['w'].address}:{WITNESS_PORT}" if witness else ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        if witness:
            self._spawn(net["w"], "witness", ["witness", "--bind", self.witness_addr, "--state",
                                              str(tmp / "witness.epoch"), "--failover-timeout", str(FAILOVER_S)])

    @property
    def addresses(self) -> str:
        return f"{self.addr['primary']},{self.addr['backup']}"

    def journal_dir(self, role: str) -> Path:
        return self.tmp / f"journal-{role}"

    def journal(self, role: str) -> Path:
        return self.journal_dir(role) / "journal.db"

    def start(self, role: str) -> None:
        other = "backup" if role == "primary" else "primary"
        self.journal_dir(role).mkdir(exist_ok=True)
        self._spawn(self.host[role], role, [
            "dispatcher", "--bind", self.addr[role], "--insecure", "--journal", str(self.journal(role)),
            "--role", role, "--peer", self.pair_addr[other], "--pair-bind", self.pair_addr[role],
            *(["--witness", self.witness_addr] if self.witness else []),
            "--failover-timeout", str(FAILOVER_S), "--heartbeat-interval", HEARTBEAT])

    def start_worker(self, host: str = "k") -> None:
        name = "worker" if host == "k" else f"worker-{host}"
        self._spawn(self.net[host], name, ["worker", "--connect", self.addresses, "--mode", "threads",
                                           "--concurrency", "8", "--name", f"worker-{host}",
                                           "--heartbeat-interval", HEARTBEAT])

    def _spawn(self, host: netns.Host, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = host.popen(_py("-m", "conveyor", *args), stdout=log, stderr=log, cwd=ROOT)
        log.close()

    def agent(self, *args: str, timeout: float = 60, host: str = "c") -> str:
        """Run tests/standby_netns_agent.py in a host (c: it reaches everything) to the end; its stdout."""
        res = self.net[host].run(_py("-m", "tests.standby_netns_agent", *args), cwd=ROOT, timeout=timeout)
        assert res.returncode == 0, f"{args[0]} failed ({res.returncode}): {res.stderr[-2000:]}\n{self.logs()}"
        return res.stdout

    def agent_popen(self, *args: str, host: str = "c") -> subprocess.Popen[bytes]:
        return self.net[host].popen(_py("-m", "tests.standby_netns_agent", *args), cwd=ROOT,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def logs(self) -> str:
        logs = sorted(self.tmp.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: n.startswith(("primary", "backup", "witness"))):
            stop_process(self.procs[name])  # workers first, then the dispatchers and the witness


class Sampler:
    """The sampler agent's lines, read as they come: every sample kept, conditions waited for."""

    def __init__(self, pair: NetPair):
        self.path = pair.tmp / "samples.jsonl"  # every sample, for a post-mortem
        self.proc = pair.agent_popen("sample", pair.addr["primary"], pair.addr["backup"])
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.samples: list[Sample] = []

    def drain(self, block_s: float = 0.0) -> None:
        """Take in the lines printed so far (waiting up to block_s for the first one)."""
        lines = self.reader.lines
        try:
            line = lines.get(timeout=block_s) if block_s else lines.get_nowait()
            while line is not None:
                self.samples.append(json.loads(line))
                line = lines.get_nowait()
            raise AssertionError(f"the sampler ended (exit {self.proc.poll()})")
        except queue.Empty:
            return

    def wait(self, predicate: Callable[[Sample], bool], timeout: float, what: str) -> Sample:
        """The first sample from now on that satisfies predicate."""
        self.drain()
        start = len(self.samples)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain(0.5)
            for s in self.samples[start:]:
                if predicate(s):
                    return s
            start = len(self.samples)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last samples {self.samples[-5:]}")

    def since(self, t: float) -> list[Sample]:
        self.drain()
        return [s for s in self.samples if s["t"] >= t]

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        stop_process(self.proc, timeout=5)
        with contextlib.suppress(AssertionError):  # its end of output
            self.drain()
        self.path.write_text("".join(json.dumps(s) + "\n" for s in self.samples))
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def serving(s: Sample, side: str) -> bool:
    return s[side] is not None and s[side][0] == "active"


def both_serving(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if serving(s, "a") and serving(s, "b")]


def epochs_only_increase(samples: list[Sample]) -> None:
    for side in ("a", "b"):
        seen = [s[side][1] for s in samples if s[side] is not None]
        assert seen == sorted(seen), f"an epoch went down on {side}: {seen}"


def serving_epochs_only_increase(samples: list[Sample]) -> None:
    """Whoever serves, the epoch it serves in never goes down."""
    served = [s[side][1] for s in samples for side in ("a", "b") if serving(s, side)]
    assert served == sorted(served), f"a serving epoch went down: {served}"


def jobs_in(db: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT id, state FROM jobs").fetchall())


class Load:
    """A connected client in host c (agent `load`): COUNT jobs paced GAP_S apart, results as they come."""

    def __init__(self, pair: NetPair, count: int, gap_s: float, task_s: float, offset: int, host: str = "c"):
        self.count, self.offset = count, offset
        self.proc = pair.agent_popen("load", pair.addresses, str(count), str(gap_s), str(task_s), str(offset),
                                     host=host)
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.results: dict[int, Any] = {}
        self.accepted: int | None = None
        self.duplicates: int | None = None

    def finish(self, timeout: float, logs: Callable[[], str]) -> None:
        deadline = time.monotonic() + timeout
        while self.duplicates is None:
            line = self.reader.next(max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the load client ended early or hung (exit {self.proc.poll()})\n{logs()}"
            event = json.loads(line)
            if "accepted" in event:
                self.accepted = event["accepted"]
            elif "done" in event:
                self.duplicates = event["duplicates"]
            else:
                assert event["i"] not in self.results, f"job {event['i']} resolved twice"
                self.results[event["i"]] = event["value"]
        assert self.proc.wait(30) == 0

    def check(self) -> None:
        assert self.accepted == self.count, f"{self.accepted} of {self.count} acknowledged"
        expected = list(range(self.offset, self.offset + self.count))
        assert sorted(self.results) == expected and all(self.results[i] == i for i in expected)

    def close(self) -> None:
        stop_process(self.proc, timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def detached(pair: NetPair, count: int, offset: int, addresses: str | None = None, host: str = "c",
             task_s: float = 0.05) -> list[str]:
    ids = pair.agent("detach", addresses or pair.addresses, str(count), str(task_s), str(offset), host=host).split()
    assert len(ids) == count
    return ids


def fetch_all(pair: NetPair, ids: list[str]) -> dict[str, Any]:
    out = pair.agent("fetch", pair.addresses, *ids, timeout=90)
    got: dict[str, Any] = {}
    for line in out.splitlines():
        event = json.loads(line)
        assert event["id"] not in got, f"{event['id']} fetched twice"
        got[event["id"]] = event["value"]
    return got


def witness_epoch(pair: NetPair) -> int:
    path = pair.tmp / "witness.epoch"
    return int(path.read_text().strip() or 0) if path.exists() else 0


@pytest.fixture
def pair(netns_network: Callable[..., netns.Network], tmp_path: Path) -> Iterator[NetPair]:
    net = netns_network(["a", "b", "w", "k", "c"])
    p = NetPair(net, tmp_path)
    try:
        yield p
    finally:
        p.stop()


def _started(pair: NetPair) -> Sampler:
    pair.start("primary")
    pair.start("backup")
    pair.start_worker()
    sampler = Sampler(pair)
    try:
        sampler.wait(lambda s: s["a"] == ["active", 1] and s["b"] == ["passive", 1], 30,
                     "the primary active in epoch 1, the backup passive")
        # The witness granted the primary's lease (a fresh witness grants after one lease).
        wait_until(lambda: witness_epoch(pair) == 1, 20, 0.05, "the witness to grant the primary's lease")
    except BaseException:
        sampler.close()
        raise
    return sampler


def _blackhole(host: netns.Host, peer: netns.Host, add: bool) -> None:
    res = host.run(["ip", "route", "add" if add else "del", "blackhole", f"{peer.address}/32"])
    assert res.returncode == 0, res.stderr


def test_with_a_witness_a_split_of_the_pair_link_under_load_never_has_two_serving(pair: NetPair) -> None:
    """Promise 5: the pair's own link is cut while both still reach the witness, the worker and the clients."""
    a, b = pair.net["a"], pair.net["b"]
    sampler = _started(pair)
    load: Load | None = None
    try:
        load = Load(pair, count=60, gap_s=0.1, task_s=0.05, offset=0)
        before = detached(pair, 30, offset=1000)
        _blackhole(a, b, add=True)
        _blackhole(b, a, add=True)
        cut_at = time.monotonic()
        try:
            # The active sees its peer gone (degraded) and keeps serving on the witness's lease.
            wait_until(lambda: "DEGRADED" in (pair.tmp / "primary.log").read_text(), 10, 0.05, "the active, degraded")
            # Acknowledged by the active alone, during the split, to new clients given the active first and
            # the backup first. The backup cannot name the active (it does not hear it): a client stays at
            # the first address until it has been silent (or named no active) for the settle time.
            during = detached(pair, 15, offset=2000)
            backup_first = f"{pair.addr['backup']},{pair.addr['primary']}"
            asked_at = time.monotonic()
            during += detached(pair, 15, offset=2015, addresses=backup_first)
            backup_first_s = time.monotonic() - asked_at
            probe_to_b = json.loads(pair.agent("submit-to", pair.addr["backup"], "2").strip().splitlines()[-1])
            assert probe_to_b["accepted"] is False, probe_to_b
            # Hold the split well beyond the failover timeout: the backup's takeover, were it possible, is due.
            sampler.wait(lambda s: s["t"] >= cut_at + 4 * FAILOVER_S, 15, "four failover timeouts of split")
            split_samples = sampler.since(cut_at)
        finally:
            _blackhole(a, b, add=False)
            _blackhole(b, a, add=False)
        healed_at = time.monotonic()
        assert not both_serving(split_samples), both_serving(split_samples)[:5]
        assert all(s["b"] is None or s["b"][0] == "passive" for s in split_samples), "the backup served in the split"
        assert witness_epoch(pair) == 1, "the witness granted a second lease"
        backup_log = (pair.tmp / "backup.log").read_text()
        assert "active in epoch" not in backup_log
        # Healed: the backup catches up (in sync again) and everything acknowledged finishes, once.
        wait_until(lambda: "in sync; ACCEPTED" in (pair.tmp / "primary.log").read_text().split("DEGRADED")[-1],
                   20, 0.1, "the pair in sync again")
        load.finish(60, pair.logs)
        load.check()
        fetched = fetch_all(pair, before + during)
        assert sorted(fetched.values()) == list(range(1000, 1030)) + list(range(2000, 2030))
        # One final state per detached job in the active's journal, and the same in the caught-up backup's.
        final = {i: "succeeded" for i in before + during}
        states = jobs_in(pair.journal("primary"))
        assert {i: states.get(i) for i in final} == final
        wait_until(lambda: {i: jobs_in(pair.journal("backup")).get(i) for i in final} == final, 20, 0.1,
                   "the backup's journal to hold the same final states")
        sampler.drain()
        epochs_only_increase(sampler.samples)
        serving_epochs_only_increase(sampler.samples)
        assert not both_serving(sampler.samples)
        assert sampler.samples[-1]["a"] == ["active", 1] and sampler.samples[-1]["b"] == ["passive", 1]
        print(f"\nsplit brain with a witness: split {healed_at - cut_at:.2f} s, {len(split_samples)} samples in "
              f"the split ({len(sampler.samples)} in all), 0 with both serving; SUBMIT to the backup not "
              f"accepted within {probe_to_b['s']:.2f} s; a client given the backup first acknowledged by the active "
              f"in {backup_first_s:.2f} s; {len(load.results)} connected + {len(fetched)} detached "
              f"jobs, each one result ({load.duplicates} duplicate results dropped by the client)")
    finally:
        if load is not None:
            load.close()
        sampler.close()


def test_the_active_cut_off_from_everything_the_backup_takes_over_and_the_old_one_returns_passive(
    pair: NetPair,
) -> None:
    """Promise 3: every link of the active's host is cut (witness mode), then restored."""
    a = pair.net["a"]
    sampler = _started(pair)
    load: Load | None = None
    try:
        before = detached(pair, 30, offset=1000)
        load = Load(pair, count=40, gap_s=0.02, task_s=0.2, offset=0)
        wait_until(lambda: len(jobs_in(pair.journal("backup"))) >= 30, 10, 0.05, "jobs in flight")
        a.cut()
        cut_at = time.monotonic()
        try:
            took = sampler.wait(lambda s: s["b"] == ["active", 2], 20, "the backup to take over in epoch 2")
            takeover_s = took["t"] - cut_at
            # The work finishes there while the old active is still cut off.
            load.finish(60, pair.logs)
            load.check()
            fetched = fetch_all(pair, before)
            assert sorted(fetched.values()) == list(range(1000, 1030))
            finished_at = time.monotonic()
        finally:
            a.restore()
        restored_at = time.monotonic()
        back = sampler.wait(lambda s: s["a"] == ["passive", 2], 20, "the old active back, passive in epoch 2")
        back_s = back["t"] - restored_at
        # A window after healing: the old active never serves by itself.
        sampler.wait(lambda s: s["t"] >= back["t"] + 3.0, 10, "a 3 s window after its return")
        window = [s for s in sampler.since(back["t"]) if s["t"] <= back["t"] + 3.0]
        assert window and not any(serving(s, "a") for s in window), [s for s in window if serving(s, "a")][:3]
        assert all(s["b"] == ["active", 2] for s in window if s["b"] is not None)
        sampler.drain()
        epochs_only_increase(sampler.samples)
        serving_epochs_only_increase(sampler.samples)
        assert not both_serving(sampler.samples), both_serving(sampler.samples)[:5]
        a_alone = [s for s in sampler.since(cut_at) if s["t"] < restored_at and s["a"] is not None]
        assert not a_alone, f"the cut-off host answered a probe: {a_alone[:3]}"
        assert witness_epoch(pair) == 2
        print(f"\ncut-off active: backup active {takeover_s:.2f} s after the cut; {len(load.results)} connected "
              f"+ {len(fetched)} detached jobs finished there {finished_at - cut_at:.2f} s after the cut "
              f"({load.duplicates} duplicate results dropped); the old active passive in epoch 2 {back_s:.2f} s "
              f"after the restore; {len(window)} samples in the 3 s window, none serving; "
              f"{len(sampler.samples)} samples in all")
    finally:
        if load is not None:
            load.close()
        sampler.close()


def test_the_active_killed_and_its_journal_destroyed_everything_acknowledged_finishes_from_the_other(
    pair: NetPair,
) -> None:
    """Promise 6: kill -9 of the active, rm -rf of its journal directory while it is down."""
    sampler = _started(pair)
    try:
        wait_until(lambda: "in sync; ACCEPTED" in (pair.tmp / "primary.log").read_text(), 10, 0.05, "in sync")
        ids = detached(pair, 40, offset=0)  # acknowledged in sync: in both journals
        killed = pair.procs["primary"]
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        killed_at = time.monotonic()
        shutil.rmtree(pair.journal_dir("primary"))
        took = sampler.wait(lambda s: s["b"] == ["active", 2], 20, "the backup to take over")
        fetched = fetch_all(pair, ids)
        assert sorted(fetched.values()) == list(range(40))
        # The destroyed one starts on an empty journal: passive (fail-back is never automatic), sent the journal.
        restarted_at = time.monotonic()
        pair.start("primary")
        back = sampler.wait(lambda s: s["a"] == ["passive", 2], 20, "the primary back passive on a new journal")
        wait_until(lambda: pair.journal("primary").exists() and len(jobs_in(pair.journal("backup")))
                   == len(jobs_in(pair.journal("primary"))), 20, 0.1, "the snapshot on the new journal")
        sampler.drain()
        restarted = [s for s in sampler.samples if s["t"] >= restarted_at]
        epochs_only_increase([s for s in sampler.samples if s["t"] < restarted_at])
        epochs_only_increase(restarted)  # from 0: the new journal remembers no epoch until it hears its peer
        amnesia = sum(1 for s in restarted if s["a"] == ["passive", 0])
        serving_epochs_only_increase(sampler.samples)
        assert not both_serving(sampler.samples)
        assert not any(serving(s, "a") for s in restarted)
        print(f"\ndestroyed journal: backup active {took['t'] - killed_at:.2f} s after the kill; {len(fetched)} "
              f"detached jobs fetched by id; the primary passive on a fresh journal {back['t'] - killed_at:.2f} s "
              f"after the kill ({amnesia} samples passive in epoch 0 before it heard its peer); "
              f"{len(sampler.samples)} samples")
    finally:
        sampler.close()


def test_without_a_witness_a_split_has_two_actives_and_the_heal_merges_to_one_final_state_per_job(
    netns_network: Callable[..., netns.Network], tmp_path: Path,
) -> None:
    """Promise 5 without a witness: the pair cannot reach each other while each reaches a worker and clients
    of its own (a: ka, ca; b: kb, cb; c, the sampler and the fetch, reaches both and is the backup's vote).
    Both serve; after the heal one is active, and every acknowledged job has one final state and one result."""
    net = netns_network(["a", "b", "ka", "kb", "ca", "cb", "c"])
    pair = NetPair(net, tmp_path, witness=False)
    a, b = net["a"], net["b"]
    cuts = [(a, b), (a, net["kb"]), (a, net["cb"]), (b, net["ka"]), (b, net["ca"])]
    sampler: Sampler | None = None
    loads: list[Load] = []
    try:
        pair.start("primary")
        pair.start("backup")
        pair.start_worker("ka")
        pair.start_worker("kb")
        sampler = Sampler(pair)
        sampler.wait(lambda s: s["a"] == ["active", 1] and s["b"] == ["passive", 1], 30, "the primary active")
        wait_until(lambda: "in sync; ACCEPTED" in (pair.tmp / "primary.log").read_text(), 10, 0.05, "in sync")
        # In both journals and still running at the split: both sides will run them to the end.
        before = detached(pair, 16, offset=0, task_s=1.5)
        for x, y in cuts:
            _blackhole(x, y, add=True)
            _blackhole(y, x, add=True)
        cut_at = time.monotonic()
        try:
            two = sampler.wait(lambda s: s["a"] == ["active", 1] and s["b"] == ["active", 2], 20, "two actives")
            loads = [Load(pair, 20, gap_s=0.05, task_s=0.05, offset=100, host="ca"),
                     Load(pair, 20, gap_s=0.05, task_s=0.05, offset=200, host="cb")]
            side_a = detached(pair, 15, offset=1000, host="ca")  # acknowledged by the primary alone
            side_b = detached(pair, 15, offset=2000, host="cb")  # by the backup alone
            side_a += detached(pair, 5, offset=1015, host="ca", task_s=1.0)  # may still run at the heal
            split_samples = sampler.since(cut_at)
        finally:
            for x, y in cuts:
                _blackhole(x, y, add=False)
                _blackhole(y, x, add=False)
        healed_at = time.monotonic()
        assert both_serving(split_samples), "without a witness both sides serve in this split"
        one = sampler.wait(lambda s: s["a"] == ["passive", 2] and s["b"] == ["active", 2], 30,
                           "one active after the heal, the lower epoch passive")
        # The stepped-down primary rejoins passive and hands over what only it holds: until then the active
        # does not know the jobs only the primary acknowledged (a fetch by id would find no such job).
        wait_until(lambda: "merged what the peer handed over" in (pair.tmp / "backup.log").read_text(), 30, 0.1,
                   "the merge")
        merged_at = time.monotonic()
        for load in loads:
            load.finish(90, pair.logs)
            load.check()
        ids = before + side_a + side_b
        fetched = fetch_all(pair, ids)
        assert sorted(fetched.values()) == [*range(16), *range(1000, 1020), *range(2000, 2015)]
        final = dict.fromkeys(ids, "succeeded")
        wait_until(lambda: {i: jobs_in(pair.journal("backup")).get(i) for i in final} == final, 30, 0.1,
                   "one final state per job in the active's journal")
        wait_until(lambda: {i: jobs_in(pair.journal("primary")).get(i) for i in final} == final, 30, 0.1,
                   "the same in the passive's")
        status = json.loads(pair.agent("pair-status", pair.addr["backup"]).strip().splitlines()[-1])
        sampler.drain()
        epochs_only_increase(sampler.samples)
        after = [s for s in sampler.samples if s["t"] >= one["t"]]
        assert not both_serving(after), both_serving(after)[:3]
        primary_log = (pair.tmp / "primary.log").read_text()
        twice_there = re.findall(r"(\d+) job\(s\) ended on both sides while apart", primary_log)
        ran_twice_there = sum(int(m) for m in twice_there)
        print(f"\nsplit brain without a witness: two actives {two['t'] - cut_at:.2f} s after the cut, "
              f"{len(both_serving(split_samples))} of {len(split_samples)} samples with both serving; "
              f"one active {one['t'] - healed_at:.2f} s after the heal, merged {merged_at - healed_at:.2f} s after "
              f"it: "
              f"{status['adopted']} job(s) only the other held, {status['adopted_finals']} final state(s) it "
              f"reached; ran on both sides: {status['ran_twice'] + ran_twice_there}; "
              f"{sum(len(ld.results) for ld in loads)} connected + {len(fetched)} detached jobs, one result each "
              f"({sum(ld.duplicates or 0 for ld in loads)} duplicate results dropped by the clients)")
    finally:
        for load in loads:
            load.close()
        if sampler is not None:
            sampler.close()
        pair.stop()

"""Promise 7 of the standby pair: a seeded chaos run mixing the faults of promises 2-6, across hosts.

The hosts of tests/test_standby_netns.py (primary on a, backup on b, witness on w, a worker on k, clients
and the sampler on c). A connected client submits paced jobs for the whole run and detached batches are
submitted between faults; each fault hits whichever dispatcher is active at the time, and the next waits
until one is active again with the other passive and replication in sync:

- kill: `kill -9` of the active, restarted (promise 2);
- cut: the active's host off the network, then back (promise 3);
- stop: SIGSTOP of the active beyond the failover timeout, then SIGCONT (promise 4);
- split: the pair's own link cut while both reach everything else (promise 5, with the witness);
- destroy: `kill -9` of the active and `rm -rf` of its journal directory, restarted empty (promise 6).

At the end: every acknowledged job of the connected client resolved once with its own value, every
detached job has exactly one final state (succeeded) and its result by id, no sample had two serving,
and the epoch served only went up. CONVEYOR_CHAOS_SEED picks the order (printed), CONVEYOR_CHAOS_FAULTS
how many (default: each kind once).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.test_standby_netns import (
    FAILOVER_S,
    Load,
    NetPair,
    Sample,
    Sampler,
    _blackhole,
    both_serving,
    detached,
    fetch_all,
    jobs_in,
    serving,
    serving_epochs_only_increase,
)

ROLE = {"a": "primary", "b": "backup"}
OTHER = {"a": "b", "b": "a"}
FAULTS = ("kill", "cut", "stop", "split", "destroy")


def settled(s: Sample) -> bool:
    """One serving, the other passive in the same epoch, and the active's replication in sync."""
    for side in ("a", "b"):
        other = s[OTHER[side]]
        if serving(s, side) and other is not None and other == ["passive", s[side][1]] and s["sync"]:
            return True
    return False


@pytest.fixture
def pair(netns_network: Callable[..., netns.Network], tmp_path: Path) -> Iterator[NetPair]:
    p = NetPair(netns_network(["a", "b", "w", "k", "c"]), tmp_path)
    try:
        yield p
    finally:
        p.stop()


class Chaos:
    def __init__(self, pair: NetPair, sampler: Sampler):
        self.pair, self.sampler = pair, sampler
        self.recovery_s: dict[str, list[float]] = {f: [] for f in FAULTS}

    def settle(self, what: str) -> Sample:
        return self.sampler.wait(settled, 40, f"one active and in sync ({what})")

    def taken_over(self, side: str, epoch: int, what: str) -> float:
        """Wait for the other side to serve in a higher epoch; seconds it took."""
        start = time.monotonic()
        other = OTHER[side]
        self.sampler.wait(lambda s: serving(s, other) and s[other][1] > epoch and not serving(s, side), 30,
                          f"the other dispatcher to take over ({what})")
        return time.monotonic() - start

    def run(self, fault: str) -> None:
        s = self.settle(f"before {fault}")
        side = "a" if serving(s, "a") else "b"
        epoch, role, pair = s[side][1], ROLE[side], self.pair
        proc, host = pair.procs[role], pair.host[role]
        if fault in ("kill", "destroy"):
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if fault == "destroy":
                shutil.rmtree(pair.journal_dir(role))
            took = self.taken_over(side, epoch, fault)
            pair.start(role)
        elif fault == "cut":
            host.cut()
            try:
                took = self.taken_over(side, epoch, fault)
            finally:
                host.restore()
        elif fault == "stop":
            proc.send_signal(signal.SIGSTOP)
            try:
                took = self.taken_over(side, epoch, fault)
            finally:
                proc.send_signal(signal.SIGCONT)
        else:  # split: with the witness, the active keeps serving and the backup never does
            a, b = pair.net["a"], pair.net["b"]
            _blackhole(a, b, add=True)
            _blackhole(b, a, add=True)
            start = time.monotonic()
            try:
                self.sampler.wait(lambda s: s["t"] >= start + 3 * FAILOVER_S, 15, "three failover timeouts")
            finally:
                _blackhole(a, b, add=False)
                _blackhole(b, a, add=False)
            took = 0.0
        self.recovery_s[fault].append(took)


def test_a_seeded_chaos_run_of_kills_cuts_stops_splits_and_destroyed_journals_loses_nothing(pair: NetPair) -> None:
    seed = int(os.environ.get("CONVEYOR_CHAOS_SEED", "17"))
    rng = random.Random(seed)
    n = int(os.environ.get("CONVEYOR_CHAOS_FAULTS", str(len(FAULTS))))
    plan = rng.sample(FAULTS, len(FAULTS)) if n == len(FAULTS) else [rng.choice(FAULTS) for _ in range(n)]
    pair.start("primary")
    pair.start("backup")
    pair.start_worker()
    sampler = Sampler(pair)
    load: Load | None = None
    try:
        chaos = Chaos(pair, sampler)
        chaos.settle("start")
        started = time.monotonic()
        load = Load(pair, count=40 * len(plan), gap_s=0.1, task_s=0.02, offset=0)
        ids: list[str] = []
        for i, fault in enumerate(plan):
            ids += detached(pair, 10, offset=10_000 + 100 * i)
            chaos.run(fault)
        chaos.settle("the end")
        ids += detached(pair, 10, offset=10_000 + 100 * len(plan))
        load.finish(120, pair.logs)
        load.check()
        fetched = fetch_all(pair, ids)
        expected = sorted(10_000 + 100 * i + j for i in range(len(plan) + 1) for j in range(10))
        assert sorted(fetched.values()) == expected
        end = chaos.settle("the fetch")
        active = ROLE["a" if serving(end, "a") else "b"]
        states = jobs_in(pair.journal(active))
        assert {i: states.get(i) for i in ids} == dict.fromkeys(ids, "succeeded")
        sampler.drain()
        assert not both_serving(sampler.samples), both_serving(sampler.samples)[:3]
        serving_epochs_only_increase(sampler.samples)
        counts = Counter(plan)
        took = {f: [round(t, 2) for t in ts] for f, ts in chaos.recovery_s.items() if ts}
        print(f"\nchaos seed {seed}: faults {dict(counts)} in order {plan}; {time.monotonic() - started:.1f} s; "
              f"takeover seconds {took}; final epoch {end['a'][1]}; {len(load.results)} connected jobs, "
              f"{len(fetched)} detached fetched by id, each one result and one final state "
              f"({load.duplicates} duplicate results dropped by the client); {len(sampler.samples)} samples, "
              f"none with two serving")
    finally:
        if load is not None:
            load.close()
        sampler.close()

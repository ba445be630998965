"""Broken TCP connections between real processes, through tests/resetproxy.py: nothing hangs, nothing is
lost. (tests/test_link_faults.py does the same across network namespaces with iptables.)

A reset drops whatever ZeroMQ had queued on the connection, in either direction: SUBMITs, ACCEPTED,
ASSIGNs, RESULTS, JOB_DONEs. The protocol's sequence numbers and acknowledgements (docs/protocol.md
§14) make each side ask again for what it misses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import wait

import pytest

from conveyor import Client
from tests import tasks
from tests.conftest import Cluster, wait_until
from tests.resetproxy import ResetProxy


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture
def proxied(cluster: Cluster) -> Iterator[ResetProxy]:
    with ResetProxy("127.0.0.1", _port(cluster.address)) as proxy:
        yield proxy


def _keep_resetting(proxy: ResetProxy, stop: threading.Event, every_s: float) -> None:
    # The first reset at once: work that recovers well may take less than three periods in all.
    while True:
        proxy.reset()
        if stop.wait(every_s):
            return


def test_a_clients_futures_all_resolve_across_connection_resets(cluster: Cluster, proxied: ResetProxy) -> None:
    """The client talks to the dispatcher through a link that is reset every 0.3 s while 300 jobs run."""
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    with Client(proxied.address) as client:
        stop = threading.Event()
        resetter = threading.Thread(target=_keep_resetting, args=(proxied, stop, 0.3), daemon=True)
        resetter.start()
        try:
            futures = [client.submit(tasks.sleep_for, 0.01, i) for i in range(300)]
            _, not_done = wait(futures, timeout=60)
        finally:
            stop.set()
            resetter.join()
        assert proxied.resets >= 3, "the test must have reset live connections"
        assert not not_done, f"{len(not_done)} of 300 futures never resolved after {proxied.resets} resets"
        assert sorted(f.result() for f in futures) == list(range(300))
        # nothing is left pending in the dispatcher for this client: every delivery was acknowledged
        with Client(cluster.address) as observer:
            wait_until(lambda: observer.status()["queued"] == 0 and observer.status()["running"] == 0,
                       what="the dispatcher to hold no more work")


def test_a_workers_outcomes_survive_connection_resets(cluster: Cluster, proxied: ResetProxy) -> None:
    """The worker's link is reset every 0.3 s: outcomes queued on a broken connection are sent again and
    counted once (fenced by attempt)."""
    name = cluster.start_worker("threads", 4, None, None)
    # The worker reaches the dispatcher through the proxy; the client does not.
    cluster.workers[name].terminate()
    cluster.workers[name].wait(10)
    del cluster.workers[name]
    saved = cluster.address
    cluster.address = proxied.address
    name = cluster.start_worker("threads", 4)
    cluster.address = saved
    client = cluster.client()
    cluster.wait_for_workers(name)
    stop = threading.Event()
    resetter = threading.Thread(target=_keep_resetting, args=(proxied, stop, 0.3), daemon=True)
    resetter.start()
    try:
        futures = [client.submit(tasks.sleep_for, 0.01, i) for i in range(300)]
        _, not_done = wait(futures, timeout=60)
    finally:
        stop.set()
        resetter.join()
    assert proxied.resets >= 3
    assert not not_done, f"{len(not_done)} of 300 futures never resolved after {proxied.resets} resets"
    assert sorted(f.result() for f in futures) == list(range(300))
    assert client.duplicate_results == 0

"""Large arguments through /dev/shm on one host (conveyor/transport/shm.py), with real processes: the
worker (or its child) reads the segment instead of receiving the bytes, peers without it fall back to
frames over TCP, an accepted job survives a kill -9 of the dispatcher, and no segment is left behind."""

from __future__ import annotations

import hashlib
import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor.transport import shm
from tests import shm_tasks
from tests.conftest import Cluster, wait_until

pytestmark = pytest.mark.skipif(not shm.namespace_id(), reason="no usable /dev/shm")

BIG = 3 * shm.SHM_MIN_BYTES + 12345  # over the threshold: goes as a segment where it can


def _segments(pids: set[int]) -> list[str]:
    """The Conveyor segments in /dev/shm made by these processes (other tests on the machine make theirs)."""
    out = []
    for name in os.listdir(shm.SHM_DIR):
        m = re.match(r"conveyor-[cd]-[0-9a-f]+-([0-9]+)-", name)
        if m and int(m.group(1)) in pids:
            out.append(name)
    return out


@pytest.fixture
def pids(cluster: Cluster) -> Iterator[set[int]]:
    """Pids whose segments must all be gone at the end: this process, the dispatchers, the workers."""
    seen = {os.getpid()}
    yield seen
    cluster.stop()
    seen.add(cluster.dispatcher.pid if cluster.dispatcher else 0)
    seen.update(p.pid for p in cluster.workers.values())
    wait_until(lambda: not _segments(seen), timeout=10, what="every segment to be removed")


def _data(seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (BIG // 32) + b"tail"


def _shm_totals(client: Any) -> tuple[int, int]:
    """(segments the dispatcher took over from clients, segments it named in ASSIGN)."""
    totals = client.status()["totals"]
    return totals["shm_in"], totals["shm_out"]


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_a_worker_on_the_clients_host_reads_the_argument_from_shared_memory(
    cluster: Cluster, pids: set[int], mode: str
) -> None:
    cluster.wait_for_workers(cluster.start_worker(mode, 2))
    client = cluster.client()
    data = [_data(i) for i in range(4)]
    outs: list[dict[str, Any]] = [f.result(60) for f in [client.submit(shm_tasks.digest, d) for d in data]]
    for d, out in zip(data, outs, strict=True):
        assert out == {"type": "bytes", "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
    assert _shm_totals(client) == (4, 4)  # each went client -> segment -> worker, not over TCP
    assert client.submit(shm_tasks.digest, b"small").result(30)["size"] == 5  # a small one is a frame
    assert _shm_totals(client) == (4, 4)
    assert cluster.dispatcher is not None
    pids.add(cluster.dispatcher.pid)
    wait_until(lambda: not _segments(pids), timeout=10, what="the finished jobs' segments to be removed")


def test_without_a_shared_dev_shm_the_argument_goes_over_tcp(
    cluster: Cluster, pids: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_SHM", "0")  # this worker has no /dev/shm in common with the dispatcher
    cluster.wait_for_workers(cluster.start_worker("processes", 1))
    monkeypatch.delenv("CONVEYOR_SHM")
    client = cluster.client()  # ...but the client has: it sends a segment, the dispatcher sends frames
    d = _data(7)
    assert client.submit(shm_tasks.digest, d).result(60)["sha256"] == hashlib.sha256(d).hexdigest()
    assert _shm_totals(client) == (1, 0)
    monkeypatch.setenv("CONVEYOR_SHM", "0")
    with cluster.client() as plain:  # a client without /dev/shm: frames all the way, no segment at all
        assert plain.submit(shm_tasks.digest, d).result(60)["sha256"] == hashlib.sha256(d).hexdigest()
    assert _shm_totals(client) == (1, 0)


def test_an_accepted_job_survives_a_dispatcher_kill_9_and_its_segment_is_swept(
    cluster: Cluster, pids: set[int]
) -> None:
    assert cluster.dispatcher is not None
    first = cluster.dispatcher.pid
    pids.add(first)
    client = cluster.client(reconnect_timeout=60)
    d = _data(11)
    job = client.submit(shm_tasks.digest, d)  # no worker yet: it waits in the queue
    wait_until(lambda: (client.job_info(job.job_id)[0] or {}).get("state") == "queued", what="the job accepted")
    held = _segments({first})
    assert held and all(n.startswith("conveyor-d-") for n in held), held  # the dispatcher's, not the client's
    cluster.dispatcher.send_signal(signal.SIGKILL)
    cluster.dispatcher.wait()
    assert _segments({first}) == held  # a killed dispatcher leaves its segment behind...
    cluster.start_dispatcher()  # same port, same journal
    pids.add(cluster.dispatcher.pid)
    wait_until(lambda: not _segments({first}), timeout=20, what="the new dispatcher to sweep the dead one's segment")
    cluster.wait_for_workers(cluster.start_worker("processes", 1))
    out = job.result(60)  # ...and the job comes back from the journal, bytes intact
    assert out == {"type": "bytes", "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
    assert _shm_totals(client) == (0, 0)  # after the restart its call is the journal's copy, sent as frames

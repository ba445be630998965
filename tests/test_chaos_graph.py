"""A random DAG under kill -9 of a worker and of the dispatcher: every node's final value matches a
local evaluation of the same DAG (workers re-run what they lost; the journal keeps the graph)."""

from __future__ import annotations

import random
import signal

from tests import graph_tasks as g
from tests.conftest import Cluster, wait_until

NODES = 1000


def test_a_random_dag_survives_worker_and_dispatcher_kills(cluster: Cluster) -> None:
    rng = random.Random(15)
    parents = [sorted(rng.sample(range(i), min(i, rng.randint(0, 3)))) for i in range(NODES)]
    expected: list[int] = []
    for i, ps in enumerate(parents):  # the same DAG, evaluated here
        expected.append((i * 7919 + sum(expected[p] for p in ps) * 31) % 1_000_003)
    first = cluster.start_worker("threads", 4, name="w1")
    cluster.start_worker("threads", 4, name="w2")
    cluster.wait_for_workers("w1", "w2")
    client = cluster.client(reconnect_timeout=60)
    with client.batch():
        futures: list = []
        for i, ps in enumerate(parents):
            futures.append(client.submit(g.combine, i, *(futures[p] for p in ps)))
    done_at: list[int] = []
    wait_until(lambda: sum(f.done() for f in futures) >= NODES // 4, timeout=60, what="a quarter done")
    cluster.workers[first].send_signal(signal.SIGKILL)  # its running nodes are lost: run again elsewhere
    done_at.append(sum(f.done() for f in futures))
    cluster.start_worker("threads", 4, name="w3")
    wait_until(lambda: sum(f.done() for f in futures) >= NODES // 2, timeout=60, what="half done")
    assert cluster.dispatcher is not None
    cluster.dispatcher.send_signal(signal.SIGKILL)
    done_at.append(sum(f.done() for f in futures))
    cluster.dispatcher.wait()
    cluster.start_dispatcher()  # same port, same journal
    assert [f.result(60) for f in futures] == expected
    assert all(n < NODES for n in done_at), done_at  # both kills came mid-graph

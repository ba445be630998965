"""A graph across a kill -9 of the dispatcher: edges and waiting jobs are in the journal, so after a
restart finished nodes are not run again, waiting nodes still wait, and every node finishes once."""

from __future__ import annotations

import signal
from collections import Counter

from tests import graph_tasks as g
from tests.conftest import Cluster, wait_until


def test_a_graph_survives_kill_9_of_the_dispatcher(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 4, name="t"))
    client = cluster.client(reconnect_timeout=60)
    runs, gate_file = str(cluster.tmp / "runs"), cluster.tmp / "gate"
    early = [client.submit(g.node, runs, f"e{i}") for i in range(3)]
    assert [f.result(20) for f in early] == ["e0()", "e1()", "e2()"]
    gate = client.submit(g.wait_file, str(gate_file), "gate")  # runs across the crash
    fan_in = client.submit(g.node, runs, "f", *early, gate)
    c1 = client.submit(g.node, runs, "c1", fan_in)
    c2 = client.submit(g.node, runs, "c2", c1)
    ordered = client.options(after=[gate]).submit(g.node, runs, "d", early[0])
    waiting = [fan_in, c1, c2, ordered]
    assert client._conn is not None
    # ACCEPTED comes after the commit that holds them, and with it everything finished before (early).
    client._conn.wait_accepted(waiting, 20)
    assert all(f._accepted for f in waiting)
    assert [v and v["state"] for v in client.job_info(*(f.job_id for f in waiting))] == ["waiting"] * 4

    assert cluster.dispatcher is not None
    cluster.dispatcher.send_signal(signal.SIGKILL)
    cluster.dispatcher.wait()
    cluster.start_dispatcher()  # same port, same journal
    wait_until(lambda: [v and v["state"] for v in client.job_info(*(f.job_id for f in waiting))] == ["waiting"] * 4,
               what="the restarted dispatcher to hold the waiting nodes")
    gate_file.touch()
    assert c2.result(30) == "c2(c1(f(e0(),e1(),e2(),gate)))"
    assert ordered.result(30) == "d(e0())"
    assert fan_in.result(5) == "f(e0(),e1(),e2(),gate)"
    ran = Counter((cluster.tmp / "runs").read_text().split())
    assert ran == Counter(["e0", "e1", "e2", "f", "c1", "c2", "d"])  # each node once: none re-run

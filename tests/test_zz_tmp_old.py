from tests import tasks
from tests.conftest import Cluster, stop_process, wait_until


def test_old_sigterm(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 2)
    cluster.wait_for_workers(name)
    with cluster.client() as client:
        fut = client.submit(tasks.sleep, 1.0)
        wait_until(lambda: client.status()["running"] == 1, what="the task to start")
        assert stop_process(cluster.workers[name]) == 0
        assert fut.result(10) == 1.0

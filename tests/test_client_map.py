"""Client.map and starmap with default arguments: automatic chunks for tiny tasks, one job per slow task,
input order, errors at their item's position, and early stops that cancel what is in flight.

How fast is measured by `python -m benchmarks` (workload default_map), not here: these tests count jobs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import Client
from conveyor.client.mapping import MAX_CHUNK_ITEMS, TARGET_CHUNK_S, ChunkPlanner, slots_for
from tests import client_tasks, tasks
from tests.conftest import Cluster, wait_until

SLOTS = 4


@pytest.fixture(scope="module")
def threads_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("map-cluster")))
    c.start_dispatcher()
    try:
        c.wait_for_workers(c.start_worker("threads", SLOTS))
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(threads_cluster: Cluster) -> Iterator[Client]:
    with Client(threads_cluster.address) as c:
        yield c


def _submitted(client: Client) -> int:
    return int(client.status()["totals"]["submitted"])


def test_tiny_tasks_travel_in_chunks_in_input_order(client: Client) -> None:
    n = 30_000
    before = _submitted(client)
    assert list(client.map(tasks.noop, range(n))) == list(range(n))
    jobs = _submitted(client) - before
    assert jobs <= n // 8, f"{jobs} jobs for {n} tiny tasks: not chunked"


def test_slow_tasks_get_a_job_each(client: Client) -> None:
    """Tasks much longer than a chunk's target duration: per-item jobs, spread over every slot."""
    n = 3 * SLOTS
    before = _submitted(client)
    assert list(client.map(client_tasks.sleep_then, [0.05] * n, range(n))) == list(range(n))
    assert _submitted(client) - before == n


def test_starmap_and_several_iterables(client: Client) -> None:
    pairs = [(i, -i) for i in range(5000)]
    assert list(client.starmap(client_tasks.pair, pairs)) == [[a, b] for a, b in pairs]
    assert list(client.map(tasks.add, range(3000), itertools.count())) == [2 * i for i in range(3000)]
    assert list(client.map(tasks.noop, [])) == []


@pytest.mark.parametrize("chunksize", [None, 100])
def test_an_error_surfaces_at_its_items_position(client: Client, chunksize: int | None) -> None:
    """The results before the failing item come out, then its own exception: a failed chunk is split."""
    n, bad = 5000, 3777
    got: list[int] = []
    with pytest.raises(ValueError, match=f"item {bad} is bad"):
        for value in client.map(client_tasks.fail_at, range(n), [bad] * n, chunksize=chunksize):
            got.append(value)
    assert got == list(range(bad))
    wait_until(lambda: not client.pending(), what="the jobs after the failure to be cancelled or done")


def test_stopping_early_cancels_what_is_in_flight(client: Client) -> None:
    before = client.status()["totals"]["cancelled"]
    results = client.map(client_tasks.sleep_then, [0.2] * 40, range(40))
    assert next(results) == 0
    results.close()  # type: ignore[attr-defined]
    wait_until(lambda: not client.pending(), what="the map's jobs to be cancelled")
    assert client.status()["totals"]["cancelled"] > before


def test_the_results_a_map_yielded_are_not_kept_alive(client: Client) -> None:
    import gc
    import weakref

    for chunksize in (None, 1, 7):
        for obj in client.map(client_tasks.make_dummy, range(50), chunksize=chunksize):
            ref = weakref.ref(obj)
            del obj
            if ref() is not None:  # not freed by reference counting alone: is it only garbage?
                gc.collect()
            assert ref() is None, f"chunksize={chunksize}: the map keeps its yielded result alive"


def test_explicit_chunksize_and_window_still_apply(client: Client) -> None:
    before = _submitted(client)
    assert list(client.map(tasks.noop, range(1000), chunksize=100, window=2)) == list(range(1000))
    assert _submitted(client) - before == 10
    with pytest.raises(ValueError):
        client.map(tasks.noop, range(3), chunksize=0)
    with pytest.raises(ValueError):
        client.map(tasks.noop, range(3), window=0)


# --- the planner alone: time passed in ------------------------------------------------------------


def test_the_planner_starts_with_single_items_and_grows_with_the_rate() -> None:
    p = ChunkPlanner(now=0.0)
    assert p.size(0.0) == 1 and p.max_jobs() == 8  # nothing known yet
    p.slots = 4
    assert p.size(0.001) == 1  # no completion yet
    for i in range(100):  # 100 items in 10 ms on 4 slots: 10,000 items/s, so at most 0.4 ms each
        p.completed(1, 0.0001 * (i + 1))
    assert p.size(0.010) == int(TARGET_CHUNK_S * 10_000 / 4)
    for i in range(1000):
        p.completed(64, 0.010 + 0.00004 * i)  # 1.6 M items/s
    assert p.size(0.050) == MAX_CHUNK_ITEMS
    assert p.max_jobs() == 2 * 4 + 8


def test_the_planner_keeps_slow_tasks_alone_and_small_chunks_of_big_items() -> None:
    p = ChunkPlanner(now=0.0)
    p.slots = 4
    for i in range(8):  # 4 slots, 0.1 s per task
        p.completed(1, 0.1 * (i // 4 + 1))
    assert p.size(0.2) == 1
    q = ChunkPlanner(now=0.0)
    q.slots = 1
    for i in range(1000):
        q.completed(100, 0.00001 * i)
    q.encoded(10, 10 << 20)  # 1 MiB per item
    assert q.size(0.01) == 1
    r = ChunkPlanner(now=0.0)
    r.completed(10, 0.01, duration_s=0.001)  # a reported duration: 0.1 ms per item
    assert r.size(0.01) == int(TARGET_CHUNK_S / 0.0001)


def test_slots_count_only_workers_that_can_run_the_task() -> None:
    status = {"workers": [
        {"mode": "threads", "tags": ["gpu"], "concurrency": 4, "draining": False},
        {"mode": "processes", "tags": [], "concurrency": 2, "draining": False},
        {"mode": "threads", "tags": [], "concurrency": 8, "draining": True},
    ]}
    assert slots_for(status, None, frozenset()) == 6
    assert slots_for(status, "threads", frozenset()) == 4
    assert slots_for(status, None, frozenset({"gpu"})) == 4
    assert slots_for(status, "asyncio", frozenset()) == 0

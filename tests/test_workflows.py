"""Dependencies end to end, over real processes: futures as arguments (fan-in, chains, nesting), then(),
after=, allow_failure, failure and cancellation propagating, unknown parents, batches (docs/workflows.md)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import AsyncClient, DependencyCancelled, DependencyFailed, Failed, UnknownDependency
from conveyor.client.deps import Deps
from conveyor.client.future import JobFuture
from conveyor.protocol.payload import (
    ParentRange,
    ParentRef,
    decode_call,
    encode_call,
    encode_value,
    pack_task,
    unpack_task,
)
from tests import graph_tasks as g
from tests.conftest import ROOT, Cluster, wait_until


@pytest.fixture
def client(cluster: Cluster) -> conveyor.Client:
    cluster.start_worker("threads", concurrency=4, name="t")
    cluster.wait_for_workers("t")
    return cluster.clients[0]


def test_futures_as_arguments_fan_in_chain_nesting_then_and_after(client: conveyor.Client, tmp_path: Path) -> None:
    parts = [client.submit(g.slow, 0.1, i) for i in range(6)]
    fan_in = client.submit(g.total, parts)  # a list of futures: each becomes the parent's value
    assert fan_in.result(10) == 15
    # Many quick parents: some finish (and are acknowledged) before the fan-in leaves, some after.
    many = [client.submit(g.inc, i) for i in range(2000)]
    assert client.submit(g.total, many).result(20) == sum(range(1, 2001))
    assert client.submit(g.structure, many).result(20) == [[list(range(1, 2001))], {}]  # joined, in order
    x = client.submit(g.slow, 0.2, 5)
    nested = client.submit(g.structure, [x, (x, {"k": x})], key={"v": [x]})  # tuples go by pickle
    assert nested.result(10) == [[[5, (5, {"k": 5})]], {"key": {"v": [5]}}]
    chain = client.submit(g.slow, 0.1, 1).then(g.add, 10).then(g.inc)  # fn(result, *args)
    assert chain.result(10) == 12
    tagged = client.options(keep=True, priority=3).submit(g.inc, 1).then(g.inc)  # as its parent was submitted
    assert tagged.result(10) == 3
    assert (client.job_info(tagged.job_id)[0] or {}).get("priority") == 3
    log = tmp_path / "order"
    first = client.submit(g.mark, str(log), "first")
    then_second = client.options(after=[client.submit(g.slow, 0.3, None), first]).submit(g.mark, str(log), "second")
    assert then_second.result(10) == "second"
    assert log.read_text().split() == ["first", "second"]
    # A parent whose outcome this client has already (and the dispatcher forgot): passed by value.
    done = client.submit(g.inc, 41)
    assert done.result(10) == 42
    wait_until(lambda: client.job_info(done.job_id) == [None], what="the dispatcher to forget a delivered job")
    assert client.submit(g.inc, done).result(10) == 43


def test_failure_propagates_to_every_dependant_naming_the_root(client: conveyor.Client) -> None:
    root = client.submit(g.fail, "bad input")
    child = client.submit(g.inc, root)
    grandchild = child.then(g.inc)
    for fut in (child, grandchild):
        with pytest.raises(DependencyFailed) as err:
            fut.result(10)
        assert err.value.root == root.job_id
        assert err.value.root_fn == "tests.graph_tasks:fail"
        assert "ValueError: bad input" in str(err.value)
        cause = err.value.__cause__  # the root's own error, of its own type (rebuilt from its error frames)
        assert type(cause) is ValueError and str(cause) == "bad input", repr(cause)
    assert grandchild.info["state"] == "failed"
    # allow_failure: the dependant runs, and receives conveyor.Failed(error) for that parent.
    bad = client.submit(g.fail, "no")
    good = client.submit(g.inc, 1)
    mixed = client.options(allow_failure=[bad]).submit(g.structure, good, g_bad=None)
    assert mixed.result(10) == [[2], {"g_bad": None}]
    got = client.options(allow_failure=True).submit(g.describe, bad).result(10)
    assert got == f"Failed:ValueError:{bad.job_id}:failed"
    # A parent already failed here: the dependant fails at once, without a round trip.
    with pytest.raises(ValueError):
        bad.result(10)
    with pytest.raises(DependencyFailed) as err:
        client.submit(g.inc, bad).result(1)
    assert type(err.value.__cause__) is ValueError  # the parent's own exception
    with pytest.raises(DependencyFailed) as err:
        client.submit(g.inc, grandchild).result(1)  # (a parent that failed as a dependant: the root's)
    assert type(err.value.__cause__) is ValueError and err.value.root == root.job_id
    assert not Failed(ValueError("x"))


def test_cancelling_a_parent_cancels_its_dependants(client: conveyor.Client) -> None:
    parent = client.submit(g.slow, 5.0, 1)
    child = client.submit(g.inc, parent)
    grandchild = client.options(after=child).submit(g.inc, 1)
    wait_until(lambda: (client.job_info(child.job_id)[0] or {}).get("state") == "waiting", what="child waiting")
    assert client.cancel(parent) == [parent.job_id]
    for fut in (child, grandchild):
        with pytest.raises(DependencyCancelled) as err:
            fut.result(10)
        assert err.value.root == parent.job_id


def test_an_unknown_parent_fails_the_submit_at_once(client: conveyor.Client) -> None:
    started = time.monotonic()
    with pytest.raises(UnknownDependency, match="never-submitted"):
        client.submit(g.inc, conveyor.ref("never-submitted")).result(5)
    with pytest.raises(UnknownDependency):
        client.options(after=[conveyor.ref("nor-this")]).submit(g.inc, 1).result(5)
    assert time.monotonic() - started < 2.0
    # conveyor.ref of a job another client submitted (and keeps): its result is passed.
    other = conveyor.Client(client.address)
    try:
        kept = other.options(keep=True).submit(g.inc, 99)
        assert kept.result(10) == 100
    finally:
        other.close()
    assert client.submit(g.inc, conveyor.ref(kept.job_id)).result(10) == 101


def test_a_batch_is_one_submit_accepted_all_or_none(client: conveyor.Client, tmp_path: Path) -> None:
    log = tmp_path / "ran"
    with client.batch() as batch:
        a = client.submit(g.inc, 1)
        b = client.submit(g.add, a, 10)  # a parent in the same batch
        c = b.then(g.inc)
    assert [f.result(10) for f in batch] == [2, 12, 13]
    assert list(batch) == [a, b, c]
    with client.batch() as bad:
        ran = client.submit(g.mark, str(log), "ran")
        client.submit(g.inc, conveyor.ref("missing"))  # one unknown parent: nothing of the batch is accepted
    for fut in bad:
        with pytest.raises(UnknownDependency, match="batch was not accepted"):
            fut.result(10)
    assert not log.exists() and ran.done()
    with pytest.raises(ZeroDivisionError), client.batch() as dropped:  # an error inside: nothing is sent
        client.submit(g.inc, 1)
        _ = 1 / 0
    assert all(f.cancelled() for f in dropped)


def test_values_cross_processes_mode_and_a_withheld_large_result_is_fetched(cluster: Cluster) -> None:
    cluster.start_worker("processes", concurrency=2, name="p")
    cluster.wait_for_workers("p")
    client = cluster.clients[0]
    big = client.submit(g.blob, 1 << 20)  # 1 MiB: withheld from this client while its dependant needs it
    assert client.submit(g.length, big).result(20) == 1 << 20
    wait_until(lambda: big.done(), what="the parent's (withheld) outcome")
    assert big.withheld
    assert len(big.result(10)) == 1 << 20  # the client still gets it, asked for (WATCH)
    assert not big.withheld and big.result(0) == b"x" * (1 << 20)  # kept here from then on
    pair = client.submit(g.slow, 0.1, (1, 2))  # a tuple result: pickled, substituted in the child
    assert client.submit(g.structure, {"p": pair}).result(10) == [[{"p": (1, 2)}], {}]
    many = [client.submit(g.inc, i) for i in range(300)]  # joined parents (protocol.md §8.3), in a child
    assert client.submit(g.structure, many).result(20) == [[list(range(1, 301))], {}]


def test_async_client_futures_and_then(cluster: Cluster) -> None:
    cluster.start_worker("asyncio", concurrency=10, name="a")
    cluster.wait_for_workers("a")

    async def main() -> tuple[int, int]:
        async with AsyncClient(cluster.address) as ac:
            parts = [ac.submit(g.inc, i) for i in range(4)]
            fan_in = ac.submit(g.total, parts)
            return await fan_in, await parts[0].then(g.add, 5)

    assert asyncio.run(main()) == (10, 6)


def test_parent_references_in_both_codecs() -> None:
    """msgpack (plain values) and pickle (anything else) both put the parents' values in place."""
    for args in (([ParentRef(0), {"k": ParentRef(1)}],), ((ParentRef(0), ParentRef(1)),)):
        frames = encode_call("tests.graph_tasks:structure", None, args, {"x": ParentRef(1)}, refs=True)
        call = decode_call(frames, ["zero", {"one": 1}])
        first = call.args[0]
        assert list(first) == ["zero", {"k": {"one": 1}}] if isinstance(first, list) else first == ("zero", {"one": 1})
        assert call.kwargs == {"x": {"one": 1}}


def test_the_worked_example_of_docs_workflows(client: conveyor.Client) -> None:
    """examples/workflow.py, as docs/workflows.md shows it: fan-out, fan-in, chain, then a failure."""
    out = subprocess.run([sys.executable, "examples/workflow.py", client.address or ""], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.splitlines() == [
        "top words: the=6, dog=3, fox=3",
        "failed as expected: root is the empty text's job: True; cause: ValueError('an empty text')",
    ]
    assert out.splitlines()[0] in (ROOT / "docs" / "workflows.md").read_text()


def test_a_list_of_futures_is_one_reference_and_many_results_decode_at_once() -> None:
    """A fan-in's list of futures travels as ParentRange; its values, one msgpack frame each, are decoded
    in one call; a pickled or failed parent among them takes the slow path, with the same values."""
    for refs, expected in (((ParentRange(0, 3),), ["a", "b", "c"]), (((ParentRange(0, 3), ParentRef(2)),),
                                                                        (["a", "b", "c"], "c"))):
        call = decode_call(encode_call("tests.graph_tasks:structure", None, refs, {}, refs=True), ["a", "b", "c"])
        assert call.args[0] == expected
    values: list[object] = [float(i) for i in range(200)]
    values[7] = (1, 2)  # a tuple: pickled, so the one-call path falls back
    for vals in (values[:7] + values[8:], values):
        frames = [f for v in vals for f in encode_value(v)]
        call_frames = encode_call("tests.graph_tasks:structure", None, (ParentRange(0, len(vals)),), {}, refs=True)
        packed = unpack_task(pack_task(len(call_frames), [1] * len(vals), [], [*call_frames, *frames]))
        assert packed is not None
        got = decode_call(packed[0], packed[1].values(lambda *a: None))
        assert got.args[0] == vals
    # Some parents of a range finished here before the SUBMIT left: they are inlined, the rest renumbered.
    futures = [JobFuture(f"j{i}", None) for i in range(3)]
    deps = Deps("m:f", None, [ParentRange(0, 3)], {"k": ParentRef(2)}, futures, [], frozenset())
    deps._inline({1: "one"})
    assert deps.args == [[ParentRef(0), "one", ParentRef(1)]] and deps.kwargs == {"k": ParentRef(1)}
    assert [f.job_id for f in deps.parents] == ["j0", "j2"]


def test_a_100_mb_parent_feeds_its_dependant_without_passing_through_the_client(client: conveyor.Client) -> None:
    """By reference: the client process's peak memory grows by far less than the 100 MB result while
    the dependant runs; the result stays in the dispatcher, and the client gets it when it asks."""
    proc = subprocess.run([sys.executable, "-m", "tests.graph_client", client.address or ""], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["length"] == 100 << 20 and out["withheld"] and out["fetched"] == 100 << 20
    assert out["peak_growth_kib"] < 10 * 1024, out  # well under the 100 MB: it never came here
    assert out["peak_growth_after_fetch_kib"] > 100 * 1024, out  # the check can fail: fetching shows


def test_a_dependants_countdown_counts_from_when_its_parents_are_done(client: conveyor.Client) -> None:
    keep = client.options(keep=True)
    parent = keep.submit(g.slow, 0.5, 1)
    child = keep.options(countdown=0.3).submit(g.inc, parent)  # due 0.3 s after the parent ends, not after now
    assert child.result(10) == 2
    parent_view, child_view = client.job_info(parent.job_id, child.job_id)
    assert parent_view is not None and child_view is not None
    gap_s = child_view["history"][0]["started"] - parent_view["history"][-1]["finished"]
    assert gap_s >= 0.25, gap_s  # counted from submission it would have been due before the parent ended


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_a_task_submits_a_child_through_current_client(cluster: Cluster, mode: str) -> None:
    cluster.wait_for_workers(cluster.start_worker(mode, concurrency=2, name="w"))  # a slot for the child
    client = cluster.clients[0]
    assert client.submit(g.with_child, 1).result(30) == 102
    with pytest.raises(RuntimeError, match="running as a task"):
        conveyor.current_client()  # not in a task


@pytest.mark.parametrize("prefetch", ["0", "auto"])
def test_a_one_slot_worker_lends_the_slot_of_a_task_waiting_on_its_child(cluster: Cluster, prefetch: str) -> None:
    """Ray's rule: a task blocked on its child lends its slot, so one slot runs a whole tree of waits."""
    cluster.wait_for_workers(cluster.start_worker("threads", 1, None, "one", "--prefetch", prefetch))
    client = cluster.clients[0]
    assert client.submit(g.with_grandchild, 1).result(20) == 1102  # two levels of waiting on one slot
    fan = client.submit(g.with_children, [1, 2, 3], 0.3)  # waited on child by child

    def worker() -> dict[str, Any]:
        return client.status()["workers"][0]  # type: ignore[no-any-return]

    lent = wait_until(lambda: worker()["lent"] == 1 and worker(), 10, what="the slot to be lent")
    assert lent["concurrency"] == 1
    if prefetch == "0":  # (auto prefetch may hold a second child too, waiting for a slot)
        assert lent["running"] == 2  # the waiting task and its child, on one slot
    assert fan.result(20) == [1, 2, 3]
    back = wait_until(lambda: (w := worker())["running"] == 0 and w["lent"] == 0 and w, 10, what="the slot back")
    assert back["done"] >= 7
    assert client.submit(g.inc, 1).result(10) == 2  # and the worker takes work as before


def test_map_over_futures_passes_each_parents_value_and_after_orders_every_item(client: conveyor.Client,
                                                                             tmp_path: Path) -> None:
    parents = [client.submit(g.slow, 0.05, i) for i in range(12)]
    assert list(client.map(g.inc, parents)) == list(range(1, 13))  # automatic chunks: those items go alone
    mixed = [1, parents[2], 3, 4, parents[5], 6]
    assert list(client.map(g.add, mixed, [10] * 6, chunksize=3)) == [11, 12, 13, 14, 15, 16]
    log = tmp_path / "order"
    gate = client.submit(g.slow, 0.3, None)
    first = client.submit(g.mark, str(log), "first")
    after = client.options(after=[gate, first]).map(g.mark, [str(log)] * 5, ["after"] * 5, chunksize=2)
    assert list(after) == ["after"] * 5
    assert log.read_text().split() == ["first"] + ["after"] * 5

"""Template limit keys (`tenant:{tenant_id}`): the client fills them in per call, the dispatcher applies
the template's rule to each filled-in key on its own and drops idle ones. Pure tests with a fake clock,
the client's filling-in, and one run over real processes."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conveyor import Executor
from conveyor.client.base import wire_options
from conveyor.client.limitkeys import call_arguments, filled_limits
from conveyor.client.schedules import upsert
from conveyor.dispatcher.limits import SWEEP_MIN, Limits, Rule, parse_declaration
from conveyor.dispatcher.scheduler import Scheduler
from conveyor.dispatcher.timing import check_limits
from conveyor.protocol import commands as c
from conveyor.protocol.commands import TaskOptions
from conveyor.protocol.limitkeys import fill
from tests import waiting_tasks as wt
from tests.conftest import Cluster
from tests.test_cli import assert_ok, assert_one_error_line, run_cli, show
from tests.test_client_waiting import attempt_spans, max_overlap, worst_window
from tests.test_scheduler import CLIENT, FRAMES, ok, ready, run
from tests.test_waiting import started


def make() -> Scheduler:
    return Scheduler(rng=random.Random(7))


def add(s: Scheduler, job_id: str, key: str, now: float = 0.0) -> None:
    s.submit(job_id, TaskOptions(fn="t:f", limits=(key,)), list(FRAMES), CLIENT, now, None, None)


# --- the dispatcher (pure) ----------------------------------------------------------------------------------


def test_a_template_rule_applies_to_each_filled_in_key_on_its_own() -> None:
    s = make()
    s.limits.declare("tenant:{tenant_id}", Rule(concurrency=1), 0.0)
    for job_id, key in (("a1", "tenant:a"), ("a2", "tenant:a"), ("b1", "tenant:b"), ("b2", "tenant:b")):
        add(s, job_id, key)
    ready(s, b"w", concurrency=8)
    assert sorted(started(run(s))) == ["a1", "b1"]  # one of each tenant at once, the two side by side
    ok(s, b"w", "a1", 1)
    assert started(run(s, 1.0)) == ["a2"]  # a's slot came back; b's is still taken
    view = {r["key"]: r for r in s.limits_view(1.0)}
    assert view["tenant:{tenant_id}"]["keys"] == 2 and view["tenant:{tenant_id}"]["running"] == 2
    assert view["tenant:b"]["template"] == "tenant:{tenant_id}" and view["tenant:b"]["waiting"] == 1


def test_a_filled_in_rate_key_starts_as_if_declared_with_its_template() -> None:
    s = make()
    s.limits.declare("t:{n}", Rule(rate_per_s=10.0, burst=2), 0.0)
    for i in range(3):
        add(s, f"x{i}", "t:x", now=5.0)
    add(s, "y0", "t:y", now=5.0)
    ready(s, b"w", concurrency=8, now=5.0)
    # Declared at 0, so by 5 s each bucket is full: a burst of 2 for x, 1 for y, then x's spacing.
    assert sorted(started(run(s, 5.0))) == ["x0", "x1", "y0"]
    assert s.next_timer() == pytest.approx(5.1)
    assert started(run(s, 5.1)) == ["x2"]
    # A template declared just now: its keys start empty, as a key declared at a restart does.
    s.limits.declare("u:{n}", Rule(rate_per_s=10.0), 6.0)
    add(s, "u0", "u:1", now=6.0)
    assert started(run(s, 6.0)) == [] and s.next_timer() == pytest.approx(6.1)


def test_idle_filled_in_keys_are_dropped_and_memory_stays_bounded() -> None:
    s = make()
    s.limits.declare("tenant:{id}", Rule(concurrency=1), 0.0)
    add(s, "busy", "tenant:busy")
    ready(s, b"w", concurrency=1)
    assert started(run(s)) == ["busy"]
    ready(s, b"w2", concurrency=1)
    for i in range(5000):  # one job per tenant, each run and done
        now = 1.0 + i
        add(s, f"j{i}", f"tenant:{i}", now)
        assert started(run(s, now)) == [f"j{i}"]
        ok(s, b"w2", f"j{i}", 1, now)
        assert len(s.limits.keys) <= 2 * SWEEP_MIN + 1
    [template, busy] = s.limits_view(10_000.0)  # the view sweeps: only the live key is left
    assert (template["key"], template["keys"], template["running"], template["starts"]) == ("tenant:{id}", 1, 1, 5001)
    assert (busy["key"], busy["running"]) == ("tenant:busy", 1)


def test_a_rate_key_is_dropped_only_once_its_bucket_is_full_again() -> None:
    limits = Limits()
    limits.declare("k:{n}", Rule(rate_per_s=1.0), 0.0)
    assert limits.allows(("k:1",), 10.0)
    limits.start(("k:1",), 10.0)
    limits.end(("k:1",))
    assert limits.sweep(10.5) == 0 and not limits.allows(("k:1",), 10.5)  # still spaced: kept
    assert limits.sweep(11.0) == 1 and limits.keys == {}
    assert limits.allows(("k:1",), 11.0)  # made again, full as it was


def test_a_key_declared_by_name_wins_and_bad_templates_are_refused() -> None:
    limits = Limits()
    limits.declare("tenant:{id}", Rule(concurrency=1), 0.0)
    limits.declare("tenant:vip", Rule(concurrency=5), 0.0)
    limits.declare("tenant:{id}:{region}", Rule(concurrency=3), 0.0)
    state = limits.state("tenant:vip", 0.0)
    assert state is not None and state.rule == Rule(concurrency=5) and state.template is None
    state = limits.state("tenant:7:eu", 0.0)  # the more specific template
    assert state is not None and state.rule == Rule(concurrency=3)
    assert limits.known("tenant:7") and not limits.known("other:7")
    check_limits(TaskOptions(limits=("tenant:7",)), limits)
    with pytest.raises(ValueError, match="is a template"):
        check_limits(TaskOptions(limits=("tenant:{id}",)), limits)
    with pytest.raises(ValueError, match="unknown limit key 'other:7'"):
        check_limits(TaskOptions(limits=("other:7",)), limits)
    assert parse_declaration("tenant:{tenant_id}=10/s")[0] == "tenant:{tenant_id}"
    for bad in ("t:{}=10/s", "t:{1x}=10/s", "t:{a=10/s", "t:}a{=10/s"):
        with pytest.raises(ValueError, match="bad limit"):
            parse_declaration(bad)
    assert limits.remove("tenant:{id}") and not limits.known("tenant:8") and limits.known("tenant:vip")


OPS = st.lists(st.tuples(st.sampled_from(["start", "end", "sweep"]), st.integers(0, 5), st.floats(0.0, 0.4)),
               max_size=120)


@settings(max_examples=80, deadline=None)
@given(ops=OPS)
@example(ops=[("sweep", 0, 0.4)] * 3 + [("start", 0, 0.0)] + [("end", 0, 0.0)] * 4 + [("sweep", 0, 0.0),
                                                                                        ("start", 0, 0.0)])
def test_sweeping_never_lets_a_key_over_its_rule(ops: list[tuple[str, int, float]]) -> None:
    """Whatever the order of starts, ends and sweeps, each filled-in key keeps its template's rule."""
    limits, now = Limits(), 0.0
    limits.declare("c:{n}", Rule(concurrency=2), 0.0)
    limits.declare("r:{n}", Rule(rate_per_s=5.0, burst=2), 0.0)
    running: list[str] = []
    starts: dict[str, list[float]] = {}
    for op, n, dt in ops:
        now += dt
        if op == "start":
            for key in (f"c:{n % 3}", f"r:{n % 3}") * 3:  # as many as allowed, a few tenants
                if limits.allows((key,), now):
                    limits.start((key,), now)
                    running.append(key)
                    starts.setdefault(key, []).append(now)
        elif op == "end" and running:
            key = running.pop(n % len(running))
            limits.end((key,))
        else:
            limits.sweep(now)
        for key in {k for k in running if k.startswith("c:")}:
            assert running.count(key) <= 2
    for key, times in starts.items():
        if key.startswith("r:"):
            assert worst_window(times, 5.0) <= 2 + 1e-6, (key, times)


# --- the client (filling in) ------------------------------------------------------------------------------


def charge(tenant_id: int, amount: float, *, region: str = "eu", **extra: Any) -> None:
    """A task whose arguments fill in limit keys."""


def test_the_client_fills_in_templates_from_the_call() -> None:
    assert call_arguments(charge, (7, 1.5), {}) == {"tenant_id": 7, "amount": 1.5, "region": "eu"}
    assert call_arguments(charge, (), {"amount": 1, "tenant_id": 8, "shard": 3})["shard"] == 3  # **extra too
    assert call_arguments("mod:fn", (1,), {"tenant_id": 9}) == {"tenant_id": 9}  # by name: keywords only
    values = call_arguments(charge, (7,), {"amount": 2, "region": "us"})
    assert fill("tenant:{tenant_id}:{region}", values) == "tenant:7:us"
    with pytest.raises(ValueError, match="needs the argument 'customer'"):
        fill("customer:{customer}", values)
    with pytest.raises(ValueError, match="may hold only"):
        fill("t:{x}", {"x": "has space"})
    with pytest.raises(ValueError, match="do not fit"):
        call_arguments(charge, (1, 2, 3), {})
    with pytest.raises(ValueError, match="bad limit key template"):
        wire_options({"limits": ["tenant:{}"]})
    options = wire_options({"limits": ["api", "tenant:{tenant_id}"], "priority": 2})
    assert filled_limits(options, charge, (7, 1), {}) == {"limits": ["api", "tenant:7"], "priority": 2}
    assert filled_limits({"limits": ["api"]}, charge, (), {}) == {"limits": ["api"]}  # nothing to fill in
    # A schedule fills its keys in once, from its own arguments; without them, a ValueError at once.
    body, _ = upsert("nightly", charge, (9, 1), {}, options, {"every_s": 60.0})
    assert c.options_from_raw(body["options"]).limits == ("api", "tenant:9")
    with pytest.raises(ValueError, match="needs the argument 'tenant_id'"):
        upsert("nightly", charge, (), {"amount": 1}, options, {"every_s": 60.0})


# --- end to end -------------------------------------------------------------------------------------------


def test_two_tenants_run_side_by_side_but_never_two_of_one_tenant(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_dispatcher("--limit", "tenant:{value}=concurrency:1")
        names = [cluster.start_worker("threads", 2) for _ in range(2)]
        client = cluster.client()
        cluster.wait_for_workers(*names)
        per_tenant = client.options(limits=["tenant:{value}"], keep=True)
        with pytest.raises(ValueError, match="needs the argument 'nobody'"):
            client.options(limits=["t:{nobody}"]).submit(wt.stamp, 0, "x")
        futs = [per_tenant.submit(wt.stamp, 0.3, "a"), per_tenant.submit(wt.stamp, 0.3, value="b")]
        # The CLI names a function by module:name, so the fields come from --kwargs, else one line, exit 2.
        proc = run_cli("submit", "tests.waiting_tasks:stamp", "0", "c", "--limit", "tenant:{value}",
                       address=cluster.address)
        assert "needs the argument 'value'" in assert_one_error_line(proc, 2), show(proc)
        assert_ok(run_cli("submit", "tests.waiting_tasks:stamp", "--kwargs", '{"seconds": 20, "value": "c"}',
                          "--limit", "tenant:{value}", address=cluster.address))
        table = assert_ok(run_cli("limits", address=cluster.address))
        assert "tenant:{value}" in table and "concurrency:1 each" in table and "  tenant:c" in table, table
        # A map under a template key: items of different tenants cannot share a chunk, so each goes alone.
        mapped = list(per_tenant.map(wt.stamp, [0.3] * 4, ["a", "b", "a", "b"], chunksize=4, timeout=30))
        with Executor(cluster.address, limits=["tenant:{value}"], keep=True) as ex:  # chunks too: each alone
            mapped += list(ex.map(wt.stamp, [0.3] * 2, ["a", "b"], chunksize=2, timeout=30))
        results = [f.result(30) for f in futs] + mapped
        assert [r["value"] for r in results] == ["a", "b", "a", "b", "a", "b", "a", "b"]
        spans = attempt_spans(client, [f.job_id for f in futs])
        by_tenant = {t: [(r["started"], r["ended"], "") for r in results if r["value"] == t] for t in "ab"}
        assert max_overlap(by_tenant["a"]) == 1 and max_overlap(by_tenant["b"]) == 1  # never two of one
        assert max_overlap([(r["started"], r["ended"], "") for r in results]) == 2  # but a beside b
        assert len(spans) == 2
        rows = {r["key"]: r for r in client.limits()}
        assert rows["tenant:{value}"]["starts"] == 9 and rows["tenant:{value}"]["running"] == 1  # c still runs
        assert rows["tenant:c"]["running"] == 1 and "tenant:a" not in rows  # a and b were idle: dropped
    finally:
        for proc in cluster.workers.values():  # c would run for 20 s more: no graceful stop
            proc.send_signal(signal.SIGKILL)
        cluster.stop()

"""`conveyor submit --after/--arg-from` and `conveyor graph`, as real subprocesses against a real cluster."""

from __future__ import annotations

import json

from tests.conftest import Cluster
from tests.test_cli import assert_ok, assert_one_error_line, run_cli


def test_submit_with_dependencies_and_graph(cluster: Cluster) -> None:
    addr = cluster.address
    a = assert_ok(run_cli("submit", "tests.graph_tasks:inc", "1", "--tag", "later", address=addr)).strip()
    b = assert_ok(run_cli("submit", "tests.graph_tasks:add", "10", "--arg-from", a, address=addr)).strip()
    c = assert_ok(run_cli("submit", "tests.graph_tasks:inc", "5", "--after", b, "--after", a, address=addr)).strip()
    assert assert_ok(run_cli("result", b, address=addr)) == "waiting\n"  # returns at once: it waits for a

    text = assert_ok(run_cli("graph", b, address=addr))
    lines = text.splitlines()
    assert lines[0] == f"{a} tests.graph_tasks:inc queued", text  # the root, then its dependants
    assert any(line.endswith(f"* {b} tests.graph_tasks:add waiting (for 1)") for line in lines), text
    assert sum(c in line for line in lines) == 2 and "(shown above)" in text, text  # c has two parents
    dot = assert_ok(run_cli("graph", c, "--dot", address=addr))
    assert dot.startswith("digraph conveyor {") and f'"{a}" -> "{b}";' in dot and f'"{b}" -> "{c}";' in dot

    cluster.start_worker("threads", 2, tags=["later"], name="w")
    assert assert_ok(run_cli("result", c, "--wait", "--timeout", "20", address=addr)) == "6\n"
    assert cluster.client().result(b, timeout=10) == 12  # add(10, inc(1))
    graph = json.loads(assert_ok(run_cli("graph", a, "--json", address=addr)))
    assert {n["id"]: n["state"] for n in graph["nodes"]} == {a: "succeeded", b: "succeeded", c: "succeeded"}
    assert sorted(map(tuple, graph["edges"])) == sorted([(a, b), (a, c), (b, c)])


def test_failures_and_bad_parents_are_one_line(cluster: Cluster) -> None:
    addr = cluster.address
    cluster.start_worker("threads", 2, name="w")
    root = assert_ok(run_cli("submit", "tests.graph_tasks:fail", '"no good"', address=addr)).strip()
    failed = run_cli("submit", "--wait", "tests.graph_tasks:inc", "--arg-from", root, address=addr)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"DependencyFailed: job {root} (tests.graph_tasks:fail) failed: ValueError: no good" in failed.stderr
    unknown = run_cli("submit", "tests.graph_tasks:inc", "1", "--after", "no-such-job", address=addr)
    assert "no-such-job" in assert_one_error_line(unknown, 2)  # bad input: an unknown parent (JobRejected)
    missing = run_cli("graph", "no-such-job", address=addr)
    assert "no job no-such-job" in assert_one_error_line(missing, 1)

"""Experiments about behaviour: copies of variables (1), shared variables and races (2), crashes (8),
and the interpreter (10). Each returns a plain dict that goes into results.json as it is."""

from __future__ import annotations

import os
import platform
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from conveyor.client import Client
from conveyor.client.future import JobFuture
from conveyor.demo import tasks
from conveyor.demo.harness import (
    Progress,
    Running,
    Sizes,
    external_workers,
    gather,
    local_cluster,
    process_tree,
    timed_batch,
    wait_all,
    wait_until,
)


def run_key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


@contextmanager
def cluster_for(
    mode: str, concurrency: int, external: str | None, *, single: bool = False
) -> Iterator[tuple[Client, str]]:
    """The running cluster at `external` if it has a suitable worker of this mode, else a local one.

    single: the experiment needs exactly one such worker (its tasks must share one process).
    Yields a client whose tasks only go to workers of `mode`, and a description of what was used.
    """
    if external is not None:
        client = Client(external)
        try:
            found = external_workers(client, mode, concurrency)
            if found and (not single or len(external_workers(client, mode)) == 1):
                names = ", ".join(f"{w['name']} ({w['host']}, x{w['concurrency']})" for w in found)
                yield client.options(mode=mode), f"the running cluster at {external}: {mode} worker(s) {names}"
                return
        finally:
            client.close()
    with local_cluster(mode, concurrency) as run:
        why = "" if external is None else f" (the cluster at {external} has no suitable {mode} worker)"
        yield run.client, run.description + why


# --- 1. each process has its own copy ----------------------------------------------------------------


def exp1_process_copies(sizes: Sizes, external: str | None, progress: Progress) -> dict[str, Any]:
    progress.step("1: a module-global counter in processes mode")
    key = run_key("counter")
    children = max(2, sizes.cores)
    with cluster_for("processes", children, external) as (client, used):
        results = gather([client.submit(tasks.bump_counter, key) for _ in range(sizes.counter_tasks)])
    tasks_per_process: Counter[str] = Counter()
    final: dict[str, int] = {}
    for r in results:
        where = f"{r['host']}:{r['pid']}"
        tasks_per_process[where] += 1
        final[where] = max(final.get(where, 0), int(r["value"]))
    here = tasks.COUNTERS.get(key, 0)  # this program imported the same module: its copy
    total = len(results)
    holds = len(final) >= 2 and here == 0 and sum(final.values()) == total and max(final.values()) < total
    progress.advance()
    return {
        "cluster": used,
        "tasks": total,
        "processes_seen": len(final),
        "final_value_per_process": final,
        "tasks_per_process": dict(tasks_per_process),
        "sum_of_copies": sum(final.values()),
        "this_program_value": here,
        "this_program_pid": os.getpid(),
        "holds": holds,
        "finding": (
            f"{total} increments landed in {len(final)} child processes; each child's copy counted only its own "
            f"({', '.join(str(v) for v in sorted(final.values(), reverse=True))}); this program's copy stayed {here}"
        ),
    }


# --- 2. threads share variables; races; locks; deadlock -------------------------------------------------


def exp2_threads_share(sizes: Sizes, external: str | None, progress: Progress) -> dict[str, Any]:
    progress.step("2: threads updating one variable, with and without a lock")
    n_tasks, n = sizes.race_tasks, sizes.race_increments
    expected = n_tasks * n
    key = run_key("shared")
    with cluster_for("threads", n_tasks, external, single=True) as (client, used):
        racy_time, racy_pids = timed_batch(client, tasks.racy_add, [(f"{key}/racy", n)] * n_tasks)
        racy = client.submit(tasks.read_shared, f"{key}/racy").result(60)
        progress.advance(0.3)
        locked_time, locked_pids = timed_batch(client, tasks.locked_add, [(f"{key}/locked", n)] * n_tasks)
        locked = client.submit(tasks.read_shared, f"{key}/locked").result(60)
        progress.advance(0.3)
        timeout = sizes.deadlock_timeout
        crossed = gather([
            client.submit(tasks.lock_pair, f"{key}/x", "A", "B", timeout, True),
            client.submit(tasks.lock_pair, f"{key}/x", "B", "A", timeout, True),
        ])
        ordered = gather([
            client.submit(tasks.lock_pair, f"{key}/o", "A", "B", timeout, False),
            client.submit(tasks.lock_pair, f"{key}/o", "A", "B", timeout, False),
        ])
        progress.advance(0.4)
    one_process = len(set(racy_pids) | set(locked_pids) | {racy["pid"], locked["pid"]}) == 1
    lost = expected - int(racy["value"])
    deadlocked = all(r["met"] and not r["got_second"] for r in crossed)
    ordered_ok = all(r["got_second"] for r in ordered)
    return {
        "cluster": used,
        "threads": n_tasks,
        "increments_per_task": n,
        "expected": expected,
        "unlocked_result": int(racy["value"]),
        "unlocked_lost_updates": lost,
        "unlocked_seconds": round(racy_time, 4),
        "locked_result": int(locked["value"]),
        "locked_seconds": round(locked_time, 4),
        "one_process": one_process,
        "deadlock": {
            "timeout_s": timeout,
            "opposite_order": crossed,
            "same_order": ordered,
            "detected": deadlocked,
            "same_order_ok": ordered_ok,
        },
        "holds": one_process and lost > 0 and int(locked["value"]) == expected,
        "finding": (
            f"{n_tasks} threads x {n} unlocked increments of one shared variable gave {racy['value']:,} of "
            f"{expected:,} ({lost:,} updates lost); with a lock: {locked['value']:,}"
        ),
    }


# --- 8. crash isolation -------------------------------------------------------------------------------------


def _attempts(fut: JobFuture) -> int:
    return int(fut.info.get("attempts") or 0)


def _crash_processes(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    children = max(2, sizes.cores)
    with local_cluster("processes", children) as run:
        before = _child_pids(run)
        holders = [run.client.submit(tasks.hold, sizes.crash_hold / 2) for _ in range(3 * children)]
        crasher = run.client.submit(tasks.crash_now)
        wait_all([*holders, crasher])
        error = ""
        exc = crasher.exception()
        if exc is not None:
            error = f"{type(exc).__name__}: {exc}"
        worker_alive = run.worker_alive(0)
        # the worker replaces a dead child at once: wait for the full set before counting
        after = wait_until(lambda: _full(_child_pids(run), children), 30, "the crashed children to be replaced")
        ok = [h for h in holders if h.exception() is None]
        progress.advance(0.4)
        return {
            "cluster": run.description,
            "other_tasks": len(holders),
            "other_tasks_succeeded": len(ok),
            "other_tasks_attempts": dict(Counter(_attempts(h) for h in holders)),
            "crasher_error": error,
            "crasher_attempts": _attempts(crasher),
            "worker_process_alive": worker_alive,
            "children_before": sorted(before),
            "children_after": sorted(after),
            "children_replaced": len(set(before) - set(after)),
            # each attempt of the crashing task killed the child running it (the job's history says so)
            "children_crashed": sum(1 for h in crasher.info.get("history", []) if h.get("error")),
        }


def _child_pids(run: Running) -> list[int]:
    """The worker's task children: with forkserver they are its grandchildren (the forkserver's children)."""
    worker = run.worker_pids[0]
    out = []
    for proc in process_tree(worker)[1:]:
        try:
            if proc.ppid() != worker:
                out.append(proc.pid)
        except psutil.Error:
            continue
    return out


def _full(pids: list[int], n: int) -> list[int] | None:
    return pids if len(pids) >= n else None


def _crash_threads(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    per_worker = 4
    with tempfile.TemporaryDirectory(prefix="conveyor-demo-") as tmp, local_cluster(
        "threads", per_worker, workers=2
    ) as run:
        client = run.client
        marker = str(Path(tmp) / "crashed-once")
        holders = [client.submit(tasks.hold, sizes.crash_hold * 2) for _ in range(2 * (per_worker - 1))]
        ids = [h.job_id for h in holders]
        wait_until(
            lambda: all(j is not None and j["state"] == "running" for j in client.job_info(*ids)),
            60, "the long tasks to start on both workers",
        )
        crashed_at = time.perf_counter()
        crasher = client.submit(tasks.crash_once, marker)
        wait_all([*holders, crasher], timeout=120)
        recovered_s = time.perf_counter() - crashed_at
        first_worker = str(crasher.info["history"][0]["worker"]) if crasher.info.get("history") else ""
        names = [f"local-{i + 1}" for i in range(len(run.worker_pids))]
        dead = [name for i, name in enumerate(names) if not run.worker_alive(i)]
        codes = {name: run.worker_exit_code(i) for i, name in enumerate(names)}
        rerun = [h for h in holders if _attempts(h) > 1]
        first_on_dead = [h for h in holders if h.info.get("history") and h.info["history"][0]["worker"] in dead]
        progress.advance(0.6)
        return {
            "cluster": run.description,
            "long_tasks": len(holders),
            "crasher_first_worker": first_worker,
            "crasher_attempts": _attempts(crasher),
            "crasher_final_worker": crasher.info.get("worker"),
            "workers_dead": dead,
            "worker_exit_codes": codes,
            "long_tasks_on_crashed_worker": len(first_on_dead),
            "long_tasks_rerun": len(rerun),
            "rerun_on": dict(Counter(str(h.info.get("worker")) for h in rerun)),
            "all_succeeded": all(h.exception() is None for h in [*holders, crasher]),
            "seconds_until_all_done": round(recovered_s, 2),
        }


def exp8_crash_isolation(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    progress.step("8: a task that kills its process, in processes and threads mode")
    procs = _crash_processes(sizes, progress)
    progress.step("8: the same crash in threads mode, with a spare worker")
    threads = _crash_threads(sizes, progress)
    holds = (
        procs["worker_process_alive"]
        and procs["other_tasks_succeeded"] == procs["other_tasks"]
        and procs["crasher_error"].startswith("WorkerCrashed")
        and len(threads["workers_dead"]) == 1
        and threads["all_succeeded"]
        and threads["long_tasks_rerun"] >= 1
    )
    return {
        "cluster": f"{procs['cluster']}; then {threads['cluster']}",
        "processes": procs,
        "threads": threads,
        "holds": holds,
        "finding": (
            f"processes: one child died per attempt, {procs['other_tasks_succeeded']}/{procs['other_tasks']} other "
            f"tasks fine; threads: the whole worker died, {threads['long_tasks_rerun']} running task(s) re-run on "
            f"{', '.join(threads['rerun_on']) or 'another worker'}"
        ),
    }


# --- 10. the interpreter --------------------------------------------------------------------------------------


def exp10_interpreter(external: str | None, progress: Progress) -> dict[str, Any]:
    progress.step("10: which Python, and is the GIL on?")
    here = tasks.interpreter_info()
    with cluster_for("threads", 1, external) as (client, used):
        worker = client.submit(tasks.interpreter_info).result(60)
    progress.advance()
    gil = bool(here["gil_enabled"]) and bool(worker["gil_enabled"])
    return {
        "cluster": used,
        "this_program": here,
        "worker": worker,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "gil_enabled": gil,
        "holds": None,
        "finding": (
            f"{here['implementation']} {here['version']}, GIL "
            f"{'enabled' if gil else 'disabled (free-threaded build)'}"
            + ("" if here["has_is_gil_enabled"] else " (no sys._is_gil_enabled before 3.13: the GIL is always on)")
        ),
    }

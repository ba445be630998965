"""Experiments about speed and cost: the GIL and CPU-bound scaling (3, 4, 5), workers as separate
hosts (6), what a worker costs (7) and waiting tasks (9)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

from conveyor.client import Client
from conveyor.demo import tasks
from conveyor.demo.harness import (
    Progress,
    Running,
    Sampler,
    Sizes,
    TaggedWorker,
    calibrate,
    dispatcher_only,
    gather,
    local_cluster,
    snapshot,
    start_tagged_worker,
    system_cpu_seconds,
    timed_batch,
)
from conveyor.demo.text import per_slot

MODES = ("threads", "processes", "asyncio")  # measured on every Python
ALL_MODES = (*MODES, "interpreters")  # interpreters only where this Python can run it (experiment 11)
K = TypeVar("K")


def sweep_modes() -> tuple[str, ...]:
    """The modes the sweep measures here: interpreters mode too when this Python can run it."""
    from conveyor.demo.subinterpreters import missing

    return (*MODES, "interpreters") if missing() is None else MODES


def _modes(data: dict[str, Any]) -> tuple[str, ...]:
    """The modes a sweep measured (results written before interpreters mode have no list: the first three)."""
    return tuple(data.get("modes") or MODES)


def calibration(sizes: Sizes) -> dict[str, float]:
    """How fast this machine runs one unit of each workload, measured in this process."""
    return {
        "spin_per_s": calibrate(tasks.spin, 0.05, 20_000),
        "sha_rounds_per_s": calibrate(lambda r: tasks.sha_rounds(sizes.sha_mib, r), 0.05, 1),
    }


def _cluster_cost(run: Running, mode: str, concurrency: int, source: str) -> dict[str, Any]:
    idle = run.idle.as_dict() if run.idle is not None else {}
    return {"mode": mode, "concurrency": concurrency, "source": source, **run.startup, "idle": idle}


def _worker_cost(w: TaggedWorker, source: str) -> dict[str, Any]:
    return {"mode": w.mode, "concurrency": w.concurrency, "source": source, "worker_s": w.startup_s,
            "idle": w.idle.as_dict()}


def _measure(client: Client, pids: list[int], fn: Any, calls: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Wall time of a batch, and how many cores the worker's processes kept busy meanwhile."""
    before, system_before = snapshot(pids), system_cpu_seconds()
    with Sampler(pids) as sampler:
        wall, _ = timed_batch(client, fn, calls)
    after, system_after = snapshot(pids), system_cpu_seconds()
    ours = max(0.0, after.cpu_seconds - before.cpu_seconds)
    return {
        "wall_s": round(wall, 4),
        "cores_busy": round(ours / wall, 3),
        # everything else on the machine meanwhile (other programs, and this program's client and sampler)
        "other_cores_busy": round(max(0.0, system_after - system_before - ours) / wall, 3),
        "peak": sampler.peak.as_dict(),
    }


def _best(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Keep the fastest pass; remember every pass's wall time."""
    walls = [*(old or {}).get("walls_s", []), new["wall_s"]]
    best = new if old is None or new["wall_s"] < old["wall_s"] else old
    return {**best, "walls_s": walls}


NOISY = 0.5  # cores kept busy by the rest of the machine, above which a timing is measured again


def _remeasure_noisy(
    points: dict[K, dict[str, Any]], measure: Callable[[K], dict[str, Any]], rounds: int, progress: Progress,
    label: Callable[[K], str],
) -> int:
    """Measure again, up to `rounds` times, each point whose best timing was taken while other programs kept
    more than NOISY cores busy; keep the fastest. Returns how many extra measurements were made."""
    extra = 0
    for r in range(rounds):
        noisy = [k for k, m in points.items() if (m.get("other_cores_busy") or 0.0) > NOISY]
        for k in noisy:
            progress.step(f"{label(k)}: measuring again, the machine was busy (round {r + 1}/{rounds})")
            points[k] = _best(points[k], measure(k))
            points[k]["remeasured"] = points[k].get("remeasured", 0) + 1
            extra += 1
    return extra


# --- 3, 4, 5 (and 7's data): the concurrency sweep -------------------------------------------------------------


def sweep(
    sizes: Sizes, cal: dict[str, float], progress: Progress, modes: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Every mode (`sweep_modes()` unless given) at every concurrency level: the same CPU-bound batch (and a
    hashing batch).

    One dispatcher and one worker per mode and concurrency level, each with its own tag, all started
    first (their start-up and idle memory feed experiment 7). Then `passes` passes, each over every
    mode and level in turn; each point keeps its fastest pass, so a burst of load from other programs
    on this machine spoils one pass of every mode rather than every pass of one mode.
    """
    modes = modes or sweep_modes()
    n_tasks = 2 * max(sizes.levels)
    spin_n = max(1000, int(cal["spin_per_s"] * sizes.cpu_seconds / n_tasks))
    sha_n = max(1, round(cal["sha_rounds_per_s"] * sizes.sha_seconds / n_tasks))
    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    costs: list[dict[str, Any]] = []
    with dispatcher_only() as (client, address), ExitStack() as stack:
        workers: list[TaggedWorker] = []
        for mode in modes:
            for c in sizes.levels:
                progress.step(f"3-5: starting a {mode} worker x{c}")
                w = start_tagged_worker(stack, client, address, mode, c, f"{mode}-x{c}")
                costs.append(_worker_cost(w, "sweep"))
                gather([w.client.submit(tasks.spin, 1000) for _ in range(2 * c)])  # warm every slot
                workers.append(w)
                progress.advance(0.25)
        by_key = {(w.mode, w.concurrency): w for w in workers}

        def measure(key: tuple[str, int, str]) -> dict[str, Any]:
            w = by_key[(key[0], key[1])]
            if key[2] == "cpu":
                return _measure(w.client, [w.pid], tasks.spin, [(spin_n,)] * n_tasks)
            return _measure(w.client, [w.pid], tasks.sha_rounds, [(sizes.sha_mib, sha_n)] * n_tasks)

        for rep in range(sizes.passes):
            for w in workers:
                progress.step(f"3-5: {w.mode} mode at concurrency {w.concurrency}, pass {rep + 1}/{sizes.passes}")
                for workload in ("cpu", "sha") if w.mode != "asyncio" else ("cpu",):
                    key = (w.mode, w.concurrency, workload)
                    best[key] = _best(best.get(key), measure(key))
                progress.advance(0.75 / sizes.passes)
        extra = _remeasure_noisy(best, measure, sizes.retries, progress, lambda k: f"3-5: {k[0]} x{k[1]} ({k[2]})")
    runs: list[dict[str, Any]] = []
    for mode in modes:
        for c in sizes.levels:
            entry: dict[str, Any] = {"mode": mode, "concurrency": c}
            for workload in ("cpu", "sha"):
                if (mode, c, workload) in best:
                    entry[workload] = best[(mode, c, workload)]
            runs.append(entry)
    for workload in ("cpu", "sha"):
        for mode in modes:
            mine = [r for r in runs if r["mode"] == mode and workload in r]
            base = next((r[workload]["wall_s"] for r in mine if r["concurrency"] == 1), None)
            for r in mine:
                r[workload]["speedup"] = round(base / r[workload]["wall_s"], 3) if base else None
    return {
        "modes": list(modes),
        "tasks_per_run": n_tasks,
        "spin_iterations_per_task": spin_n,
        "sha_rounds_per_task": sha_n,
        "sha_buffer_mib": sizes.sha_mib,
        "serial_cpu_seconds_target": sizes.cpu_seconds,
        "serial_sha_seconds_target": sizes.sha_seconds,
        "levels": list(sizes.levels),
        "passes": sizes.passes,
        "remeasured": extra,
        "runs": runs,
        "costs": costs,
    }


def curve(data: dict[str, Any], mode: str, workload: str, key: str = "speedup") -> dict[int, float]:
    return {
        int(r["concurrency"]): float(r[workload][key])
        for r in data["runs"]
        if r["mode"] == mode and workload in r and r[workload].get(key) is not None
    }


def _at(points: dict[int, float], c: int) -> float:
    """The value at concurrency c, or at the nearest level measured."""
    if not points:
        return float("nan")
    return points[min(points, key=lambda k: abs(k - c))]


def exp3_gil(data: dict[str, Any], sizes: Sizes, gil: bool) -> dict[str, Any]:
    threads = curve(data, "threads", "cpu")
    busy = curve(data, "threads", "cpu", "cores_busy")
    c = max(2, sizes.cores)
    best = max(threads.values()) if threads else float("nan")
    return {
        "cluster": f"local: 1 dispatcher, 1 threads worker per concurrency level {list(sizes.levels)}",
        "speedup_by_concurrency": threads,
        "cores_busy_by_concurrency": busy,
        "speedup_at_cores": _at(threads, c),
        "best_speedup": best,
        "gil_enabled": gil,
        "holds": (best < 1.3) if gil else None,
        "finding": (
            f"threads mode, pure Python: {_at(threads, c):.2f}x at concurrency {c}, best {best:.2f}x; "
            f"the worker kept {_at(busy, c):.2f} cores busy"
        ),
    }


def exp4_every_core(data: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    procs = curve(data, "processes", "cpu")
    busy = curve(data, "processes", "cpu", "cores_busy")
    c = sizes.cores
    return {
        "cluster": f"local: 1 dispatcher, 1 processes worker per concurrency level {list(sizes.levels)}",
        "speedup_by_concurrency": procs,
        "cores_busy_by_concurrency": busy,
        "speedup_at_cores": _at(procs, c),
        "cores_busy_at_cores": _at(busy, c),
        "holds": _at(busy, c) >= 0.75 * c and _at(procs, c) >= 0.7 * c if c > 1 else None,
        "finding": (
            f"processes mode at concurrency {c}: {_at(procs, c):.2f}x faster, {_at(busy, c):.2f} of {c} cores busy"
        ),
    }


def exp5_scaling(data: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    c = max(2, sizes.cores)
    top = max(sizes.levels)
    speed = {mode: curve(data, mode, "cpu") for mode in _modes(data)}
    sha = {mode: curve(data, mode, "sha") for mode in _modes(data) if mode != "asyncio"}
    return {
        "cluster": f"local: 1 dispatcher, 1 worker per mode and concurrency level {list(sizes.levels)}",
        "cpu_speedup": speed,
        "sha_speedup": sha,
        "holds": _at(speed["processes"], c) > 1.3 * _at(speed["threads"], c) and _at(sha["threads"], c) >= 1.3,
        "finding": (
            f"at concurrency {c} (top {top}): processes {_at(speed['processes'], c):.2f}x, threads "
            f"{_at(speed['threads'], c):.2f}x, asyncio {_at(speed['asyncio'], c):.2f}x"
            + (f", interpreters {_at(speed['interpreters'], c):.2f}x" if "interpreters" in speed else "")
            + f"; hashing in threads {_at(sha['threads'], c):.2f}x"
        ),
    }


# --- 6. more hosts --------------------------------------------------------------------------------------------------


def exp6_hosts(sizes: Sizes, cal: dict[str, float], progress: Progress) -> dict[str, Any]:
    """The same CPU-bound batch on 1, 2, 3 threads-mode worker processes (stand-ins for hosts).

    Three workers are started at once with nested tags (the first has n1, n2, n3; the second n2, n3;
    the third n3), so a batch tagged nK runs on exactly K of them, and passes can be interleaved.
    """
    per_worker = 2
    n_tasks = 12
    spin_n = max(1000, int(cal["spin_per_s"] * sizes.host_seconds / n_tasks))
    best: dict[int, dict[str, Any]] = {}
    with dispatcher_only() as (client, address), ExitStack() as stack:
        progress.step("6: starting 3 threads-mode worker processes on loopback")
        workers = [
            start_tagged_worker(stack, client, address, "threads", per_worker, f"host-{i}",
                                [f"n{k}" for k in range(i, 4)])
            for i in (1, 2, 3)
        ]
        pids = [w.pid for w in workers]

        def measure(n: int) -> dict[str, Any]:
            view = client.options(tags=[f"n{n}"])
            gather([view.submit(tasks.spin, 1000) for _ in range(2 * per_worker * n)])
            before, system_before = snapshot(pids), system_cpu_seconds()
            started = time.perf_counter()
            futs = [view.submit(tasks.spin, spin_n) for _ in range(n_tasks)]
            gather(futs)
            wall = time.perf_counter() - started
            ours = snapshot(pids).cpu_seconds - before.cpu_seconds
            others = max(0.0, system_cpu_seconds() - system_before - ours) / wall
            return {
                "workers": n, "wall_s": round(wall, 4), "cores_busy": round(ours / wall, 3),
                "other_cores_busy": round(others, 3),
                "tasks_per_worker": dict(Counter(str(f.info.get("worker")) for f in futs)),
            }

        for rep in range(sizes.passes):
            for n in (1, 2, 3):
                progress.step(f"6: {n} worker process(es), pass {rep + 1}/{sizes.passes}")
                best[n] = _best(best.get(n), measure(n))
                progress.advance(1 / sizes.passes)
        _remeasure_noisy(best, measure, sizes.retries, progress, lambda n: f"6: {n} worker process(es)")
    runs = [best[n] for n in (1, 2, 3)]
    base = runs[0]["wall_s"]
    for r in runs:
        r["speedup"] = round(base / r["wall_s"], 3)
    s2 = runs[1]["speedup"]
    return {
        "cluster": f"local: 1 dispatcher and 3 threads-mode worker processes x{per_worker} on 127.0.0.1, "
        "batches tagged to run on 1, 2 or all 3 of them",
        "simulated_hosts": "separate worker processes on one machine over loopback TCP (no network namespaces)",
        "cores": sizes.cores,
        "tasks": n_tasks,
        "spin_iterations_per_task": spin_n,
        "passes": sizes.passes,
        "runs": runs,
        "holds": s2 >= 1.4 if sizes.cores >= 2 else None,
        "finding": "; ".join(f"{r['workers']} worker(s): {r['speedup']:.2f}x" for r in runs)
        + f" (this machine has {sizes.cores} cores)",
    }


# --- 7. what a worker costs -----------------------------------------------------------------------------------------


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through (x, y): (intercept, slope)."""
    n = len(points)
    if n < 2:
        return (points[0][1] if points else 0.0), 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def exp7_cost(costs: list[dict[str, Any]]) -> dict[str, Any]:
    per_mode: dict[str, Any] = {}
    for mode in ALL_MODES:
        mine = sorted((c for c in costs if c["mode"] == mode and c.get("idle")), key=lambda c: c["concurrency"])
        if not mine:
            continue
        rss = [(float(c["concurrency"]), float(c["idle"]["rss_mib"])) for c in mine]
        start = [(float(c["concurrency"]), float(c["worker_s"])) for c in mine]
        base_rss, per_slot_rss = _fit(rss)
        base_start, per_slot_start = _fit(start)
        one = next((c for c in mine if c["concurrency"] == 1), mine[0])
        per_mode[mode] = {
            "points": mine,
            "rss_mib_at_1": one["idle"]["rss_mib"],
            "rss_mib_base": round(base_rss, 2),
            "rss_mib_per_slot": round(per_slot_rss, 3),
            "startup_s_at_1": round(one["worker_s"], 3),
            "startup_s_base": round(base_start, 3),
            "startup_ms_per_slot": round(per_slot_start * 1000, 3),
        }
    finding = (
        "idle memory at x1 / per extra slot: "
        + ", ".join(f"{m} {v['rss_mib_at_1']:.0f} MiB / {per_slot(v['rss_mib_per_slot'], 'MiB')}"
                    for m, v in per_mode.items())
        + "; start to first result at x1: "
        + ", ".join(f"{m} {v['startup_s_at_1']:.2f} s" for m, v in per_mode.items())
    )
    holds = None
    if "processes" in per_mode and "threads" in per_mode:
        holds = per_mode["processes"]["rss_mib_per_slot"] > 5 * max(per_mode["threads"]["rss_mib_per_slot"], 0.01)
    return {
        "cluster": "the local clusters started for experiments 3-5 and 9 (one worker each)",
        "per_mode": per_mode,
        "holds": holds,
        "finding": finding,
    }


# --- 9. waiting -----------------------------------------------------------------------------------------------------


def exp9_waiting(sizes: Sizes, progress: Progress) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Many tasks that each wait io_wait seconds, in each mode. Also returns cluster costs for experiment 7."""
    plans = [
        ("asyncio", sizes.io_tasks, sizes.io_tasks, tasks.wait_async),
        ("threads", sizes.io_threads, sizes.io_tasks, tasks.wait_blocking),
        ("processes", sizes.io_processes, min(sizes.io_tasks, 10 * sizes.io_processes), tasks.wait_blocking),
    ]
    runs = []
    costs = []
    for mode, slots, n, fn in plans:
        progress.step(f"9: {n:,} waiting tasks in {mode} mode ({slots:,} at once)")
        with local_cluster(mode, slots, measure_idle=True) as run:
            costs.append(_cluster_cost(run, mode, slots, "experiment 9"))
            overhead = _measure(run.client, run.worker_pids, fn, [(0.0,)] * n)
            waiting = _measure(run.client, run.worker_pids, fn, [(sizes.io_wait,)] * n)
            waves = -(-n // slots)
            runs.append({
                "mode": mode,
                "concurrency": slots,
                "tasks": n,
                "wait_s": sizes.io_wait,
                "ideal_s": round(waves * sizes.io_wait, 4),
                "wall_s": waiting["wall_s"],
                "zero_wait_wall_s": overhead["wall_s"],
                "waiting_part_s": round(waiting["wall_s"] - overhead["wall_s"], 4),
                "per_1000_tasks_s": round(1000 * waiting["wall_s"] / n, 4),
                "peak_threads": waiting["peak"]["threads"],
                "peak_processes": waiting["peak"]["processes"],
                "peak_rss_mib": waiting["peak"]["rss_mib"],
                "idle_rss_mib": run.idle.as_dict()["rss_mib"] if run.idle else None,
            })
        progress.advance()
    a = runs[0]
    return {
        "cluster": "local: 1 worker per mode, " + ", ".join(f"{r['mode']} x{r['concurrency']:,}" for r in runs),
        "runs": runs,
        "holds": a["wall_s"] < 5 * sizes.io_wait + a["zero_wait_wall_s"],
        "finding": "; ".join(
            f"{r['mode']}: {r['tasks']:,} tasks in {r['wall_s']:.2f} s, {r['peak_threads']:,} threads, "
            f"{r['peak_rss_mib']:.0f} MiB" for r in runs
        ),
    }, costs

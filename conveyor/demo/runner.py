"""Runs every experiment in turn and collects one results dict (written out as results.json)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import time
import traceback
from collections.abc import Callable
from typing import Any

from conveyor.demo import experiments as behaviour
from conveyor.demo import performance as perf
from conveyor.demo import subinterpreters
from conveyor.demo.harness import Progress, Sizes

TITLES: dict[int, str] = {
    1: "Each process has its own copy of every variable",
    2: "Threads share variables: unlocked updates race, a lock fixes it",
    3: "The GIL: CPU-bound pure Python does not speed up with threads",
    4: "Processes use every core",
    5: "CPU-bound scaling in threads, processes and asyncio mode",
    6: "Across hosts: more workers, more cores",
    7: "What a worker costs: memory and start-up time",
    8: "Crash isolation: processes vs threads",
    9: "Waiting (I/O-bound) tasks: asyncio vs threads vs processes",
    10: "The interpreter, and whether its GIL is on",
    11: "Subinterpreters: every core in one process (interpreters mode, Python 3.12+)",
}


def total_units(sizes: Sizes) -> float:
    """Progress units the whole run advances by (each experiment reports its share)."""
    return 1 + 1 + 1 + len(perf.sweep_modes()) * len(sizes.levels) + 3 + 3 + 1


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_all(sizes: Sizes, external: str | None, progress: Progress) -> dict[str, Any]:
    started_at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    load_before = _load()
    exps: dict[str, dict[str, Any]] = {}

    def attempt(number: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        try:
            result = fn()
        except Exception as exc:  # one broken experiment must not lose the others' results
            exps[str(number)] = {
                "number": number, "title": TITLES[number], "holds": None,
                "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "finding": f"failed: {type(exc).__name__}: {exc}",
            }
            return None
        exps[str(number)] = {"number": number, "title": TITLES[number], **result}
        return result

    interp = attempt(10, lambda: behaviour.exp10_interpreter(external, progress))
    gil = bool(interp["gil_enabled"]) if interp else True
    attempt(1, lambda: behaviour.exp1_process_copies(sizes, external, progress))
    attempt(2, lambda: behaviour.exp2_threads_share(sizes, external, progress))

    progress.step("3-5: calibrating the workloads on this machine")
    cal = perf.calibration(sizes)
    sweep: dict[str, Any] = {}

    def run_sweep() -> dict[str, Any]:
        sweep.update(perf.sweep(sizes, cal, progress))
        return perf.exp5_scaling(sweep, sizes) | {"sweep": sweep, "calibration": cal}

    if attempt(5, run_sweep) is not None:
        attempt(3, lambda: perf.exp3_gil(sweep, sizes, gil))
        attempt(4, lambda: perf.exp4_every_core(sweep, sizes))
    else:
        for n in (3, 4):
            exps[str(n)] = {**exps["5"], "number": n, "title": TITLES[n], "finding": "failed with experiment 5"}
    attempt(6, lambda: perf.exp6_hosts(sizes, cal, progress))
    costs: list[dict[str, Any]] = list(sweep.get("costs", []))

    def run_waiting() -> dict[str, Any]:
        result, more = perf.exp9_waiting(sizes, progress)
        costs.extend(more)
        return result

    attempt(9, run_waiting)
    attempt(7, lambda: perf.exp7_cost(costs))
    attempt(11, lambda: subinterpreters.exp11_interpreters(sweep or None, sizes, gil))
    attempt(8, lambda: behaviour.exp8_crash_isolation(sizes, progress))

    command = "conveyor demo" + (" --quick" if sizes.quick else "") + (f" --dispatcher {external}" if external else "")
    meta = {
        "command": command,
        "quick": sizes.quick,
        "dispatcher": external,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "cpu_count": os.cpu_count(),
        "cores_used_for_sizes": sizes.cores,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "gil_enabled": gil,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "sizes": dataclasses.asdict(sizes),
    }
    ordered = {str(n): exps[str(n)] for n in sorted(int(k) for k in exps)}
    return {"meta": meta, "experiments": ordered}

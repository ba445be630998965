"""Experiment 11: interpreters mode (one subinterpreter per slot, each with its own GIL) beside threads and
processes, from the sweep of experiments 3-5; and whether this machine has a free-threaded Python.

Interpreters mode needs Python >= 3.12 with the PEP 734 API (the stdlib's in 3.14, the backport before):
on any other Python the sweep leaves it out and this experiment says so, naming what is missing.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any

from conveyor.demo.harness import Sizes
from conveyor.demo.text import fmt, image, table

COMPARED = ("threads", "processes", "interpreters")
_FREE_THREADED_NAME = re.compile(r"^python3\.\d+t$")
_SUBINTERPRETER_NAME = re.compile(r"^python3\.(1[2-9]|[2-9]\d)t?$")  # 3.12 and later


def missing() -> str | None:
    """None if this Python can run interpreters mode, else one line naming what is needed."""
    from conveyor.worker.modes.interpreters import missing_reason

    return missing_reason()


def _pythons(name: re.Pattern[str]) -> list[str]:
    """Executables on PATH or under pyenv's versions whose name matches, resolved (shims excluded)."""
    found: set[str] = set()
    dirs = [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d and "shims" not in Path(d).parts]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    if pyenv.is_dir():
        dirs += [v / "bin" for v in sorted(pyenv.iterdir())]
    for d in dirs:
        try:
            names = [p for p in d.iterdir() if name.match(p.name)]
        except OSError:
            continue
        found.update(str(p.resolve()) for p in names if os.access(p, os.X_OK))
    return sorted(found)


def free_threaded_pythons() -> list[str]:
    """Free-threaded CPython executables on this machine (PATH and pyenv): `python3.13t` and the like."""
    return _pythons(_FREE_THREADED_NAME)


def subinterpreter_pythons() -> list[str]:
    """Python 3.12+ executables on this machine (PATH and pyenv), which could run interpreters mode."""
    return _pythons(_SUBINTERPRETER_NAME)


def _nearest(points: dict[int, Any], c: int) -> Any:
    return points[min(points, key=lambda k: abs(k - c))] if points else None


def _cost(costs: list[dict[str, Any]], mode: str, c: int) -> dict[str, Any]:
    """Idle RSS (MiB) and start-up time (s) of the sweep's worker of `mode` nearest concurrency c."""
    mine = {int(x["concurrency"]): x for x in costs if x["mode"] == mode and x.get("idle")}
    point = _nearest(mine, c)
    if point is None:
        return {"rss_mib": None, "startup_s": None}
    return {"rss_mib": float(point["idle"]["rss_mib"]), "startup_s": round(float(point["worker_s"]), 3)}


def exp11_interpreters(sweep: dict[str, Any] | None, sizes: Sizes, gil: bool) -> dict[str, Any]:
    reason = missing()
    here_free = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    others = [p for p in free_threaded_pythons() if os.path.realpath(p) != os.path.realpath(sys.executable)]
    base: dict[str, Any] = {
        "python": sys.version.split()[0],
        "gil_enabled": gil,
        "free_threaded_build": here_free,
        "free_threaded_pythons_found": others,
        "available": reason is None,
    }
    if reason is not None:
        return base | {
            "cluster": f"none: interpreters mode cannot run on this Python ({base['python']})",
            "reason": reason,
            "pythons_3_12_found": subinterpreter_pythons(),
            "holds": None,
            "finding": f"not measured: {reason}",
        }
    if sweep is None or "interpreters" not in sweep.get("modes", []):
        raise RuntimeError("the sweep of experiments 3-5 has no interpreters-mode runs")
    c = max(2, sizes.cores)
    at: dict[str, dict[str, Any]] = {}
    for mode in COMPARED:
        runs = {int(r["concurrency"]): r["cpu"] for r in sweep["runs"] if r["mode"] == mode and "cpu" in r}
        point = _nearest(runs, c) or {}
        at[mode] = {
            "speedup": point.get("speedup"),
            "cores_busy": point.get("cores_busy"),
            "other_cores_busy": point.get("other_cores_busy"),
            "idle_rss_mib": _cost(sweep.get("costs", []), mode, c)["rss_mib"],
            "idle_rss_mib_at_1": _cost(sweep.get("costs", []), mode, 1)["rss_mib"],
            "startup_s": _cost(sweep.get("costs", []), mode, c)["startup_s"],
        }
    sub, procs = at["interpreters"], at["processes"]
    holds = None
    if sizes.cores > 1 and sub["speedup"] is not None and sub["idle_rss_mib"] is not None:
        holds = sub["speedup"] >= 0.7 * min(c, sizes.cores) and sub["idle_rss_mib"] < (procs["idle_rss_mib"] or 0.0)
    free = "this Python is free-threaded" if here_free else (
        f"free-threaded Python found but not measured: {', '.join(others)}" if others
        else "no free-threaded Python on this machine"
    )
    return base | {
        "cluster": f"the sweep's local workers of experiments 3-5 (one per mode and concurrency level "
        f"{list(sweep['levels'])}), compared at concurrency {c}",
        "concurrency": c,
        "by_mode": at,
        "holds": holds,
        "finding": (
            f"at concurrency {c}: " + ", ".join(f"{m} {fmt(at[m]['speedup'], 2)}x" for m in COMPARED)
            + "; idle memory: " + ", ".join(f"{m} {fmt(at[m]['idle_rss_mib'], 0)} MiB" for m in COMPARED)
            + f"; GIL {'enabled' if gil else 'disabled'}; {free}"
        ),
    }


def section11(e: dict[str, Any], meta: dict[str, Any], made: dict[str, str]) -> str:
    if e["free_threaded_build"]:
        free = (
            "This Python is itself a free-threaded build, so the threads-mode numbers in experiments 3-5 "
            f"were measured without the GIL (GIL {'enabled' if e['gil_enabled'] else 'disabled'} at run time)."
        )
    elif e["free_threaded_pythons_found"]:
        free = (
            "This machine also has a free-threaded Python ("
            + ", ".join(f"`{p}`" for p in e["free_threaded_pythons_found"])
            + "), which this run did not use: threads mode was measured with the GIL. To measure it there, "
            "install Conveyor into that Python and run `conveyor demo` with it."
        )
    else:
        free = (
            "No free-threaded Python (PEP 703/779, `python3.13t` and the like) was found on this machine "
            "(PATH and pyenv were searched), so threads mode was measured only with the GIL."
        )
    idea = """**The idea.** Since Python 3.12 each *subinterpreter* of a process has its own GIL (PEP 684). An
`interpreters`-mode worker is one process that runs each task in one of N subinterpreters, each driven by
its own thread: CPU-bound Python uses every core, as in processes mode, while the worker stays one process,
without a child process per slot. Arguments and results cross between interpreters as bytes, so tasks
share no objects (as in processes mode, unlike threads mode).
"""
    if not e["available"]:
        newer = e.get("pythons_3_12_found") or []
        if newer:
            free += (
                " This machine has Python 3.12 or later at " + ", ".join(f"`{p}`" for p in newer)
                + ": with Conveyor and the extra installed there, `conveyor demo` run by it measures the mode."
            )
        return f"""{idea}
**What we ran.** Nothing: this is Python {e['python']}, where interpreters mode is refused with this line:
`{e['reason']}`. The sweep of experiments 3-5 left the mode out.

**What it means.** Not measured on this Python. Run the demo with Python 3.12 or later and the extra
(`pip install 'conveyor[interpreters,demo]'`) to see interpreters mode beside threads and processes. {free}
"""
    c = e["concurrency"]
    rows = [
        [m, f"{fmt(v['speedup'], 2)}x", fmt(v["cores_busy"], 2), fmt(v["other_cores_busy"], 2),
         f"{fmt(v['idle_rss_mib_at_1'], 1)} MiB", f"{fmt(v['idle_rss_mib'], 1)} MiB",
         f"{fmt(v.get('startup_s'), 2)} s"]
        for m, v in e["by_mode"].items()
    ]
    sub, procs, threads = (e["by_mode"][m] for m in ("interpreters", "processes", "threads"))
    if e["holds"]:
        verdict = (
            f"Interpreters mode ran the CPU-bound batch {fmt(sub['speedup'], 2)}x faster at concurrency {c} "
            f"than at 1, like processes ({fmt(procs['speedup'], 2)}x) and unlike threads "
            f"({fmt(threads['speedup'], 2)}x), in one process whose idle memory was "
            f"{fmt(sub['idle_rss_mib'], 0)} MiB against {fmt(procs['idle_rss_mib'], 0)} MiB for processes mode."
        )
    else:
        verdict = (
            f"Here interpreters mode reached {fmt(sub['speedup'], 2)}x at concurrency {c} (processes "
            f"{fmt(procs['speedup'], 2)}x, threads {fmt(threads['speedup'], 2)}x) with "
            f"{fmt(sub['idle_rss_mib'], 0)} MiB idle (processes {fmt(procs['idle_rss_mib'], 0)} MiB): short of "
            "the claim on this run."
        )
        others = sub.get("other_cores_busy") or 0.0
        if others >= 0.25:
            verdict += (
                f" During that measurement the rest of the machine kept {fmt(others, 2)} cores busy (*cores busy "
                "elsewhere*), and those cores were not free for the worker: run the demo on a quiet machine, or "
                "`python -m benchmarks.interpreters`, which times longer tasks."
            )
    return f"""{idea}
**What we ran.** The batch of experiments 3-5 on the sweep's interpreters-mode workers, on Python
{e['python']} (GIL {'enabled' if e['gil_enabled'] else 'disabled'}). Below, each mode at concurrency {c}
(the nearest level to the cores), and the idle memory (RSS of the worker's whole process tree) of the
sweep's workers at concurrency 1 and {c}, and the start-up time (spawning the worker to its first result;
one sample, so noisier) of the worker at {c}: interpreters mode creates all its subinterpreters first.

**What we measured.**

{table(["mode", f"speedup at {c}", "cores busy", "cores busy elsewhere", "idle RSS at 1", f"idle RSS at {c}",
        f"start-up at {c}"], rows)}
{image(made, "11", "Interpreters mode beside threads and processes")}
**What it means.** {verdict} What differs from processes mode: a task that never returns cannot be killed
(a subinterpreter cannot be interrupted), so a timeout or cancel abandons its slot and starts a fresh one;
and an extension module that does not support subinterpreters (msgspec is one) fails the task with an
`ImportError` naming the module. {free}
"""

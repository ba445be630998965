"""The report's sections about speed and cost: experiments 3 to 7 and 9."""

from __future__ import annotations

from typing import Any

from conveyor.demo.text import busy_machine, fmt, image, per_slot, table

NOISE = (
    " Other programs were using this machine's cores during the run (see the note at the top), which takes "
    "cores away from the workers and pulls these numbers down."
)


def _noise(meta: dict[str, Any]) -> str:
    return NOISE if busy_machine(meta) else ""


def _runs(sweep: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return sorted((r for r in sweep["runs"] if r["mode"] == mode), key=lambda r: r["concurrency"])


def _others(m: dict[str, Any]) -> str:
    value = m.get("other_cores_busy")
    return "-" if value is None else fmt(value, 2)


def _mode_table(sweep: dict[str, Any], mode: str, workload: str = "cpu") -> str:
    rows = [
        [r["concurrency"], f"{fmt(r[workload]['wall_s'], 2)} s", f"{fmt(r[workload]['speedup'], 2)}x",
         fmt(r[workload]["cores_busy"], 2), _others(r[workload])]
        for r in _runs(sweep, mode) if workload in r
    ]
    return table(["concurrency", "time (best pass)", "speedup", "cores busy", "cores busy elsewhere"], rows)


def _point(sweep: dict[str, Any], mode: str, c: int, workload: str) -> dict[str, Any] | None:
    return next((r[workload] for r in _runs(sweep, mode) if r["concurrency"] == c and workload in r), None)


def _elsewhere(m: dict[str, Any] | None) -> str:
    """A sentence on how busy the rest of the machine was during a measurement, if it was."""
    if not m or (m.get("other_cores_busy") or 0.0) < 0.25:
        return ""
    return (
        f" During that measurement the rest of the machine kept {fmt(m['other_cores_busy'], 2)} cores busy "
        "(*cores busy elsewhere*), and those cores were not free for the worker."
    )


def _work(sweep: dict[str, Any]) -> str:
    per_task = sweep["serial_cpu_seconds_target"] / sweep["tasks_per_run"]
    return (
        f"{sweep['tasks_per_run']} tasks, each `spin({sweep['spin_iterations_per_task']:,})` (a pure-Python "
        f"arithmetic loop, about {fmt(per_task, 2)} s on one core)"
    )


def _timing_note(sweep: dict[str, Any]) -> str:
    again = sweep.get("remeasured") or 0
    remeasured = (
        f" Timings taken while the rest of the machine kept more than half a core busy were measured again "
        f"({again} extra measurement{'s' if again != 1 else ''})." if again else ""
    )
    return (
        f"Each time is the best of {sweep['passes']} passes, taken in turn over every mode and concurrency, so "
        f"that other programs on the machine spoil as little as possible.{remeasured} *Cores busy* is the CPU "
        "time the "
        "worker's processes used during the batch divided by its wall time: 1.0 means one core fully used. "
        "*Cores busy elsewhere* is the same for everything else on the machine meanwhile (other programs, and "
        "this program's own client): cores it used were not free for the worker."
    )


def section3(e: dict[str, Any], exps: dict[str, Any], meta: dict[str, Any], made: dict[str, str]) -> str:
    sweep = exps["5"]["sweep"]
    cores = meta["cores_used_for_sizes"]
    best, busy = e["best_speedup"], max(e["cores_busy_by_concurrency"].values(), default=float("nan"))
    top = max(sweep["levels"])
    if not meta["gil_enabled"]:
        meaning = (
            f"This interpreter runs without the GIL, so threads are expected to scale here: up to {fmt(best, 2)}x "
            "was measured. Read the numbers above as the free-threaded result, not as the GIL's."
        )
    elif best < 1.3:
        meaning = (
            f"Going from 1 thread to {top} changed the speed by a factor of at most {fmt(best, 2)}, and the "
            f"worker kept at most {fmt(busy, 2)} cores busy, although this machine has {cores}. That is the "
            "GIL: only one thread of a process runs Python code at a time, so for CPU-bound Python, threads "
            "take turns on one core. They are still useful for waiting (experiment 9) and for work done in C "
            "code that releases the GIL (experiment 5)."
        )
    else:
        meaning = (
            f"Threads reached up to {fmt(best, 2)}x here, more than the GIL should allow for pure-Python work; "
            f"the worker kept at most {fmt(busy, 2)} cores busy. A concurrency-1 run slowed down by other "
            "programs can produce that: compare the cores-busy column, which the GIL caps near 1."
            + _noise(meta)
        )
    return f"""**The idea.** CPU-bound work spends all its time computing. Because of the GIL, a threads-mode
worker runs Python code on only one core at a time, however many threads it has, so adding threads should
not make CPU-bound Python code faster.

**What we ran.** The same batch, {_work(sweep)}, on threads-mode workers at each concurrency.
{_timing_note(sweep)}

**What we measured** (threads mode):

{_mode_table(sweep, "threads")}
{image(made, "4", "Cores busy by mode and concurrency")}
**What it means.** {meaning}
"""


def section4(e: dict[str, Any], exps: dict[str, Any], meta: dict[str, Any], made: dict[str, str]) -> str:
    sweep = exps["5"]["sweep"]
    cores = meta["cores_used_for_sizes"]
    speed, busy = e["speedup_at_cores"], e["cores_busy_at_cores"]
    if cores < 2:
        meaning = "This machine has a single core, so there is no second core for a second process to use."
    elif speed >= 0.7 * cores:
        meaning = (
            f"At concurrency {cores} the processes-mode worker kept {fmt(busy, 2)} of the machine's {cores} "
            f"cores busy and finished {fmt(speed, 2)}x faster than with one child: every core did Python work at "
            f"once. Past {cores} there are no more cores to use: the children take turns and the speedup stays "
            "flat."
        )
    else:
        meaning = (
            f"At concurrency {cores} the processes-mode worker kept only {fmt(busy, 2)} of the {cores} cores "
            f"busy and ran {fmt(speed, 2)}x as fast as with one child, short of the {cores}x that {cores} free "
            "cores allow. Processes can use every core, but only the cores no other program is using."
            + (_elsewhere(_point(sweep, "processes", cores, "cpu")) or _noise(meta))
        )
    return f"""**The idea.** In processes mode each task runs in a child process, and each process has its own
interpreter and its own GIL, so the children run Python code on different cores at the same time.

**What we ran.** The same batch as in experiment 3, {_work(sweep)}, on processes-mode workers.

**What we measured** (processes mode):

{_mode_table(sweep, "processes")}
The plot under experiment 3 shows the cores busy for every mode.

**What it means.** {meaning} The price of processes is memory and start-up time (experiment 7), and
sending arguments and results between processes.
"""


def section5(e: dict[str, Any], meta: dict[str, Any], made: dict[str, str]) -> str:
    sweep = e["sweep"]
    cores = meta["cores_used_for_sizes"]
    modes = ("processes", "threads", "asyncio")
    shown = (*modes, "interpreters") if "interpreters" in sweep.get("modes", []) else modes
    by_c = {m: {r["concurrency"]: r["cpu"]["speedup"] for r in _runs(sweep, m)} for m in shown}
    rows = [[c, *(f"{fmt(by_c[m].get(c), 2)}x" for m in shown), min(c, cores)] for c in sweep["levels"]]
    sha_rows = [
        [r["concurrency"], f"{fmt(r['sha']['speedup'], 2)}x", fmt(r["sha"]["cores_busy"], 2),
         _others(r["sha"]), f"{fmt(p['sha']['speedup'], 2)}x"]
        for r, p in zip(_runs(sweep, "threads"), _runs(sweep, "processes"), strict=True)
        if "sha" in r and "sha" in p
    ]
    free = "" if meta["gil_enabled"] else (
        " On this free-threaded interpreter the threads curve is expected to follow the processes curve."
    )
    c = max(2, cores)
    p_c, t_c, a_c = (by_c[m].get(c) or by_c[m][max(by_c[m])] for m in modes)
    measured = (
        f"At concurrency {c}, processes reached {fmt(p_c, 2)}x (ideal: {min(c, cores)}x), threads "
        f"{fmt(t_c, 2)}x and asyncio mode {fmt(a_c, 2)}x."
    )
    if p_c < 0.7 * min(c, cores):
        measured += _elsewhere(_point(sweep, "processes", c, "cpu")) or _noise(meta)
    if "interpreters" in by_c:
        i_c = by_c["interpreters"].get(c) or by_c["interpreters"][max(by_c["interpreters"])]
        measured += (
            f" Interpreters mode, one process with a subinterpreter (and a GIL) per slot, reached {fmt(i_c, 2)}x"
            " (experiment 11)."
        )
    else:
        measured += " Interpreters mode was not measured: this Python cannot run it (experiment 11)."
    sha_t = next((r["sha"] for r in _runs(sweep, "threads") if r["concurrency"] == c and "sha" in r), None)
    if sha_t is not None and sha_t["speedup"] >= 1.3:
        sha_meaning = (
            f"Hashing in threads reached {fmt(sha_t['speedup'], 2)}x at concurrency {c}, with "
            f"{fmt(sha_t['cores_busy'], 2)} cores busy in a single process: the GIL only serialises Python "
            "code, not the C code that lets go of it."
        )
    else:
        sha_meaning = (
            "Here hashing in threads did not speed up much"
            + (f" ({fmt(sha_t['speedup'], 2)}x at concurrency {c})" if sha_t else "")
            + ", which the GIL does not explain: hashlib lets go of it while it hashes."
            + (_elsewhere(sha_t) or _noise(meta))
        )
    return f"""**The idea.** Putting experiments 3 and 4 side by side, with asyncio mode too: the same CPU-bound
batch at concurrency 1, 2, 4 and so on up to a few times the {cores} cores, as a speedup over concurrency 1.
The dashed line is the ideal: each task on its own core, so the speedup grows with concurrency until every
core is busy ({cores}), then stays there.

**What we ran.** {_work(sweep)}, in each mode at each concurrency (best of {sweep['passes']} passes).

**What we measured** (speedup over concurrency 1):

{table(["concurrency", *shown, "ideal"], rows)}
{image(made, "5", "Speedup of CPU-bound work by mode")}
**What it means.** {measured} Processes can follow the ideal line up to the core count; threads stay
near 1x, and so does asyncio mode, because a plain (non-`async`) function in asyncio mode runs in the event
loop's thread pool, that is, in threads, under the same GIL. (An `async def` function that computes
without awaiting would be worse: it runs on the loop's single thread and blocks every other task meanwhile.){free}

**When threads do scale: work that releases the GIL.** `hashlib.sha256` on a large buffer does its work in
C and lets go of the GIL while it hashes. The same sweep with {sweep['tasks_per_run']} tasks, each hashing a
{sweep['sha_buffer_mib']} MiB buffer {sweep['sha_rounds_per_task']} times:

{table(["concurrency", "threads speedup", "threads: cores busy", "busy elsewhere", "processes speedup"], sha_rows)}
{image(made, "5b", "Speedup of hashing in threads")}
{sha_meaning} Besides hashlib, zlib, most of numpy, and reading files or sockets let go of
the GIL too. For such work threads are cheaper than processes: no copying of arguments, less memory
(experiment 7).
"""


def section6(e: dict[str, Any], made: dict[str, str]) -> str:
    rows = [
        [r["workers"], f"{fmt(r['wall_s'], 2)} s", f"{fmt(r['speedup'], 2)}x", fmt(r["cores_busy"], 2),
         _others(r), ", ".join(f"{w}: {n}" for w, n in sorted(r["tasks_per_worker"].items()))]
        for r in e["runs"]
    ]
    cores = e["cores"]
    speed = {r["workers"]: r["speedup"] for r in e["runs"]}
    meaning = (
        f"Two workers were {fmt(speed[2], 2)}x as fast as one, three {fmt(speed[3], 2)}x: "
        + (f"each worker added a core's worth of Python execution until the machine's {cores} cores were "
           "used up." if speed[2] >= 1.4 else "less than the cores allow." + (_elsewhere(e["runs"][1]) or NOISE))
    )
    return f"""**The idea.** Conveyor spreads tasks over every worker connected to the dispatcher, on any number
of machines. A threads-mode worker uses about one core for Python code (experiment 3), but each worker is
a separate process with its own GIL, so adding workers adds cores, in any mode.

**How the hosts were simulated.** No second machine and no network namespaces were used: the "hosts" are
separate worker processes on this one machine, connected to the dispatcher over loopback TCP
(127.0.0.1). They share this machine's {cores} cores, so here the speedup cannot exceed {cores}; on really
separate hosts each worker would bring its own cores, and the network would add some latency per task.

**What we ran.** {e['tasks']} CPU-bound tasks (`spin({e['spin_iterations_per_task']:,})`) on 1, 2 and 3
threads-mode workers with 2 threads each, best of {e['passes']} passes.

**What we measured.**

{table(["workers", "time", "speedup", "cores busy", "cores busy elsewhere", "tasks per worker"], rows)}
{image(made, "6", "Speedup with more worker processes")}
**What it means.** {meaning} On separate hosts the line would keep rising: the way to use more cores with threads-mode
workers is more workers, not more threads.
"""


def section7(e: dict[str, Any], made: dict[str, str]) -> str:
    rows = [
        [m, f"{fmt(v['rss_mib_at_1'], 0)} MiB", per_slot(v["rss_mib_per_slot"], "MiB"),
         f"{fmt(v['startup_s_at_1'], 2)} s", per_slot(v["startup_ms_per_slot"], "ms", 1)]
        for m, v in e["per_mode"].items()
    ]
    points = [
        [p["mode"], p["concurrency"], f"{fmt(p['idle']['rss_mib'], 1)} MiB",
         "-" if p["idle"].get("pss_mib") is None else f"{fmt(p['idle']['pss_mib'], 1)} MiB",
         p["idle"]["processes"], p["idle"]["threads"], f"{fmt(p['worker_s'], 2)} s", p["source"]]
        for v in e["per_mode"].values() for p in v["points"]
    ]
    return f"""**The idea.** Each mode pays for its concurrency differently. A child process carries a whole
interpreter with its own copy of the imported modules; a thread needs a stack and a little bookkeeping; an
asyncio task is a Python object, made only when a task arrives.

**What we ran.** Every worker started for experiments 3-5 and 9: the time from starting the worker process
to the result of its first task (the dispatcher was already running), and the memory of the idle worker
after that: resident memory (RSS) summed over the worker process and all its children. The
per-slot costs are the slopes of straight lines fitted through the points. Each start-up time is a single
measurement, so those are noisier than the memory figures.

**What we measured.**

{table(["mode", "memory at concurrency 1", "per extra slot", "start-up at concurrency 1", "per extra slot"], rows)}
{image(made, "7", "Memory and start-up time by mode and concurrency")}
Every worker measured:

{table(["mode", "concurrency", "RSS", "PSS", "processes", "threads", "start to first result", "from"], points)}
RSS counts memory shared between processes (the interpreter's code, pages inherited from the forkserver)
once per process, so for processes mode it overstates what the machine really spends; PSS divides shared
pages among the processes that share them.

**What it means.** A processes-mode slot costs a process: megabytes of memory and some start-up time each.
A thread costs little memory, and an asyncio slot practically none until a task uses it. Size processes
mode to the cores; threads and asyncio can go much higher when tasks wait (experiment 9).{_interp_cost(e)}
"""


def _interp_cost(e: dict[str, Any]) -> str:
    v = e["per_mode"].get("interpreters")
    if v is None:
        return ""
    return (
        f" An interpreters-mode slot is a subinterpreter in the worker's own process, which imports its own "
        f"copy of the task-side modules: {per_slot(v['rss_mib_per_slot'], 'MiB')} each here, between a thread "
        f"and a child process, and {per_slot(v['startup_ms_per_slot'], 'ms', 1)} of start-up each, since the "
        "worker creates every subinterpreter before it takes work (experiment 11)."
    )


def _kib_per_wait(r: dict[str, Any], base_mib: float | None) -> float | None:
    """Memory the waiting tasks added, per task in flight, over a fresh concurrency-1 worker of the mode."""
    if base_mib is None:
        return None
    return max(0.0, (float(r["peak_rss_mib"]) - base_mib) * 1024 / min(int(r["concurrency"]), int(r["tasks"])))


def _size(kib: float | None) -> str:
    if kib is None:
        return "-"
    return f"{fmt(kib / 1024, 1)} MiB" if kib >= 1024 else f"{fmt(kib, 1)} KiB"


def section9(e: dict[str, Any], exps: dict[str, Any], made: dict[str, str]) -> str:
    per_mode = exps.get("7", {}).get("per_mode", {})
    base = {m: v.get("rss_mib_at_1") for m, v in per_mode.items()}
    runs = {r["mode"]: r for r in e["runs"]}
    per_wait = {m: _kib_per_wait(r, base.get(m)) for m, r in runs.items()}
    rows = [
        [r["mode"], f"{r['tasks']:,}", f"{r['concurrency']:,}", f"{fmt(r['wall_s'], 2)} s",
         f"{fmt(r['ideal_s'], 2)} s", f"{fmt(r['zero_wait_wall_s'], 2)} s", f"{r['peak_threads']:,}",
         r["peak_processes"], f"{fmt(r['peak_rss_mib'], 0)} MiB", _size(per_wait[r["mode"]])]
        for r in e["runs"]
    ]
    a = runs["asyncio"]
    wait_ms = round(a["wait_s"] * 1000)
    procs = runs.get("processes")
    capped = ""
    if procs is not None and procs["tasks"] < a["tasks"]:
        full = a["tasks"] * procs["wait_s"] / procs["concurrency"]
        capped = (
            f" Processes mode ran only {procs['tasks']:,} tasks: at {procs['concurrency']} at once, all "
            f"{a['tasks']:,} would take at least {fmt(full, 0)} s."
        )
    lines = [
        f"In asyncio mode all {a['concurrency']:,} waits were in flight at once on one event loop "
        f"({a['peak_threads']} threads in the worker, {_size(per_wait['asyncio'])} of memory per waiting task). "
        f"The run took {fmt(a['wall_s'], 2)} s, of which {fmt(a['zero_wait_wall_s'], 2)} s is Conveyor's own "
        f"cost of moving {a['tasks']:,} tasks (the no-wait run): the waits themselves added "
        f"{fmt(a['wall_s'] - a['zero_wait_wall_s'], 2)} s, where one wait is {fmt(a['wait_s'], 2)} s."
    ]
    t = runs.get("threads")
    if t is not None:
        lines.append(
            f"Threads mode needs a thread per wait in flight: {t['concurrency']:,} at once took "
            f"{t['peak_threads']:,} threads and {_size(per_wait['threads'])} per waiting task, and the "
            f"{t['tasks']:,} waits went through in rounds of {t['concurrency']:,}."
        )
    if procs is not None:
        lines.append(
            f"Processes mode needs a whole process per wait in flight: {_size(per_wait['processes'])} each, so "
            f"only {procs['concurrency']} at once."
        )
    meaning = " ".join(lines)
    return f"""**The idea.** An I/O-bound task mostly waits. A waiting thread holds no GIL and uses no CPU, but
it still occupies a thread (or, in processes mode, a whole process) for the whole wait. In asyncio mode a
waiting task is a coroutine paused at an `await`, and one thread's event loop can keep thousands of them
waiting at once.

**What we ran.** Tasks that each wait {wait_ms} ms: `async def` with `await asyncio.sleep` in asyncio mode,
`time.sleep` in threads and processes mode, each mode on its own worker.{capped} *Ideal* is the time the
waits alone need at that concurrency; *no-wait run* is the same tasks with a wait of 0, i.e. Conveyor's own
cost of sending, running and returning that many tasks. *Per waiting task* is the peak memory above a fresh
concurrency-1 worker of the same mode (experiment 7), divided by the tasks in flight.

**What we measured.**

{table(["mode", "tasks", "at once", "time", "ideal", "no-wait run", "threads (peak)", "processes",
        "memory (peak RSS)", "per waiting task"], rows)}
{image(made, "9", "Waiting tasks by mode")}
**What it means.** {meaning} For many concurrent waits (HTTP calls, database queries, timers),
asyncio mode is the cheapest by far; threads are fine for tens to hundreds of waits at once; processes
are the wrong tool for waiting.
"""

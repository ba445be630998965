"""report.md, results.json and the plots, from the results dict; and the terminal summary table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor.demo import plots, subinterpreters
from conveyor.demo import report_perf as perf
from conveyor.demo.text import busy_machine, fmt, image, table, verdict, when


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, str]:
    """Write results.json, the PNG plots (when matplotlib is installed) and report.md; return the plots made."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    made = make_plots(results, out)
    (out / "report.md").write_text(render(results, made), encoding="utf-8")
    return made


def make_plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    """Plot name -> file name, for each plot whose experiment produced data."""
    if not plots.available():
        return {}
    exps = results["experiments"]
    cores = int(results["meta"]["cores_used_for_sizes"])
    gil = bool(results["meta"]["gil_enabled"])
    jobs: dict[str, tuple[str, Callable[[], str]]] = {
        "1": ("1", lambda: plots.counters(exps["1"], out)),
        "2": ("2", lambda: plots.race(exps["2"], out)),
        "4": ("5", lambda: plots.cores_busy(exps["5"]["sweep"], cores, out)),
        "5": ("5", lambda: plots.cpu_scaling(exps["5"]["sweep"], cores, gil, out)),
        "5b": ("5", lambda: plots.sha_scaling(exps["5"]["sweep"], cores, out)),
        "6": ("6", lambda: plots.hosts(exps["6"], out)),
        "7": ("7", lambda: plots.cost(exps["7"], out)),
        "9": ("9", lambda: plots.waiting(exps["9"], out)),
    }
    if exps.get("11", {}).get("available"):
        jobs["11"] = ("11", lambda: plots.interpreters(exps["11"], out))
    made: dict[str, str] = {}
    for name, (needs, draw) in jobs.items():
        if needs in exps and "error" not in exps[needs]:
            try:
                made[name] = draw()
            except Exception as exc:  # a plot must never cost the report
                made[name] = ""
                exps[needs].setdefault("plot_errors", []).append(f"{type(exc).__name__}: {exc}")
    return made


# --- the report ---------------------------------------------------------------------------------------------


def render(results: dict[str, Any], made: dict[str, str]) -> str:
    meta = results["meta"]
    exps = results["experiments"]
    parts = [_header(meta), _glossary(meta), _summary(exps)]
    sections: dict[str, Callable[[dict[str, Any]], str]] = {
        "1": lambda e: _section1(e, made),
        "2": lambda e: _section2(e, made),
        "3": lambda e: perf.section3(e, exps, meta, made),
        "4": lambda e: perf.section4(e, exps, meta, made),
        "5": lambda e: perf.section5(e, meta, made),
        "6": lambda e: perf.section6(e, made),
        "7": lambda e: perf.section7(e, made),
        "8": _section8,
        "9": lambda e: perf.section9(e, exps, made),
        "10": _section10,
        "11": lambda e: subinterpreters.section11(e, meta, made),
    }
    for number in map(str, range(1, 12)):
        e = exps.get(number)
        if e is None:
            continue
        heading = f"## {number}. {e['title']}\n\n"
        if "error" in e:
            parts.append(heading + f"This experiment failed: `{e['error']}`. Its traceback is in results.json.\n")
        else:
            parts.append(heading + sections[number](e))
    parts.append(_footer(meta))
    return "\n".join(parts)


def _header(meta: dict[str, Any]) -> str:
    kind = "quick" if meta["quick"] else "full"
    where = (
        f"Experiments 1, 2 and 10 used the running cluster at `{meta['dispatcher']}` where it had suitable "
        "workers; every other experiment started its own local clusters (it needs a particular mode, "
        "concurrency or number of workers, measures the workers' processes, or crashes them)."
        if meta["dispatcher"]
        else "Every experiment started its own local cluster (a dispatcher and worker processes on 127.0.0.1) "
        "and stopped it afterwards."
    )
    text = (
        "# Processes, threads, asyncio and the GIL, measured on Conveyor\n\n"
        f"This report was written by `{meta['command']}` on {when(meta, meta['started_at'])} ({kind} run, "
        f"{fmt(meta['duration_s'], 0)} s). Machine: {meta['cpu_count']} CPU cores, {meta['platform']}; "
        f"{meta['implementation']} {meta['python']}, GIL {'enabled' if meta['gil_enabled'] else 'disabled'}. "
        f"{where} Every number below was measured during this run, by running Conveyor tasks; the raw "
        "numbers are in `results.json`.\n"
    )
    if busy_machine(meta):
        loads = [*(meta.get("load_average_before") or []), *(meta.get("load_average_after") or [])]
        text += (
            f"\n> **Note:** other programs were busy on this machine during the run (load average up to "
            f"{max(loads):.1f} on {meta['cpu_count']} cores). Timings are the best of several passes, but may "
            "still be low: run `conveyor demo` again on a quiet machine for cleaner numbers.\n"
        )
    return text


def _glossary(meta: dict[str, Any]) -> str:
    cores = meta["cpu_count"]
    return f"""## Words this report uses

- **Process**: a running program with its own memory. Processes do not see each other's variables; they
  exchange messages instead (Conveyor sends tasks and results between processes as messages).
- **Thread**: a line of execution inside a process. All the threads of a process share its memory, so they
  all see, and can all change, the same variables.
- **Core**: one CPU. At any instant a core runs one thread. This machine has {cores}.
- **GIL** (Global Interpreter Lock): in the standard Python interpreter, CPython, a thread must hold this
  lock to run Python code, so only one thread *per process* runs Python code at any instant, however many
  cores there are. C code that does not touch Python objects (hashing, compression, numpy, waiting for the
  network or a disk) can let go of it while it works. Python 3.13 and later can be built without it
  ("free-threaded").
- **CPU-bound / I/O-bound**: a CPU-bound task spends its time computing; an I/O-bound task spends it
  waiting (for a network reply, a disk, a timer).
- **Worker, mode, concurrency**: a Conveyor *worker* runs tasks in one *mode*: `processes` (each task in one
  of N child processes of the worker), `threads` (in one of N threads of the worker process), `asyncio`
  (as coroutines on one event loop: a single thread that switches to another task whenever one waits) or,
  on Python 3.12 and later, `interpreters` (in one of N subinterpreters of the worker process, each with
  its own GIL and driven by its own thread).
  *Concurrency* is N, the number of tasks a worker runs at once.
- **Speedup**: the time the same work takes at concurrency 1 divided by its time at concurrency N. 2.0 means
  twice as fast. For CPU-bound work it cannot exceed the number of cores.
"""


def _summary(exps: dict[str, Any]) -> str:
    rows = [[n, e["title"], e.get("finding", ""), verdict(e)] for n, e in exps.items()]
    return "## Summary\n\n" + table(["#", "claim", "measured", "confirmed?"], rows)


def _footer(meta: dict[str, Any]) -> str:
    return (
        "## Reproduce it\n\n"
        "```bash\npip install 'conveyor[demo]'           # matplotlib, for the plots\n"
        "conveyor demo --quick --out demo-quick   # about a minute on 2 cores\n"
        "conveyor demo --out demo-full            # sizes scaled to the machine's cores\n```\n\n"
        "`--dispatcher URL` runs experiments 1, 2 and 10 on a running cluster when it has suitable workers. "
        "The task functions are in `conveyor/demo/tasks.py`; the experiments in `conveyor/demo/experiments.py` "
        "and `conveyor/demo/performance.py`.\n"
    )


# --- behaviour sections ------------------------------------------------------------------------------------


def _section1(e: dict[str, Any], made: dict[str, str]) -> str:
    rows = [
        [f"child process {where.split(':')[-1]}", e["tasks_per_process"][where], value]
        for where, value in sorted(e["final_value_per_process"].items(), key=lambda kv: -kv[1])
    ]
    rows.append([f"this program (pid {e['this_program_pid']}), which submitted them", 0, e["this_program_value"]])
    return f"""**The idea.** A process has its own memory. When Conveyor runs a task in a child process, the task's
module is imported in that child, and each module-level ("global") variable exists once per process:
changing it in one process changes nothing anywhere else.

**What we ran.** `conveyor.demo.tasks.bump_counter` adds one to a module-global counter and returns the
counter's new value and its process id. We ran it {e['tasks']} times in processes mode on {e['cluster']}.

**What we measured.**

{table(["process", "tasks it ran", "its counter at the end"], rows)}
{image(made, "1", "Each process's copy of the counter")}
**What it means.** {e['tasks']} increments were made, yet no counter reached {e['tasks']}: each of the
{e['processes_seen']} child processes counted only the tasks it ran itself (together
{e['sum_of_copies']}), and this program, which has the same variable, still holds
{e['this_program_value']}. To combine what tasks in different processes compute, return it from the
tasks (as here) or write it to shared storage (a database, a file); a global variable will not do it.
"""


def _section2(e: dict[str, Any], made: dict[str, str]) -> str:
    exp = e["expected"]
    d = e["deadlock"]
    crossed = " and ".join(
        f"{r['order']}: {'got' if r['got_second'] else 'gave up on'} its second lock after {fmt(r['waited'], 2)} s"
        for r in d["opposite_order"]
    )
    rows = [
        ["no lock", f"{e['unlocked_result']:,}", f"{exp:,}", f"{e['unlocked_lost_updates']:,}",
         f"{fmt(e['unlocked_seconds'], 2)} s"],
        ["with a lock", f"{e['locked_result']:,}", f"{exp:,}", f"{exp - e['locked_result']:,}",
         f"{fmt(e['locked_seconds'], 2)} s"],
    ]
    share = "all in one worker process, so all on the same variable" if e["one_process"] else "in several processes"
    return f"""**The idea.** The threads of one process share its variables. Sharing is convenient, but when two
threads *read, change and write back* the same variable at the same time, one can overwrite the other's
update: a **race condition**. The GIL does not prevent it: it lets one thread run at a time, but the
interpreter may switch threads between the read and the write. Our tasks call `time.sleep(0)` between the
two, which makes that switch happen almost every time; real code gets the same switch only now and then,
which makes the bug rare and hard to find rather than harmless.

**What we ran.** {e['threads']} tasks at once in threads mode on {e['cluster']}, {share}. Each task adds 1
to one module-global variable {e['increments_per_task']:,} times: read it, `time.sleep(0)`, write it plus
one. Then the same with a `threading.Lock` held from the read to the write.

**What we measured.**

{table(["", "final value", "expected", "updates lost", "time"], rows)}
{image(made, "2", "Lost updates without a lock")}
**What it means.** Without the lock, {e['unlocked_lost_updates']:,} of {exp:,} updates were lost: threads
read the same old value and wrote back the same new one. With the lock every update counted: the lock
makes read-and-write one step no other thread can get into. Holding a lock makes threads wait for each
other, which is why the locked run was slower.

**Locks can deadlock.** If one thread holds lock A and waits for lock B while another holds B and waits
for A, both wait forever. We ran exactly that: two tasks taking the locks in opposite orders, meeting
while each held its first one, each trying the second with `acquire(timeout={fmt(d['timeout_s'], 1)})` so
that nothing could hang: {crossed}. Deadlock detected: {"yes" if d["detected"] else "no"}. With both tasks
taking A before B, both finished normally: {"yes" if d["same_order_ok"] else "no"}. The usual rules: take
locks in one fixed order everywhere, hold them briefly, and use timeouts where a hang would be worse than
an error. Processes mode sidesteps all of this: tasks share no variables.
"""


def _section8(e: dict[str, Any]) -> str:
    p, t = e["processes"], e["threads"]
    attempts = ", ".join(f"{n} task(s) on attempt {a}" for a, n in sorted(p["other_tasks_attempts"].items()))
    rerun_on = ", ".join(f"{w} ({n})" for w, n in t["rerun_on"].items()) or "-"
    crashed = p.get("children_crashed")
    if crashed is None:  # results from before the demo recorded it: every attempt of the crasher crashed
        crashed = p["crasher_attempts"] if p["crasher_error"].startswith("WorkerCrashed") else 0
    kept = len(set(p["children_before"]) & set(p["children_after"]))
    codes = ", ".join(f"{w}: {'running' if c is None else f'exited with code {c}'}" for w, c in
                      t["worker_exit_codes"].items())
    return f"""**The idea.** A task can bring down the process it runs in: a crash in C code (a segfault), running out
of memory, or a call to `os._exit`. In processes mode that process is one child of the worker; in threads
mode it is the worker itself, with every other task it was running. The dispatcher notices either way (a
crashed child is reported at once; a dead worker stops sending heartbeats) and runs the lost tasks again
elsewhere, up to 3 times: it counts these as infrastructure failures, not as the task's fault.

**Processes mode.** On {p['cluster']}: {p['other_tasks']} tasks that each wait a moment, plus one task that
calls `os._exit(13)`.

{table(["", "measured"], [
    ["other tasks that succeeded", f"{p['other_tasks_succeeded']} of {p['other_tasks']} ({attempts})"],
    ["the crashing task", f"{p['crasher_error'] or 'did not fail'}, after {p['crasher_attempts']} attempts"],
    ["worker process still running", "yes" if p["worker_process_alive"] else "no"],
    ["child processes that died, one per attempt", str(crashed)],
    ["the worker's children afterwards", f"{len(p['children_after'])} ({kept} of the original "
                                         f"{len(p['children_before'])})"],
])}
Each attempt of the crashing task killed only the child running it; the worker replaced that child and
went on. Since the task crashes every time, it failed with `WorkerCrashed` once its retries ran out, and
nothing else was disturbed.

**Threads mode.** On {t['cluster']}: {t['long_tasks']} tasks that each take a while, spread over both
workers, then one task that calls `os._exit(13)` the first time it runs (it leaves a marker file, so a
retry does not crash again and the demo does not take down every worker in turn).

{table(["", "measured"], [
    ["workers", codes],
    ["crashing task", f"first ran on {t['crasher_first_worker']}, succeeded on attempt {t['crasher_attempts']} "
                      f"on {t['crasher_final_worker']}"],
    ["other tasks running on the crashed worker", str(t["long_tasks_on_crashed_worker"])],
    ["of them re-run (attempts > 1)", f"{t['long_tasks_rerun']}, on {rerun_on}"],
    ["all tasks succeeded in the end", "yes" if t["all_succeeded"] else "no"],
    ["time from the crash until all were done", f"{fmt(t['seconds_until_all_done'], 1)} s"],
])}
**What it means.** In processes mode a crash costs one task. In threads mode it costs the whole worker:
every task it was running is lost with it and has to start again from the beginning on another worker
(here after the dispatcher missed three heartbeats), so the spare worker mattered. Work that might crash
(native extensions, untrusted input) belongs in processes mode.
"""


def _section10(e: dict[str, Any]) -> str:
    here, worker = e["this_program"], e["worker"]

    def row(label: str, key: str) -> list[Any]:
        return [label, here.get(key), worker.get(key)]

    rows = [
        row("implementation", "implementation"),
        row("version", "version"),
        row("free-threaded build", "free_threaded_build"),
        row("GIL enabled", "gil_enabled"),
        row("sys._is_gil_enabled exists", "has_is_gil_enabled"),
        row("thread switch interval (s)", "switch_interval"),
        row("executable", "executable"),
    ]
    if e["gil_enabled"]:
        meaning = (
            "This interpreter has the GIL, so the threads curves in experiments 3 and 5 are expected to stay "
            "flat for pure-Python work. On a free-threaded build (Python 3.13+, `python3.13t`, where "
            "`sys._is_gil_enabled()` returns False) threads run Python code in parallel, and the threads "
            "curve is expected to scale like the processes curve; races like experiment 2's remain."
        )
    else:
        meaning = (
            "This interpreter runs **without the GIL** (a free-threaded build): threads can run Python code on "
            "several cores at once, so the threads curves in experiments 3 and 5 are expected to scale with "
            "the cores like the processes curve. Races like experiment 2's remain, and are more frequent."
        )
    return f"""**The idea.** Whether threads can run Python code in parallel depends on the interpreter, so every
number above must be read together with it.

The worker below ran on {e['cluster']}.

{table(["", "this program", "a worker"], rows)}
**What it means.** {meaning}
"""


def terminal_table(results: dict[str, Any]) -> Any:
    """A rich Table summarising the run, for the terminal."""
    from rich.table import Table

    t = Table(title="conveyor demo: what was measured", show_lines=False)
    t.add_column("#", justify="right")
    t.add_column("claim")
    t.add_column("measured")
    t.add_column("confirmed?")
    for n, e in results["experiments"].items():
        v = verdict(e)
        style = {"yes": "green", "no": "red", "failed": "red"}.get(v, "")
        t.add_row(n, e["title"], e.get("finding", ""), f"[{style}]{v}[/]" if style else v)
    return t

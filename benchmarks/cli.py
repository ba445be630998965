"""`python -m benchmarks [--smoke] [--runs N] [--only NAME ...] [--out DIR]`: run, print, save."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape

from benchmarks.backends import REPO_ROOT, BackendSpec, Setup, backend_specs
from benchmarks.common import BackendFailure, Deadline
from benchmarks.machine import describe_machine, describe_source, load_average
from benchmarks.report import Cell, peer_ratios, ratios, render, write_results
from benchmarks.sizes import FULL, SMOKE
from benchmarks.workloads import WORKLOAD_NAMES, WORKLOADS, RunContext, Sample, Workload

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results")
SCHEMA = "conveyor-benchmarks/1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark Conveyor against concurrent.futures.ProcessPoolExecutor "
        "(and dask.distributed / Ray when installed).",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one run by default (for CI)")
    parser.add_argument("--runs", type=int, default=None, help="runs per workload; the table shows medians "
                        "(default 3, or 1 with --smoke)")
    parser.add_argument("--only", nargs="+", choices=WORKLOAD_NAMES, metavar="NAME",
                        help=f"run only these workloads: {', '.join(WORKLOAD_NAMES)}")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="run only these backends: conveyor, conveyor_threads, conveyor_pair (a standby pair), "
                             "process_pool, dask, ray")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the JSON results (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one sample may take before it counts as a hang (default 600, smoke 60)")
    parser.add_argument("--cluster-logs", action="store_true",
                        help="let the clusters' own warnings and errors through to this terminal")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _summary(workload: Workload, sample: Sample) -> str:
    parts = []
    for metric in workload.metrics:
        value = sample.values.get(metric.key)
        if value is not None:
            parts.append(f"{metric.label} {value:,.2f} {metric.unit}")
    return ", ".join(parts)


def run_sample(
    spec: BackendSpec, setup: Setup, workload: Workload, ctx: RunContext, timeout: float, cluster_logs: bool
) -> tuple[Sample, dict[str, Any]]:
    """Start the backend, warm it, run one timed sample, stop the backend (always)."""
    deadline = Deadline(timeout)
    with spec.factory(setup, cluster_logs=cluster_logs) as backend:
        try:
            warm = backend.warm(deadline)
            sample = workload.run(backend, ctx, deadline)
        except Exception as exc:
            problem = backend.health()
            if problem:
                raise BackendFailure(f"{problem} ({type(exc).__name__}: {exc})") from exc
            raise
        problem = backend.health()
        if problem:
            raise BackendFailure(problem)
    return sample, warm


def run_isolated(
    spec: BackendSpec, setup: Setup, workload: Workload, ctx: RunContext, timeout: float, cluster_logs: bool
) -> tuple[Sample, dict[str, Any]]:
    """run_sample in a fresh interpreter, so no backend's threads, imports or garbage (dask's event loop,
    Ray's client) lingers into the next backend's sample; a sample that hangs past its timeout is killed."""
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe(duplex=False)
    proc = spawn.Process(target=_sample_child, args=(child, spec, setup, workload, ctx, timeout, cluster_logs))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout + 60):
            raise TimeoutError(f"no result within the {timeout:g} s sample timeout (a hang?)")
        ok, value = parent.recv()
    except EOFError:
        raise BackendFailure(f"the sample's process died (exit code {proc.exitcode})") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _sample_child(conn: Any, *args: Any) -> None:
    try:
        result: tuple[bool, Any] = (True, run_sample(*args))
    except Exception as exc:
        exc.add_note(traceback.format_exc())
        result = (False, exc)
    try:
        conn.send(result)
    except Exception as exc:  # an exception that does not pickle: send what it says
        conn.send((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({exc})")))
    conn.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    runs: int = args.runs if args.runs is not None else (1 if args.smoke else 3)
    timeout: float = args.timeout or sizes.sample_timeout_s
    selected = [w for w in WORKLOADS if not args.only or w.name in args.only]
    progress = Console(stderr=True, highlight=False, soft_wrap=True)

    # Workers import benchmarks.tasks: make that work whatever their working directory.
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")

    started_at = datetime.now(UTC)
    started = time.perf_counter()
    load_before = load_average()
    source = describe_source(REPO_ROOT)
    specs = backend_specs(args.backends)
    available = [s for s in specs if s.available]

    ctx = RunContext(sizes)
    if any(w.name == "cpu_bound" for w in selected):
        ctx.calibrate_cpu()
        progress.print(f"cpu_loop calibrated: {ctx.cpu_loops:,} loops ~ {1000 * sizes.cpu_task_seconds:g} ms")

    cells: dict[str, dict[str, Cell]] = {}
    for w in selected:
        cells[w.name] = {}
        for spec in specs:
            if not spec.available:
                cells[w.name][spec.name] = Cell(status="skipped", note=spec.note)
            elif w.setup(spec.name, sizes) is None:
                cells[w.name][spec.name] = Cell(status="n/a", note="does not apply")
            else:
                cells[w.name][spec.name] = Cell()

    problems: list[dict[str, Any]] = []
    interrupted = False
    try:
        for run in range(runs):
            ctx.run_index = run
            for w in selected:
                for spec in available:
                    setup = w.setup(spec.name, sizes)
                    if setup is None:
                        continue
                    cell = cells[w.name][spec.name]
                    cell.setup = setup.describe()
                    label = escape(f"[run {run + 1}/{runs}] {w.name:<11} {spec.label:<16}")
                    t0 = time.perf_counter()
                    try:
                        if w.name == "cpu_bound":
                            ctx.cpu_serial_s()  # this run's serial baseline, measured here once for every backend
                        sample, warm = run_isolated(spec, setup, w, ctx, timeout, args.cluster_logs)
                    except Exception as exc:
                        message = f"{type(exc).__name__}: {exc}"
                        if isinstance(exc, TimeoutError) and not str(exc):
                            message = f"TimeoutError: no result within the {timeout:g} s sample timeout (a hang?)"
                        error: dict[str, Any] = {
                            "run": run,
                            "error": message,
                            "traceback": traceback.format_exc(),
                        }
                        cell.errors.append(error)
                        problems.append({"workload": w.name, "backend": spec.name, **error})
                        progress.print(f"{label} [red]FAILED[/red] {escape(message)}")
                        continue
                    cell.samples.append(
                        {"run": run, "values": sample.values, "detail": sample.detail, "warm_up": warm,
                         "elapsed_s": round(time.perf_counter() - t0, 3)}
                    )
                    progress.print(f"{label} {_summary(w, sample)}")
    except KeyboardInterrupt:
        interrupted = True
        progress.print("[yellow]interrupted: writing what was measured so far[/yellow]")

    workloads_doc: dict[str, Any] = {}
    for w in selected:
        entry = w.describe(ctx)
        for cell in cells[w.name].values():
            cell.finish()
        entry["results"] = {name: cell.as_dict() for name, cell in cells[w.name].items()}
        entry["ratios"] = ratios(entry)
        entry["peer_ratios"] = peer_ratios(entry)
        workloads_doc[w.name] = entry

    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": started_at.isoformat(timespec="seconds"),
        "command": ["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])],
        "smoke": args.smoke,
        "runs": runs,
        "sample_timeout_s": timeout,
        "duration_s": round(time.perf_counter() - started, 2),
        "interrupted": interrupted,
        "ok": not problems and not interrupted,
        "machine": describe_machine(),
        "load_average": {"before": load_before, "after": load_average()},
        "source": source,
        "sizes": sizes.as_dict(),
        "backends": {
            s.name: {"label": s.label, "available": s.available, "version": s.version, "note": s.note}
            for s in specs
        },
        "workloads": workloads_doc,
        "problems": problems,
    }
    render(doc, Console(highlight=False, width=max(160, Console().width)))
    path = write_results(doc, args.out)
    progress.print(f"results: {path} (and {os.path.join(args.out, 'latest.json')})")
    if interrupted:
        return 130
    return 1 if problems else 0

"""CLI commands to see what the cluster is doing: `map`, `logs`, `jobs`, `top`, and the `status` view.

Registered on the main app by `conveyor/cli/__init__.py`. Every command that prints for people also has
a machine-readable form: `--json`, or plain JSON lines for `map`. Progress bars and live views go to
the terminal only; piped output stays quiet and parseable.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from conveyor.cli.common import CliError, DispatcherOpt, KeysOpt, check_mode, connect, dump
from conveyor.client.progress import format_progress
from conveyor.protocol.durations import parse_duration

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
STATES = ("waiting", "scheduled", "limited", "queued", "running", "succeeded", "failed", "cancelled", "expired")
SPARK = "▁▂▃▄▅▆▇█"


def start_observers(
    d: Any,
    metrics_port: int | None,
    metrics_host: str,
    dashboard_port: int | None,
    dashboard_host: str,
    dashboard_token: str | None,
) -> None:
    """Start the dispatcher's metrics endpoint and dashboard (each in its own thread), when asked for."""
    if metrics_port is not None:
        from conveyor.dispatcher.observe.metrics import start_metrics

        try:
            m = start_metrics(d.observer, metrics_port, metrics_host)
            d.on_close(m.close)  # stopped with the dispatcher
        except OSError as exc:
            raise CliError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror or exc}") from None
        print(f"metrics: http://{m.host}:{m.port}/metrics", file=sys.stderr, flush=True)
    if dashboard_port is not None:
        from conveyor.dispatcher.observe.dashboard import start_dashboard

        try:
            server, token = start_dashboard(d.observer, dashboard_port, dashboard_host, dashboard_token)
            d.on_close(server.close)
        except OSError as exc:
            where = f"{dashboard_host}:{dashboard_port}"
            raise CliError(f"cannot serve the dashboard on {where}: {exc.strerror or exc}") from None
        url = f"http://{dashboard_host}:{server.port}/"
        if token and dashboard_token is None:
            url += f"?token={token}"  # generated: this is the only place it is shown
        elif token:
            url += "?token=..."
        print(f"dashboard: {url}", file=sys.stderr, flush=True)


# --- formatting -------------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else "<1 ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def fmt_ago(wall: float | None) -> str:
    if not wall:
        return "-"
    return fmt_duration(max(0.0, time.time() - wall)) + " ago"


def sparkline(values: list[float], width: int = 30) -> str:
    values = values[-width:]
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] for v in values)


def _load_bar(running: int, concurrency: int, width: int = 10) -> Text:
    filled = 0 if not concurrency else round(width * min(running, concurrency) / concurrency)
    style = "yellow" if concurrency and running >= concurrency else "cyan"
    text = Text("█" * filled, style=style)
    text.append("░" * (width - filled), style="grey35")
    text.append(f" {running}/{concurrency}")
    return text


def _prefetch_text(w: dict[str, Any]) -> str:
    """A worker's prefetch window: "auto (12)" when the dispatcher sizes it (12 jobs now), else "3"."""
    if "window" not in w:  # a dispatcher from before the window was reported: only the configured number
        return str(w.get("prefetch", "-"))
    return f"auto ({w['window']})" if w.get("prefetch_auto") else str(w["window"])


def render_status(st: dict[str, Any], rates: list[float] | None = None, max_workers: int | None = None) -> Group:
    """The status view: a summary, the workers, the queues (`conveyor status`, `conveyor top`)."""
    d = st.get("dispatcher", {})
    totals = st.get("totals", {})
    workers = st.get("workers", [])
    slots = st.get("slots") or {
        "busy": sum(w["running"] for w in workers),
        "total": sum(w["concurrency"] for w in workers),
    }
    thr = st.get("throughput") or {}
    modes: dict[str, int] = {}
    for w in workers:
        modes[w["mode"]] = modes.get(w["mode"], 0) + 1
    head = Text()
    head.append("dispatcher ", style="dim")
    head.append(str(d.get("endpoint")), style="bold")
    head.append(f"  instance {d.get('instance')}  pid {d.get('pid')}", style="dim")
    if "uptime" in st:
        head.append(f"  up {fmt_duration(st['uptime'])}", style="dim")
    journal = st.get("journal") or {}
    if journal.get("state") in ("full", "failing"):  # it refuses new jobs: say why, in red
        head.append(f"\njournal: {journal['state']}: {journal.get('reason')}", style="bold red")
    pair = d.get("pair")
    if pair:  # a standby pair: degraded (one copy of the journal) in red
        degraded = pair.get("replication") == "degraded"
        head.append(f"\npair: {pair.get('role')} {pair.get('state')} in epoch {pair.get('epoch')}, "
                    f"replication {pair.get('replication')}"
                    + (", new jobs wait (--require-backup)" if degraded and pair.get("require_backup") else ""),
                    style="bold red" if degraded else "dim")
    conns = st.get("connections") or {}
    if conns.get("accept_failures"):
        head.append(f"\nconnections: cannot accept more ({conns.get('last_error')}); serving the ones it has",
                    style="bold red")
    line = Text()
    line.append(f"{len(workers)} worker(s)", style="bold")
    if modes:
        line.append(" (" + ", ".join(f"{n} {m}" for m, n in sorted(modes.items())) + ")", style="dim")
    line.append("  slots ")
    line.append(f"{slots['busy']}/{slots['total']}", style="bold")
    line.append(" busy  ")
    line.append(f"{st.get('queued', 0):,}", style="bold yellow" if st.get("queued") else "bold")
    line.append(" queued, ")
    line.append(f"{st.get('running', 0):,}", style="bold cyan")
    line.append(" running")
    waiting = [(st.get(k, 0), label) for k, label in (
        ("scheduled", "scheduled"), ("limited", "limited"), ("waiting", "waiting for parents"),
        ("delayed", "waiting to retry"))]
    if any(n for n, _ in waiting):
        line.append(" (" + ", ".join(f"{n:,} {label}" for n, label in waiting if n) + ")", style="dim")
    if thr:
        line.append("  throughput ")
        line.append(f"{thr.get('last_10s', 0):,.1f}/s", style="bold green")
        line.append(f" (1 min: {thr.get('last_60s', 0):,.1f}/s)", style="dim")
    if rates:
        line.append("  " + sparkline(rates), style="green")
    tot = Text("jobs: ", style="dim")
    tot.append(f"{totals.get('submitted', 0):,} submitted, ")
    tot.append(f"{totals.get('succeeded', 0):,} succeeded", style="green")
    tot.append(", ")
    tot.append(f"{totals.get('failed', 0):,} failed", style="red" if totals.get("failed") else "")
    tot.append(f", {totals.get('cancelled', 0):,} cancelled, {totals.get('retried', 0):,} retried")
    if totals.get("expired"):
        tot.append(f", {totals['expired']:,} expired")

    table = Table(expand=False, header_style="bold dim", box=None, pad_edge=False, padding=(0, 2, 0, 0))
    for col, justify in (("worker", "left"), ("host", "left"), ("pid", "right"), ("mode", "left"), ("busy", "left"),
                         ("prefetch", "right"), ("done", "right"), ("tags", "left"), ("last heartbeat", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    shown = sorted(workers, key=lambda w: (-w["running"], w["name"])) if max_workers else sorted(
        workers, key=lambda w: w["name"]
    )
    if max_workers is not None:
        shown = shown[:max_workers]
    for w in shown:
        hb = float(w.get("last_seen_ago", 0.0))
        hb_style = "red" if hb > 3 else "yellow" if hb > 1.5 else "dim"
        name = Text(w["name"])
        if w.get("draining"):
            name.append(" draining", style="yellow")
        table.add_row(
            name, w["host"], str(w["pid"]), w["mode"], _load_bar(w["running"], w["concurrency"]), _prefetch_text(w),
            f"{w['done']:,}", ",".join(w["tags"]) or "-", Text(f"{hb:.1f}s ago", style=hb_style),
        )
    parts: list[RenderableType] = [head, line, tot, Text()]
    if workers:
        parts.append(table)
        if max_workers is not None and len(workers) > len(shown):
            parts.append(Text(f"... and {len(workers) - len(shown)} more worker(s)", style="dim"))
    else:
        parts.append(Text("no workers registered", style="yellow"))
    queues = st.get("queues", [])
    if queues:
        qt = Table(header_style="bold dim", box=None, pad_edge=False, padding=(0, 2, 0, 0))
        qt.add_column("queue mode")
        qt.add_column("tags")
        qt.add_column("queued", justify="right")
        for q in sorted(queues, key=lambda q: -q["queued"])[:20]:
            qt.add_row(q["mode"] or "any", ",".join(q["tags"]) or "-", f"{q['queued']:,}")
        parts += [Text(), qt]
    return Group(*parts)


def _wide_console() -> Console:
    """A console for tables: the terminal's width, or wide enough that a pipe gets whole lines."""
    console = Console()
    return console if console.is_terminal else Console(width=240)


def print_status(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(dump(st))
        return
    _wide_console().print(render_status(st))


# --- commands -----------------------------------------------------------------------------------------


def map_command(
    function: Annotated[str, typer.Argument(help="module:function to call once per input line.")],
    input_file: Annotated[
        str, typer.Option("--input", "-i", help="File of JSON argument lists, one per line ('-' for stdin).")
    ],
    mode: Annotated[str | None, typer.Option(help="Only run on workers in this mode.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Only run on workers with this tag.")] = None,
    retries: Annotated[int | None, typer.Option(help="Retries of crashes and lost workers (and --retry-on).")] = None,
    retry_on: Annotated[list[str] | None, typer.Option("--retry-on", help="Exception type to retry.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Fail a task after this many seconds.")] = None,
    chunksize: Annotated[int, typer.Option(help="Calls per task (more is faster for tiny functions).")] = 1,
    window: Annotated[int | None, typer.Option(help="Tasks in flight at most.")] = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar on stderr [when it is a terminal].")
    ] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
) -> None:
    """Call a function once per input line; print the results as JSON lines, in input order.

    Each input line is a JSON list of positional arguments (a line holding any other JSON value is
    one argument). Blank lines are skipped. Stops at the first failure (exit 1).
    """
    if ":" not in function or function.startswith(":") or function.endswith(":"):
        raise CliError(f"bad function {function!r}: expected module:function", 2)
    if chunksize < 1:
        raise CliError("--chunksize must be at least 1", 2)
    if mode is not None:
        check_mode(mode)
    if input_file == "-":
        stream = sys.stdin
        total = None
    else:
        try:
            stream = open(input_file, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CliError(f"cannot read {input_file}: {exc.strerror or exc}", 2) from None
        with open(input_file, "rb") as counting:
            total = sum(1 for raw in counting if raw.strip())
    bad: list[str] = []

    def calls() -> Iterator[list[Any]]:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                bad.append(f"{input_file}:{number}: not JSON: {exc}")
                return
            yield value if isinstance(value, list) else [value]

    done = 0
    try:
        with connect(dispatcher, keys) as client:
            job = client.options(
                mode=mode, retries=retries, retry_on=retry_on or None, timeout=timeout, tags=tag or None
            )
            results = job.starmap(
                function, calls(), chunksize=chunksize, window=window,
                progress=progress is not False, total=total,
            )
            try:
                for value in results:
                    sys.stdout.write(dump(value) + "\n")  # the bar may redirect it
                    done += 1
                    if done % 1000 == 0:
                        sys.stdout.flush()
            except Exception as exc:
                sys.stdout.flush()
                cause = exc.__cause__
                tb = getattr(cause, "tb", "") or getattr(exc, "remote_traceback", "")
                if tb:
                    sys.stderr.write(f"Remote traceback (item {done + 1}):\n{tb}")
                raise CliError(f"item {done + 1} failed: {type(exc).__name__}: {exc}") from None
    finally:
        sys.stdout.flush()
        if stream is not sys.stdin:
            stream.close()
    if bad:
        raise CliError(bad[0], 2)


def logs_command(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output until the job ends.")
    ] = False,
    stream: Annotated[
        str | None, typer.Option("--stream", "-s", help="Only this stream: stdout, stderr or log.")
    ] = None,
    interval: Annotated[float, typer.Option(help="With --follow: seconds between polls.")] = 0.25,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a job's captured stdout, stderr and log records (the last 64 KiB of each)."""
    if stream is not None and stream not in ("stdout", "stderr", "log"):
        raise CliError(f"unknown stream {stream!r}: choose stdout, stderr or log", 2)
    wanted = (stream,) if stream else ("stdout", "stderr", "log")

    def emit(name: str, text: str) -> None:
        if as_json:
            print(json.dumps({"stream": name, "text": text}), flush=True)
        elif stream or name == "stdout":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    with connect(dispatcher, keys) as client:
        reply = client.logs(job_id)
        if reply["state"] is None and not reply["streams"]:
            raise CliError(f"no job {job_id} (never submitted, or expired)")
        if not follow:
            streams = {n: s["text"] for n, s in reply["streams"].items() if n in wanted}
            if as_json:
                print(dump({"id": job_id, "state": reply["state"], "output": streams,
                                 **({"progress": reply["progress"]} if reply.get("progress") else {})}))
                return
            for name in wanted:
                if streams.get(name):
                    emit(name, streams[name])
            return
        offsets: dict[str, int] = {}
        while True:
            for name in wanted:
                s = reply["streams"].get(name)
                if s is None:
                    continue
                if s["start"] > offsets.get(name, 0) and not as_json:
                    lost = s["start"] - offsets.get(name, 0)
                    sys.stderr.write(f"[conveyor: {lost:,} earlier characters of {name} were not kept]\n")
                if s["text"]:
                    emit(name, s["text"])
                offsets[name] = s["end"]
            if reply["state"] not in ("waiting", "scheduled", "limited", "queued", "running"):  # finished
                return
            time.sleep(interval)
            reply = client.logs(job_id, offsets)


def jobs_command(
    state: Annotated[
        list[str] | None, typer.Option("--state", help="waiting, scheduled, limited, queued, running, succeeded, "
                                       "failed, cancelled or expired (repeatable).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only jobs submitted or finished this long ago: 30s, 10m, 2h.")
    ] = None,
    function: Annotated[str | None, typer.Option("--function", "-f", help="Only jobs of this module:function.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 50,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs: running, not started (oldest first), then recently finished (the last 10,000)."""
    for s in state or []:
        if s not in STATES:
            raise CliError(f"unknown state {s!r}: choose from {', '.join(STATES)}", 2)
    seconds = None
    if since is not None:
        try:
            seconds = parse_duration(since)
        except ValueError as exc:
            raise CliError(str(exc), 2) from None
    if limit < 1:
        raise CliError("--limit must be at least 1", 2)
    with connect(dispatcher, keys) as client:
        jobs, truncated = client.jobs(states=state or None, since=seconds, fn=function, limit=limit)
    if as_json:
        print(dump({"jobs": jobs, "truncated": truncated}))
        return
    console = _wide_console()
    if not jobs:
        console.print("no jobs match", style="dim")
        return
    table = Table(header_style="bold dim", box=None, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column("job", no_wrap=True, min_width=max(len(j["id"]) for j in jobs))  # ids are never cut
    for col, justify in (("function", "left"), ("state", "left"), ("worker", "left"),
                         ("tries", "right"), ("submitted", "right"), ("duration", "right"), ("", "left")):
        table.add_column(col, justify=justify, overflow="fold" if col == "" else "ellipsis")  # type: ignore[arg-type]
    colors = {"succeeded": "green", "failed": "red", "cancelled": "dim", "expired": "dim", "running": "cyan",
              "queued": "yellow", "scheduled": "blue", "limited": "magenta", "waiting": "blue"}
    for j in jobs:
        note = j.get("error") or format_progress(j.get("progress")) or _waiting_note(j)
        table.add_row(
            j["id"], j["fn"], Text(j["state"], style=colors.get(j["state"], "")), j.get("worker") or "-",
            str(j["attempts"]), fmt_ago(j.get("submitted_at")), fmt_duration(j.get("duration")),
            Text(note or "", style="red" if j.get("error") else "dim"),
        )
    console.print(table)
    if truncated:
        console.print(f"(more jobs match: showing {len(jobs)}; use --limit)", style="dim")


def _waiting_note(job: dict[str, Any]) -> str:
    """Why a job has not started: due later, held by limit keys, waiting for parents."""
    if job["state"] == "scheduled" and job.get("due_at"):
        return f"due in {fmt_duration(max(0.0, job['due_at'] - time.time()))}"
    if job["state"] == "limited" and job.get("limits"):
        return "limits: " + ", ".join(job["limits"])
    if job["state"] == "waiting" and job.get("parents"):
        n = len(job["parents"])
        return f"after {n} job(s)" if n > 1 else f"after {job['parents'][0]}"
    return ""


def top_command(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    iterations: Annotated[int | None, typer.Option(help="Stop after this many refreshes [run until Ctrl-C].")] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
) -> None:
    """A live view of the cluster: workers and their load, queues, throughput. Ctrl-C to quit."""
    from rich.live import Live

    if interval <= 0:
        raise CliError("--interval must be positive", 2)
    console = Console()
    rates: deque[float] = deque(maxlen=60)
    last: tuple[float, int] | None = None
    with connect(dispatcher, keys) as client:

        def view() -> RenderableType:
            nonlocal last
            st = client.status()
            t = st.get("totals", {})
            done = t.get("succeeded", 0) + t.get("failed", 0) + t.get("cancelled", 0)
            clock = time.monotonic()
            if last is not None and clock > last[0]:
                rates.append((done - last[1]) / (clock - last[0]))
            last = (clock, done)
            rows = max(5, console.size.height - 12) if console.is_terminal else None
            footer = Text(f"\nrefreshing every {interval:g} s; Ctrl-C to quit", style="dim")
            return Group(render_status(st, list(rates), max_workers=rows), footer)

        n = 0
        try:
            with Live(view(), console=console, auto_refresh=False, transient=False) as live:
                n = 1
                while iterations is None or n < iterations:
                    time.sleep(interval)
                    live.update(view(), refresh=True)
                    n += 1
        except KeyboardInterrupt:
            pass

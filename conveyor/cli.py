"""The `conveyor` command line: run a dispatcher or workers, submit jobs, and look at them.

Every failure ends in one line on stderr (`error: ...`) and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Annotated, Any

import typer

try:  # typer >= 0.29 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from conveyor.cli_common import keys_option, new_app
from conveyor.errors import ConveyorError
from conveyor.protocol import errors as perr
from conveyor.protocol.payload import decode_value

app = new_app("conveyor", "Conveyor: a distributed task runner for Python on ZeroMQ.")

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ENV_DISPATCHER = "CONVEYOR_DISPATCHER"

DispatcherOpt = Annotated[
    str | None,
    typer.Option("--dispatcher", "-d", help=f"Dispatcher address [env {ENV_DISPATCHER}; default {DEFAULT_ADDRESS}]"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
KeysOpt = Annotated[
    str | None,
    keys_option("Key directory from `conveyor keys init`: CurveZMQ (docs/security.md) [env CONVEYOR_KEYS]"),
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", envvar="CONVEYOR_INSECURE", show_envvar=False,
                 help="Allow a non-loopback address without keys: no authentication, no encryption."),
]
MaxMessageOpt = Annotated[
    int, typer.Option("--max-message-mib", min=1, help="Largest frame a socket accepts (ZMQ_MAXMSGSIZE), in MiB.")
]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
LogFormatOpt = Annotated[str, typer.Option("--log-format", help="text, or json (one object per line).")]


class CliError(Exception):
    """An error to print as one line, with this exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _address(option: str | None) -> str:
    return option or os.environ.get(ENV_DISPATCHER) or DEFAULT_ADDRESS


def _setup_logging(level: str, fmt: str = "text") -> None:
    from conveyor.logfmt import setup_logging

    try:
        setup_logging(level, fmt)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None


def _connect(dispatcher: str | None, keys: str | None = None) -> Any:
    from conveyor.client import Client

    timeout = float(os.environ.get("CONVEYOR_CONNECT_TIMEOUT", "5"))
    return Client(_address(dispatcher), connect_timeout=timeout, reconnect_timeout=max(timeout, 10.0), keys=keys)


def _check_bind(bind: str, keys: str | None, insecure: bool, warn: bool = True) -> None:
    """Refuse a non-loopback address without keys (one line); with --insecure, warn at every start."""
    from conveyor.errors import InsecureBindError
    from conveyor.security import check_bind, insecure_warning

    try:
        check_bind(bind, keys is not None, insecure)
    except InsecureBindError as exc:
        raise CliError(str(exc), 2) from None
    if insecure and warn:
        print(insecure_warning(bind) if keys is None else "warning: --insecure has no effect: keys are in use",
              file=sys.stderr, flush=True)


def _check_mode(mode: str) -> None:
    from conveyor.worker.modes import MODES

    if mode not in MODES:
        raise CliError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}", 2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _dump(obj: Any) -> str:
    return json.dumps(obj, default=_jsonable)


def _record_json(record: dict[str, Any], data: list[Any]) -> dict[str, Any]:
    out = {k: record.get(k) for k in ("id", "state", "worker", "attempts")}
    out["history"] = record.get("history", [])
    if record.get("output"):
        out["output"] = record["output"]  # the task's captured stdout, stderr and log records (their tails)
    if record.get("state") == "succeeded":
        out["result"] = decode_value(data)
    elif record.get("error"):
        out["error"] = record["error"]
    return out


# --- servers --------------------------------------------------------------------------------------


@app.command()
def dispatcher(
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on; port 0 picks a free one.")] = (
        DEFAULT_ADDRESS
    ),
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between heartbeats.")] = 1.0,
    liveness: Annotated[int, typer.Option(help="Missed heartbeats before a worker is declared lost.")] = 3,
    result_ttl: Annotated[float, typer.Option(help="Seconds a finished job's result is kept for `result`.")] = 3600.0,
    journal: Annotated[
        str | None, typer.Option(help="Journal file [$XDG_STATE_HOME/conveyor/journal.db].")
    ] = None,
    no_journal: Annotated[bool, typer.Option("--no-journal", help="Keep jobs in memory only.")] = False,
    journal_sync: Annotated[
        str, typer.Option(help="normal: survive a dispatcher crash; full: also an OS crash (fsync per commit).")
    ] = "normal",
    max_queued: Annotated[int, typer.Option(help="Queued jobs beyond which submitters are slowed.")] = 1_000_000,
    keys: KeysOpt = None,
    insecure: InsecureOpt = False,
    max_message_mib: MaxMessageOpt = 512,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (/metrics; 0 picks one).")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address for --metrics-port.")] = "127.0.0.1",
    dashboard_port: Annotated[
        int | None, typer.Option(help="Serve the web dashboard on this port (0 picks one).")
    ] = None,
    dashboard_host: Annotated[
        str, typer.Option(help="Address for --dashboard-port; off loopback a token is required.")
    ] = "127.0.0.1",
    dashboard_token: Annotated[
        str | None, typer.Option(envvar="CONVEYOR_DASHBOARD_TOKEN", help="Dashboard token [generated off loopback].")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the dispatcher: accept jobs from clients and hand them to workers."""
    from conveyor.dispatcher import Dispatcher
    from conveyor.dispatcher.journal import Journal, default_journal_path

    _setup_logging(log_level, log_format)
    _check_bind(bind, keys, insecure)
    store = None
    if not no_journal:
        path = journal or str(default_journal_path())
        try:
            store = Journal(path, synchronous=journal_sync)
        except Exception as exc:
            raise CliError(f"cannot open the journal: {exc}") from None
    try:
        d = Dispatcher(
            bind, heartbeat_interval=heartbeat_interval, liveness=liveness, result_ttl=result_ttl,
            journal=store, max_queued=max_queued, keys=keys, insecure=insecure, max_message_size=max_message_mib << 20,
        )
    except ConveyorError:
        if store is not None:
            store.close()
        raise
    try:
        endpoint = d.bind()
    except Exception as exc:
        if store is not None:
            store.close()
        raise CliError(f"cannot listen on {bind}: {exc}") from None
    d.install_signal_handlers()  # before anyone can learn our endpoint and signal us
    from conveyor.cli_observe import start_observers

    start_observers(d, metrics_port, metrics_host, dashboard_port, dashboard_host, dashboard_token)
    print(endpoint, flush=True)  # first stdout line: the endpoint (LocalCluster reads it)
    d.run()


@app.command()
def worker(
    connect: Annotated[
        str | None, typer.Option("--connect", "-c", help=f"Dispatcher address [env {ENV_DISPATCHER}]")
    ] = None,
    mode: Annotated[str, typer.Option(help="threads, processes or asyncio.")] = "processes",
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-n", help="Tasks at once [CPUs; asyncio 1000].")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="A tag this worker offers (repeatable).")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name [host-pid].")] = None,
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between heartbeats.")] = 1.0,
    liveness: Annotated[int, typer.Option(help="Missed heartbeats before the dispatcher is considered lost.")] = 3,
    drain_timeout: Annotated[float, typer.Option(help="Seconds to let running tasks finish on SIGTERM.")] = 30.0,
    max_child_memory: Annotated[
        int | None, typer.Option(help="processes mode: kill a child whose RSS exceeds this many MiB.")
    ] = None,
    prefetch: Annotated[
        str,
        typer.Option(
            help="Jobs to hold beyond the free slots: 'auto' (up to 256, sized by task durations) or a number."
        ),
    ] = "auto",
    keys: KeysOpt = None,
    max_message_mib: MaxMessageOpt = 512,
    capture: Annotated[
        bool, typer.Option("--capture/--no-capture", help="Capture tasks' stdout, stderr and logging per job.")
    ] = True,
    output_limit: Annotated[int, typer.Option(help="KiB of each output stream kept per task (the tail).")] = 64,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a worker that executes tasks in one mode."""
    from conveyor.worker import Worker, run_worker

    _setup_logging(log_level, log_format)
    if output_limit < 1:
        raise CliError("--output-limit must be at least 1", 2)
    if prefetch != "auto" and not prefetch.isdigit():
        raise CliError(f"--prefetch must be 'auto' or a number of jobs, not {prefetch!r}", 2)
    try:
        w = Worker(
            _address(connect),
            mode=mode,
            concurrency=concurrency,
            tags=tag,
            name=name,
            heartbeat_interval=heartbeat_interval,
            liveness=liveness,
            drain_timeout=drain_timeout,
            max_child_memory_mb=max_child_memory,
            capture_output=capture,
            output_limit=output_limit << 10,
            prefetch=None if prefetch == "auto" else int(prefetch),
            keys=keys,
            max_message_size=max_message_mib << 20,
        )
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    code = run_worker(w)
    if code:
        raise typer.Exit(code)


@app.command()
def up(
    workers: Annotated[int, typer.Option("--workers", "-w", help="Number of worker processes.")] = 2,
    mode: Annotated[str, typer.Option(help="threads, processes or asyncio.")] = "processes",
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-n", help="Tasks at once per worker.")] = None,
    bind: Annotated[str, typer.Option("--bind", help="Dispatcher address.")] = DEFAULT_ADDRESS,
    keys: KeysOpt = None,
    insecure: InsecureOpt = False,
    log_level: LogLevelOpt = "info",
) -> None:
    """Start a dispatcher and local workers in one command; Ctrl-C stops all of it."""
    from conveyor.local import LocalCluster

    _check_bind(bind, keys, insecure, warn=False)  # the dispatcher prints the --insecure warning itself
    if keys is not None:
        from conveyor.keys import load_dispatcher_credentials, load_peer_credentials

        load_dispatcher_credentials(keys)
        load_peer_credentials(keys, "worker")
    _check_mode(mode)
    if workers < 1 or (concurrency is not None and concurrency < 1):
        raise CliError("--workers and --concurrency must be at least 1", 2)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from conveyor.dispatcher.journal import default_journal_path

    cluster = LocalCluster(
        workers=workers, mode=mode, concurrency=concurrency, bind=bind, log_level=log_level, quiet=False,
        journal=str(default_journal_path()), keys=keys, insecure=insecure,
    )
    try:
        address = cluster.start()
    except ConveyorError as exc:
        raise CliError(f"{exc} (is {bind} already in use?)") from None
    print(f"conveyor is up: dispatcher at {address}, {workers} {mode} worker(s). Ctrl-C to stop.", file=sys.stderr)
    print(f"  export {ENV_DISPATCHER}={address}", file=sys.stderr)
    try:
        while not stop.wait(0.5):
            if cluster.dispatcher is not None and cluster.dispatcher.poll() is not None:
                raise CliError("the dispatcher exited unexpectedly")
    finally:
        print("stopping...", file=sys.stderr)
        cluster.stop()


# --- jobs -----------------------------------------------------------------------------------------


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@app.command(context_settings={"ignore_unknown_options": True})
def submit(
    function: Annotated[str | None, typer.Argument(help="module:function to run.")] = None,
    args: Annotated[list[str] | None, typer.Argument(help="Arguments; each parsed as JSON, else a string.")] = None,
    shell: Annotated[str | None, typer.Option("--shell", help="Run this shell command on a worker instead.")] = None,
    kwargs: Annotated[str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print the result.")] = False,
    mode: Annotated[str | None, typer.Option(help="Only run on a worker in this mode.")] = None,
    retries: Annotated[
        int | None, typer.Option(help="Retries: of crashes and lost workers, and of --retry-on exceptions.")
    ] = None,
    retry_on: Annotated[
        list[str] | None, typer.Option("--retry-on", help="Exception type name to retry (repeatable).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Fail the task after this many seconds.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Only run on workers with this tag.")] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job; print its id, or with --wait its result."""
    if (function is None) == (shell is None):
        raise CliError("give either module:function [ARGS...] or --shell 'COMMAND'", 2)
    call_kwargs: dict[str, Any] = {}
    if kwargs is not None:
        try:
            call_kwargs = json.loads(kwargs)
        except ValueError as exc:
            raise CliError(f"--kwargs is not valid JSON: {exc}", 2) from None
        if not isinstance(call_kwargs, dict):
            raise CliError("--kwargs must be a JSON object", 2)
    if shell is not None:
        target, call_args = "conveyor.builtins:shell", [shell]
    else:
        assert function is not None
        if ":" not in function or function.startswith(":") or function.endswith(":"):
            raise CliError(f"bad function {function!r}: expected module:function", 2)
        target, call_args = function, [_parse_arg(a) for a in args or []]
        for raw, value in zip(args or [], call_args, strict=True):
            if raw.startswith("-") and isinstance(value, str):  # -1 is an argument; --wiat is a typo
                raise CliError(f"no such option: {raw} (pass a string starting with '-' as JSON: '\"{raw}\"')", 2)
    if mode is not None:
        _check_mode(mode)
    with _connect(dispatcher, keys) as client:
        job = client.options(
            mode=mode, retries=retries, retry_on=retry_on or None, timeout=timeout, tags=tag or None, keep=True
        )
        fut = job.submit(target, *call_args, **call_kwargs)
        if not wait:
            fut.add_done_callback(lambda _: None)
            # the id is ours from the start; make sure the dispatcher accepted it before we exit
            info = client.job_info(fut.job_id)
            if info[0] is None and not fut.done():
                raise CliError("the dispatcher did not accept the job")
            print(_dump({"id": fut.job_id}) if as_json else fut.job_id)
            return
        from conveyor.bars import wait_with_progress

        record, data = (
            client.wait_record(fut.job_id) if as_json else wait_with_progress(client, fut.job_id, target)
        )
        _print_outcome(record, data, as_json, shell=shell is not None)


def _print_outcome(record: dict[str, Any], data: list[Any], as_json: bool, shell: bool = False) -> None:
    state = record.get("state")
    if as_json:
        print(_dump(_record_json(record, data)))
        if state != "succeeded":
            raise typer.Exit(1)
        return
    if state == "succeeded":
        value = decode_value(data)
        if shell and isinstance(value, dict) and "exit_code" in value:
            sys.stdout.write(value.get("stdout", ""))
            sys.stderr.write(value.get("stderr", ""))
            raise typer.Exit(int(value["exit_code"]))
        print(value if isinstance(value, str) else _dump(value))
        return
    error = record.get("error") or {}
    if state == "unknown":
        raise CliError(str(error.get("message", "unknown job")))
    if error.get("traceback"):
        sys.stderr.write(f"Remote traceback (job {record.get('id')}):\n{error['traceback']}")
    raise CliError(f"job {record.get('id')} {state}: {perr.describe(error)}")


@app.command()
def result(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job finishes.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a job's result, error or state."""
    with _connect(dispatcher, keys) as client:
        if not wait:
            view = client.job_info(job_id)[0]
            if view is None:
                raise CliError(f"no job {job_id} (never submitted, or expired)")
            if view["state"] in ("queued", "running"):
                if as_json:
                    keys_ = ("id", "state", "worker", "attempts", "history", "progress", "output")
                    print(_dump({k: view[k] for k in keys_ if k in view}))
                else:
                    from conveyor.bars import format_progress

                    print(" ".join(filter(None, [view["state"], format_progress(view.get("progress"))])))
                return
        try:
            record, data = client.wait_record(job_id, timeout)
        except TimeoutError:
            raise CliError(f"job {job_id} did not finish within {timeout:g} s") from None
        _print_outcome(record, data, as_json)


@app.command()
def status(dispatcher: DispatcherOpt = None, as_json: JsonOpt = False, keys: KeysOpt = None) -> None:
    """Show workers and queue depth."""
    with _connect(dispatcher, keys) as client:
        st = client.status()
    from conveyor.cli_observe import print_status

    print_status(st, as_json)  # workers (host, mode, busy slots, prefetch, done, heartbeat), queues, throughput


@app.command()
def cancel(
    job_ids: Annotated[list[str], typer.Argument(help="Job ids to cancel.")],
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
) -> None:
    """Cancel queued or running jobs."""
    with _connect(dispatcher, keys) as client:
        done = set(client.cancel(*job_ids))
    for job_id in job_ids:
        print(f"{job_id} {'cancelled' if job_id in done else 'not cancelled (unknown or already finished)'}")
    if len(done) < len(job_ids):
        raise typer.Exit(1)


from conveyor.cli_observe import register as register_observe  # noqa: E402 - map, logs, jobs, top

register_observe(app)

from conveyor.cluster import app as cluster_app  # noqa: E402 - `conveyor cluster up|status|down HOSTS.toml`

app.add_typer(cluster_app, name="cluster")

from conveyor.keys_cli import app as keys_app  # noqa: E402 - `conveyor keys init|add-worker|add-client|list|revoke`

app.add_typer(keys_app, name="keys")

from conveyor.demo.cli import demo  # noqa: E402 - `conveyor demo`: measured experiments, a report with plots

app.command()(demo)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # without standalone mode, typer.Exit(n) comes back as n
    except click_exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "usage: conveyor COMMAND --help", file=sys.stderr)
        sys.exit(2)
    except click_exceptions.UsageError as exc:
        command = exc.ctx.info_name if exc.ctx else None
        hint = f" (see `conveyor {command} --help`)" if command and "conveyor" not in command else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except ConveyorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

"""`conveyor dispatcher`, `conveyor worker` and `conveyor up`: the long-running processes."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Annotated, Any

import typer

from conveyor.cli.common import (
    DEFAULT_ADDRESS,
    ENV_DISPATCHER,
    EXIT_USAGE,
    CliError,
    InsecureOpt,
    KeysOpt,
    LogFormatOpt,
    LogLevelOpt,
    MaxMessageOpt,
    address,
    check_bind,
    check_mode,
    setup_logging,
)
from conveyor.errors import ConveyorError


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
    max_queued_mib: Annotated[
        int, typer.Option(min=1, help="MiB of task arguments held for unfinished jobs beyond which submitters wait.")
    ] = 2048,
    limit: Annotated[
        list[str] | None,
        typer.Option("--limit", help="A limit key: 'stripe=100/s,burst=20' or 'db=concurrency:4' (repeatable)."),
    ] = None,
    limits_file: Annotated[
        str | None, typer.Option(help="A TOML file of limit keys: [limits] stripe = \"100/s,burst=20\".")
    ] = None,
    priority_aging: Annotated[
        float | None, typer.Option(help="Seconds of waiting worth one priority point (default: strict priority).")
    ] = None,
    schedules: Annotated[
        str | None, typer.Option(help="A TOML file of schedules ([schedules.NAME]: cron or every, task...).")
    ] = None,
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
    peer: Annotated[
        str | None, typer.Option(help="Standby pair: the other dispatcher's pair address (tcp://HOST:PORT).")
    ] = None,
    role: Annotated[str, typer.Option(help="Standby pair: primary or backup (the epochs' parity).")] = "primary",
    pair_bind: Annotated[
        str | None, typer.Option(help="Standby pair: our pair address, where the peer connects [--bind's port + 1].")
    ] = None,
    witness: Annotated[
        str | None, typer.Option(help="Standby pair: a `conveyor witness` address (a third vote).")
    ] = None,
    failover_timeout: Annotated[
        float, typer.Option(help="Standby pair: seconds of the peer's silence before a takeover may start.")
    ] = 2.0,
    require_backup: Annotated[
        bool, typer.Option(help="Standby pair: accept new jobs only while both journals are in sync "
                           "(degraded, clients wait and send again).")
    ] = False,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the dispatcher: accept jobs from clients and hand them to workers."""
    from conveyor.dispatcher import Dispatcher
    from conveyor.dispatcher.journal import Journal, default_journal_path

    setup_logging(log_level, log_format)
    check_bind(bind, keys, insecure)
    declared = _limits(limit or [], limits_file)
    if priority_aging is not None and not priority_aging > 0:
        raise CliError("--priority-aging must be a positive number of seconds", EXIT_USAGE)
    declared_schedules = _schedules(schedules)
    store = None
    if not no_journal:
        path = journal or str(default_journal_path())
        try:
            store = Journal(path, synchronous=journal_sync)
        except Exception as exc:
            raise CliError(f"cannot open the journal: {exc}") from None
    pair = None
    if require_backup and peer is None:
        raise CliError("--require-backup needs --peer (a standby pair)", EXIT_USAGE)
    if peer is not None:
        if store is None:
            raise CliError("a standby pair needs a journal (--no-journal cannot ship one)", EXIT_USAGE)
        try:
            pair = _pair(bind, peer, role, pair_bind, witness, failover_timeout, keys, store, require_backup)
        except (ValueError, ConveyorError) as exc:
            store.close()
            raise CliError(str(exc), EXIT_USAGE) from None
    try:
        d = Dispatcher(
            bind, heartbeat_interval=heartbeat_interval, liveness=liveness, result_ttl=result_ttl,
            journal=store, max_queued=max_queued, max_queued_bytes=max_queued_mib << 20, keys=keys,
            insecure=insecure, max_message_size=max_message_mib << 20, limits=declared,
            priority_aging_s=priority_aging, schedules=declared_schedules, pair=pair,
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
    if metrics_port is not None or dashboard_port is not None:  # observe.py loads rich: only when asked for
        from conveyor.cli.observe import start_observers

        start_observers(d, metrics_port, metrics_host, dashboard_port, dashboard_host, dashboard_token)
    print(endpoint, flush=True)  # first stdout line: the endpoint (LocalCluster reads it)
    d.run()
    if d.restart:  # stepped down (a higher epoch exists): start again, passive, as a fresh process
        import os

        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _pair(
    bind: str, peer: str, role: str, pair_bind: str | None, witness: str | None, failover_timeout_s: float,
    keys: str | None, store: Any, require_backup: bool = False,
) -> Any:
    """The standby pair's driver from the --peer options (ValueError: a usage error)."""
    from conveyor.dispatcher.pair import Pair
    from conveyor.dispatcher.standby import StandbyConfig

    for name, value in (("--peer", peer), ("--pair-bind", pair_bind), ("--witness", witness)):
        if value is not None and not value.startswith("tcp://"):
            raise ValueError(f"{name} must be a tcp:// address, not {value!r}")
    if pair_bind is None:
        host, _, port = bind.rpartition(":")
        if not port.isdigit() or port == "0":
            raise ValueError("--pair-bind is needed when --bind has no fixed port")
        pair_bind = f"{host}:{int(port) + 1}"
    config = StandbyConfig.for_failover(role, failover_timeout_s, witness=witness is not None)
    credentials = None
    if keys is not None:
        from conveyor.security.keys import load_dispatcher_credentials

        credentials = load_dispatcher_credentials(keys)
    return Pair(config, peer=peer, bind=pair_bind, journal=store, endpoint=bind, witness=witness,
                credentials=credentials, require_backup=require_backup)


def _schedules(path: str | None) -> list[Any]:
    """The --schedules file, checked: one line and exit 2 if wrong."""
    if path is None:
        return []
    from conveyor.dispatcher.schedule_file import load

    try:
        return load(path)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _limits(declarations: list[str], path: str | None) -> list[tuple[str, Any]]:
    """--limit KEY=RULE and a limits file's [limits] table, checked: one line and exit 2 if wrong."""
    from conveyor.dispatcher.limits import check_key, parse_declaration, parse_rule

    out: list[tuple[str, Any]] = []
    try:
        if path is not None:
            import tomllib

            try:
                with open(path, "rb") as f:
                    table = tomllib.load(f).get("limits", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ValueError(f"cannot read the limits file {path}: {exc}") from None
            if not isinstance(table, dict):
                raise ValueError(f"{path}: [limits] must be a table of KEY = \"RULE\"")
            for key in table:
                check_key(str(key))
            out += [(str(key), parse_rule(str(rule))) for key, rule in table.items()]
        out += [parse_declaration(d) for d in declarations]
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return out


def worker(
    connect: Annotated[
        str | None, typer.Option("--connect", "-c", help=f"Dispatcher address [env {ENV_DISPATCHER}]")
    ] = None,
    mode: Annotated[str, typer.Option(help="threads, processes, asyncio or interpreters (3.12+).")] = "processes",
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
    health_file: Annotated[
        str | None, typer.Option(help="Write the time into this file every heartbeat (for liveness probes).")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a worker that executes tasks in one mode."""
    from conveyor.worker import Worker, run_worker

    setup_logging(log_level, log_format)
    if output_limit < 1:
        raise CliError("--output-limit must be at least 1", EXIT_USAGE)
    if prefetch != "auto" and not prefetch.isdigit():
        raise CliError(f"--prefetch must be 'auto' or a number of jobs, not {prefetch!r}", EXIT_USAGE)
    try:
        w = Worker(
            address(connect),
            mode=mode,
            concurrency=concurrency,
            tags=tag,
            name=name,
            heartbeat_interval=heartbeat_interval,
            liveness_beats=liveness,
            drain_timeout=drain_timeout,
            max_child_memory_mib=max_child_memory,
            capture_output=capture,
            output_limit_chars=output_limit << 10,
            prefetch=None if prefetch == "auto" else int(prefetch),
            keys=keys,
            max_message_size=max_message_mib << 20,
            health_file=health_file,
        )
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    code = run_worker(w)
    if code:
        raise typer.Exit(code)


def up(
    workers: Annotated[int, typer.Option("--workers", "-w", help="Number of worker processes.")] = 2,
    mode: Annotated[str, typer.Option(help="threads, processes, asyncio or interpreters (3.12+).")] = "processes",
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-n", help="Tasks at once per worker.")] = None,
    bind: Annotated[str, typer.Option("--bind", help="Dispatcher address.")] = DEFAULT_ADDRESS,
    keys: KeysOpt = None,
    insecure: InsecureOpt = False,
    log_level: LogLevelOpt = "info",
) -> None:
    """Start a dispatcher and local workers in one command; Ctrl-C stops all of it."""
    from conveyor.client.local import LocalCluster  # alone: the rest of the client loads as the cluster starts

    check_bind(bind, keys, insecure, warn=False)  # the dispatcher prints the --insecure warning itself
    if keys is not None:
        from conveyor.security.keys import load_dispatcher_credentials, load_peer_credentials

        load_dispatcher_credentials(keys)
        load_peer_credentials(keys, "worker")
    check_mode(mode)
    if workers < 1 or (concurrency is not None and concurrency < 1):
        raise CliError("--workers and --concurrency must be at least 1", EXIT_USAGE)
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
    try:
        _wait_for_a_worker(address, keys)
        print(f"conveyor is up: dispatcher at {address}, {workers} {mode} worker(s). Ctrl-C to stop.",
              file=sys.stderr)
        print(f"  export {ENV_DISPATCHER}={address}", file=sys.stderr)
        while not stop.wait(0.5):
            if cluster.dispatcher is not None and cluster.dispatcher.poll() is not None:
                raise CliError("the dispatcher exited unexpectedly")
    finally:
        print("stopping...", file=sys.stderr)
        cluster.stop()


def _wait_for_a_worker(address: str, keys: str | None, timeout_s: float = 30.0) -> None:
    """`conveyor up` says it is up once the dispatcher has a worker (the workers start with the dispatcher
    and register as they come); without one by the timeout, a warning, and it stays up."""
    from conveyor.client import Client

    try:
        with Client(address, connect_timeout=timeout_s, keys=keys) as client:
            client.wait_for_workers(1, timeout=timeout_s)
    except (ConveyorError, OSError, ValueError) as exc:  # a key directory without a client key, too
        print(f"warning: no worker seen registered yet: {exc}", file=sys.stderr)

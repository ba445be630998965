"""`conveyor witness`: the standby pair's third vote (docs/standby.md); the loop is dispatcher/witness.py."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from conveyor.cli.common import EXIT_USAGE, CliError, KeysOpt, LogFormatOpt, LogLevelOpt, setup_logging


def witness(
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on (tcp://HOST:PORT).")] = "tcp://127.0.0.1:5557",
    state: Annotated[str, typer.Option(help="File holding the highest epoch granted.")] = "witness.epoch",
    failover_timeout: Annotated[
        float, typer.Option(help="The pair's --failover-timeout (the lease follows from it).")
    ] = 2.0,
    keys: KeysOpt = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a witness: a vote for a standby pair of dispatchers, so that at most one is active.

    With --keys (the pair's key directory), it speaks CURVE and answers only the pair's dispatchers."""
    import logging

    import zmq

    from conveyor.dispatcher.standby import pair_timings
    from conveyor.dispatcher.witness import WitnessServer

    setup_logging(log_level, log_format)
    log = logging.getLogger("conveyor.witness")
    if not bind.startswith("tcp://"):
        raise CliError(f"--bind must be a tcp:// address, not {bind!r}", EXIT_USAGE)
    try:
        _, _, lease_s = pair_timings(failover_timeout)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    credentials = None
    if keys is not None:
        from conveyor.security.keys import load_dispatcher_credentials

        credentials = load_dispatcher_credentials(keys)  # KeysError: one line, from cli.main
    path = Path(state)
    try:
        server = WitnessServer(bind, path, lease_s, credentials)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the witness state {path}: {exc}") from None
    except zmq.ZMQError as exc:
        raise CliError(f"cannot listen on {bind}: {exc}") from None
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    print(bind, flush=True)
    log.info("witness on %s, highest epoch granted %d, lease %.2f s%s", bind, server.witness.highest, lease_s,
             ", CURVE (the dispatcher key only)" if credentials is not None else "")
    server.run(lambda: stopping)

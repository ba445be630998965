"""`conveyor witness`: the standby pair's third vote (docs/standby.md). No data: one integer on disk.

A loop around `standby.Witness`: each LEASE a dispatcher sends is granted or refused, and the highest
epoch granted is written (atomically, fsynced) before the grant goes out, so a restarted witness never
grants a lower epoch again. A witness that restarts grants nothing for a whole lease (it forgot whom it
granted one), as the state machine says.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from conveyor.cli.common import EXIT_USAGE, CliError, LogFormatOpt, LogLevelOpt, setup_logging


def witness(
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on (tcp://HOST:PORT).")] = "tcp://127.0.0.1:5557",
    state: Annotated[str, typer.Option(help="File holding the highest epoch granted.")] = "witness.epoch",
    failover_timeout: Annotated[
        float, typer.Option(help="The pair's --failover-timeout (the lease follows from it).")
    ] = 2.0,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a witness: a vote for a standby pair of dispatchers, so that at most one is active."""
    import logging

    import zmq

    from conveyor.cli.run import pair_timings
    from conveyor.dispatcher import standby as sb
    from conveyor.protocol import Cmd, ProtocolError, encode
    from conveyor.protocol import commands as c
    from conveyor.protocol.frames import split

    setup_logging(log_level, log_format)
    log = logging.getLogger("conveyor.witness")
    if not bind.startswith("tcp://"):
        raise CliError(f"--bind must be a tcp:// address, not {bind!r}", EXIT_USAGE)
    try:
        _, _, lease_s = pair_timings(failover_timeout)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    path = Path(state)
    try:
        highest = int(path.read_text().strip() or 0) if path.exists() else 0
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the witness state {path}: {exc}") from None
    w = sb.Witness(lease_s, time.monotonic(), highest)
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        raise CliError(f"cannot listen on {bind}: {exc}") from None
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    print(bind, flush=True)
    log.info("witness on %s, highest epoch granted %d, lease %.2f s", bind, highest, lease_s)
    try:
        while not stopping:
            if not sock.poll(200):
                continue
            parts = sock.recv_multipart()
            try:
                cmd, raw, _ = split(parts[1:])
                if cmd != Cmd.LEASE:
                    continue
                ask = c.decode_body(cmd, raw)
            except ProtocolError as exc:
                log.warning("dropped a malformed message: %s", exc)
                continue
            for action in w.handle(ask.node, sb.AskLease(ask.epoch, ask.ref), time.monotonic()):
                if isinstance(action, sb.PersistEpoch):
                    _persist(path, action.epoch)
                    log.info("lease for epoch %d granted to %s", action.epoch, ask.node)
                    continue
                granted = isinstance(action, sb.LeaseGranted)
                reply = c.LeaseReply(granted, ask.epoch, ask.ref, w.highest)
                sock.send_multipart([parts[0], *encode(Cmd.LEASE_REPLY, reply)])
    finally:
        sock.close(0)
        ctx.term()


def _persist(path: Path, epoch: int) -> None:
    """Write the epoch durably before the grant leaves (a new file, fsynced, renamed over the old)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{epoch}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)

#!/opt/conveyor/bin/python
"""Health checks of the Conveyor image, for Docker healthchecks and Kubernetes exec probes.

    conveyor-healthcheck dispatcher       healthy when the dispatcher in this container answers `status`, or
                                          (one of a standby pair, docs/standby.md) answers it with a redirect:
                                          a passive dispatcher is in a normal state
    conveyor-healthcheck worker           healthy when this container's worker is registered with its dispatcher
    conveyor-healthcheck worker --local   healthy when this container's worker loop wrote its health file
                                          (`conveyor worker --health-file PATH`) within --max-age seconds: it
                                          checks the worker itself and never asks the dispatcher, so it is the
                                          liveness probe (a dispatcher restart must not restart every worker)

Options (each falls back on the environment conveyor-entrypoint uses, as in docker-compose.yml):
    --address URL      the dispatcher [dispatcher: tcp://127.0.0.1:<port of CONVEYOR_BIND>; worker: CONVEYOR_DISPATCHER]
    --keys DIR         a key directory with a client pair and dispatcher.key [CONVEYOR_KEYS; none when
                       CONVEYOR_INSECURE is true]
    --timeout S        the whole check's budget in seconds [6]: keep it below the probe's timeoutSeconds
    --name NAME        the worker's name [CONVEYOR_NAME, else the container's hostname]
    --health-file P    --local: the worker's health file [CONVEYOR_HEALTH_FILE, else /tmp/conveyor-health]
    --max-age S        --local: oldest acceptable health file, in seconds [30]

Prints one line (`healthy: ...` or `unhealthy: ...`); exits 0 when healthy, 1 when not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

INSECURE_WORDS = ("1", "true", "yes", "on")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="conveyor-healthcheck", description="Conveyor health checks.")
    parser.add_argument("role", nargs="?", default="worker", choices=("dispatcher", "worker"))
    parser.add_argument("--local", action="store_true", help="worker: check the health file only")
    parser.add_argument("--address")
    parser.add_argument("--keys")
    parser.add_argument("--timeout", type=float, default=6.0)
    parser.add_argument("--name")
    parser.add_argument("--health-file", default=os.environ.get("CONVEYOR_HEALTH_FILE", "/tmp/conveyor-health"))
    parser.add_argument("--max-age", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.local and args.role != "worker":
        parser.error("--local checks a worker")
    if args.timeout <= 0 or args.max_age <= 0:
        parser.error("--timeout and --max-age must be positive")
    return args


def check_health_file(path: str, max_age_s: float) -> tuple[bool, str]:
    """Is the worker's own loop alive? Its health file holds the Unix time of its last beat."""
    try:
        with open(path) as f:
            text = f.read().strip()
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return False, f"no health file {path} (the worker has not started its loop, or runs without --health-file)"
    except OSError as exc:
        return False, f"cannot read {path}: {exc.strerror or exc}"
    try:
        written = float(text)
    except ValueError:
        written = mtime  # caught mid-write: the file's time says the same
    age_s = time.time() - written
    if age_s > max_age_s:
        return False, f"the worker loop last wrote {path} {age_s:.1f} s ago (more than {max_age_s:g} s)"
    return True, f"the worker loop wrote {path} {max(age_s, 0.0):.1f} s ago"


def ask_status(address: str, keys: str | None, timeout_s: float) -> dict[str, Any]:
    from conveyor import Client

    deadline = time.monotonic() + timeout_s
    with Client(address, connect_timeout=timeout_s / 2, reconnect_timeout=timeout_s / 2, keys=keys) as client:
        return client.status(timeout=max(0.5, deadline - time.monotonic()))  # type: ignore[no-any-return]


def probe_dispatcher(address: str, keys: str | None, timeout_s: float) -> tuple[bool, str]:
    """One STATUS on a socket of its own, not through a Client: a Client given one address waits for an
    active dispatcher, but a passive one of a standby pair answers every request with a REDIRECT, and is
    healthy too. (Asking is a client's vote for a takeover, as any client's is, in a pair without a
    witness; with one, only the witness's lease counts.)"""
    import zmq

    from conveyor.protocol import Cmd, encode
    from conveyor.protocol import commands as c
    from conveyor.protocol.frames import split
    from conveyor.security.keys import load_peer_credentials
    from conveyor.transport.sockets import configure_socket

    credentials = load_peer_credentials(keys, "client") if keys is not None else None
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        configure_socket(sock, credentials, 64 << 20)
        sock.connect(address)
        sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
        if not sock.poll(int(timeout_s * 1000)):
            return False, f"dispatcher {address}: no answer within {timeout_s:g} s"
        cmd, raw, _ = split(sock.recv_multipart())
        body = c.decode_body(cmd, raw)
    finally:
        sock.close()
    if cmd == Cmd.REDIRECT:
        active = f", the active: {body.active}" if body.active else ", no active heard"
        return True, f"passive (standby pair, epoch {body.epoch}{active})"
    if cmd == Cmd.STATUS_REPLY:
        pair = body.dispatcher.get("pair")
        about = f", {pair['state']} {pair['role']} in epoch {pair['epoch']}, {pair['replication']}" if pair else ""
        return True, f"{len(body.workers)} worker(s), {body.queued} queued{about}"
    return False, f"dispatcher {address}: answered {cmd.name} {body}"


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.local:
        ok, message = check_health_file(args.health_file, args.max_age)
        print(f"{'healthy' if ok else 'unhealthy'}: {message}")
        return 0 if ok else 1
    if args.address:
        address = args.address
    elif args.role == "dispatcher":
        port = os.environ.get("CONVEYOR_BIND", "tcp://0.0.0.0:5555").rsplit(":", 1)[-1]
        address = f"tcp://127.0.0.1:{port}"
    else:
        address = os.environ.get("CONVEYOR_DISPATCHER", "tcp://dispatcher:5555")
    keys = args.keys
    if os.environ.get("CONVEYOR_INSECURE", "false").lower() in INSECURE_WORDS:
        os.environ.pop("CONVEYOR_KEYS", None)
        keys = None
    elif keys is None:
        keys = os.environ.get("CONVEYOR_KEYS") or None
    if keys is None:
        os.environ.pop("CONVEYOR_KEYS", None)  # the Client would read it otherwise
    try:
        if args.role == "dispatcher":
            ok, message = probe_dispatcher(address, keys, args.timeout)
            print(f"{'healthy' if ok else 'unhealthy'}: {message}")
            return 0 if ok else 1
        status = ask_status(address, keys, args.timeout)
    except Exception as exc:
        print(f"unhealthy: dispatcher {address}: {type(exc).__name__}: {exc}")
        return 1
    name = args.name or os.environ.get("CONVEYOR_NAME")
    if not name:
        with open("/etc/hostname") as f:
            name = f.read().strip()
    mine = [w for w in status["workers"] if w["name"] == name]
    if not mine:
        print(f"unhealthy: worker {name} is not registered with {address}")
        return 1
    print(f"healthy: worker {name} {mine[0]['running']}/{mine[0]['concurrency']} busy")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

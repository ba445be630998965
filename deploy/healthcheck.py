#!/opt/conveyor/bin/python
"""Docker healthcheck of the Conveyor image.

    conveyor-healthcheck dispatcher   healthy when the dispatcher in this container answers `status`
    conveyor-healthcheck worker       healthy when this container's worker is registered with its dispatcher

It connects as a client: with the key directory in CONVEYOR_KEYS (its client pair), unless
CONVEYOR_INSECURE is true, as in conveyor-entrypoint.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    role = sys.argv[1] if len(sys.argv) > 1 else "worker"
    if role == "dispatcher":
        port = os.environ.get("CONVEYOR_BIND", "tcp://0.0.0.0:5555").rsplit(":", 1)[-1]
        address = f"tcp://127.0.0.1:{port}"
    else:
        address = os.environ.get("CONVEYOR_DISPATCHER", "tcp://dispatcher:5555")
    if os.environ.get("CONVEYOR_INSECURE", "false").lower() in ("1", "true", "yes", "on"):
        os.environ.pop("CONVEYOR_KEYS", None)
    from conveyor import Client

    try:
        with Client(address, connect_timeout=3, reconnect_timeout=3) as client:
            status = client.status(timeout=3)
    except Exception as exc:
        print(f"unhealthy: dispatcher {address}: {type(exc).__name__}: {exc}")
        return 1
    if role == "dispatcher":
        print(f"healthy: {len(status['workers'])} worker(s), {status['queued']} queued")
        return 0
    with open("/etc/hostname") as f:
        name = os.environ.get("CONVEYOR_NAME") or f.read().strip()
    mine = [w for w in status["workers"] if w["name"] == name]
    if not mine:
        print(f"unhealthy: worker {name} is not registered with {address}")
        return 1
    print(f"healthy: worker {name} {mine[0]['running']}/{mine[0]['concurrency']} busy")
    return 0


if __name__ == "__main__":
    sys.exit(main())

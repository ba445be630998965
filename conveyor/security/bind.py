"""Safe by default: the dispatcher refuses a non-loopback address without keys unless told `insecure`.

docs/security.md explains the model; the key files are `keys.py`, the dispatcher's side of access
control (ZAP handler, roles, revocation, quarantine) is `conveyor/dispatcher/access.py`.
"""

from __future__ import annotations

import ipaddress

from conveyor.errors import InsecureBindError

ENV_INSECURE = "CONVEYOR_INSECURE"

def is_loopback(address: str) -> bool:
    """True for inproc://, ipc:// and tcp:// on 127.0.0.0/8, ::1 or localhost; False for anything else."""
    if address.startswith(("inproc://", "ipc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://") :].rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: reachable from elsewhere
        return False


def insecure_bind_message(address: str) -> str:
    return (
        f"refusing to listen on {address} without keys: anyone who can reach it could run code on your workers. "
        "Create keys with `conveyor keys init DIR` and pass --keys DIR (or set CONVEYOR_KEYS=DIR), "
        "or pass --insecure to accept unauthenticated, unencrypted connections anyway"
    )


def insecure_warning(address: str) -> str:
    return (
        f"warning: --insecure: {address} accepts unauthenticated, unencrypted connections; anyone who can "
        "reach it can submit tasks (run code on every worker), register as a worker and read results"
    )


def check_bind(address: str, has_keys: bool, insecure: bool) -> None:
    """Raise InsecureBindError for a non-loopback address without keys, unless insecure."""
    if not has_keys and not insecure and not is_loopback(address):
        raise InsecureBindError(insecure_bind_message(address))

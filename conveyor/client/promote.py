"""Promote one dispatcher of a standby pair to active (`conveyor dispatcher promote`, docs/standby.md).

Not through `Client`: a client follows the active dispatcher, and this must speak to one dispatcher in
particular, the passive one, which answers nothing else but REDIRECT. One DEALER socket: PROMOTE, its
PROMOTE_REPLY, then STATUS every so often until that dispatcher answers it as the active one.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import zmq

from conveyor.errors import DispatcherRefused, DispatcherUnavailable
from conveyor.protocol import Cmd, encode
from conveyor.protocol.frames import split, unpack
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.security.keys import load_peer_credentials
from conveyor.transport.sockets import configure_socket, send_parts

ASK_EVERY_S = 0.2  # STATUS while waiting for the promoted dispatcher to activate


def promote(
    address: str, *, force: bool = False, keys: str | os.PathLike[str] | None = None, timeout_s: float = 15.0
) -> dict[str, Any]:
    """Ask the dispatcher at `address` to become the pair's active one and wait until it is: its pair
    status (role, epoch, ...). DispatcherRefused if it will not (not a pair, a journal behind the active's
    without `force`); DispatcherUnavailable if it does not answer, or is not active within timeout_s."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, f"c-{uuid.uuid4().hex[:20]}".encode())
    credentials = load_peer_credentials(keys, "client") if keys is not None else None
    configure_socket(sock, credentials, DEFAULT_MAX_MESSAGE_SIZE)
    deadline = time.monotonic() + timeout_s
    try:
        sock.connect(address)
        send_parts(sock, encode(Cmd.PROMOTE, {"force": force, "req": 1}))
        reply = _wait_for(sock, Cmd.PROMOTE_REPLY, deadline)
        if reply is None:
            raise DispatcherUnavailable(f"the dispatcher at {address} did not answer within {timeout_s:g} s")
        if not reply.get("ok"):
            raise DispatcherRefused(f"the dispatcher at {address} refused: {reply.get('message')}")
        while True:  # promoting: the active yields first (and, with a witness, its lease runs out)
            send_parts(sock, encode(Cmd.STATUS, {"req": 2}))
            status = _wait_for(sock, Cmd.STATUS_REPLY, min(deadline, time.monotonic() + ASK_EVERY_S))
            pair = (status or {}).get("dispatcher", {}).get("pair") or {}
            if pair.get("state") == "active":
                return dict(pair)
            if time.monotonic() >= deadline:
                raise DispatcherUnavailable(
                    f"the dispatcher at {address} accepted the promotion ({reply.get('message')}) but was not "
                    f"active within {timeout_s:g} s; see its log")
            time.sleep(ASK_EVERY_S)
    finally:
        sock.close(0)


def _wait_for(sock: zmq.Socket[Any], want: Cmd, deadline: float) -> dict[str, Any] | None:
    """The body of the next `want` message (others, such as REDIRECT, are skipped), or None at the deadline."""
    while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        if not sock.poll(left_ms):
            return None
        cmd, raw, _ = split(sock.recv_multipart())
        if cmd == want:
            body = unpack(raw)
            return body if isinstance(body, dict) else {}
    return None

"""Sending a multipart message on a plain (synchronous) ZeroMQ socket, cheaply.

pyzmq's `send_multipart` does enum flag arithmetic for every part and, with `copy=False`, builds a
zero-copy frame even for a few bytes; both show in profiles of the dispatcher and the client. Here the
flags are plain integers, small parts are copied into the message (as pyzmq itself would below
`zmq.COPY_THRESHOLD`), and large ones (payloads, frames received earlier) are sent without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

from conveyor.security.keys import PeerCredentials

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_COPY_BELOW = zmq.COPY_THRESHOLD


def send_parts(sock: zmq.Socket[Any], parts: Sequence[Any], flags: int = 0) -> None:
    """Send parts as one message; flags (e.g. NOBLOCK) apply to every part."""
    more = _SNDMORE | flags
    last = len(parts) - 1
    send = sock.send
    for i, part in enumerate(parts):
        small = type(part) is bytes and len(part) < _COPY_BELOW
        send(part, more if i < last else flags, copy=small)


def configure_socket(sock: zmq.Socket[Any], credentials: PeerCredentials | None, max_message_size: int) -> None:
    """Before connect: bound inbound frames, and with keys, CurveZMQ (the dispatcher's key is checked)."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    if credentials is not None:
        sock.setsockopt(zmq.CURVE_SECRETKEY, credentials.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, credentials.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, credentials.server_public)

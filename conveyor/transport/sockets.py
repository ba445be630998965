"""Sending a multipart message on a plain (synchronous) ZeroMQ socket, cheaply.

pyzmq's `send_multipart` does enum flag arithmetic for every part and, with `copy=False`, builds a
zero-copy frame even for a few bytes; both show in profiles of the dispatcher and the client. Here the
flags are plain integers, small parts are copied into the message (as pyzmq itself would below
`zmq.COPY_THRESHOLD`), and large ones (payloads, frames received earlier) are sent without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import zmq

from conveyor.security.keys import PeerCredentials

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_COPY_BELOW = zmq.COPY_THRESHOLD
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
MAX_KEEPALIVE_PROBES = 127  # the most TCP_KEEPCNT Linux accepts


def has_message(sock: zmq.Socket[Any]) -> bool:
    """Whether a message is waiting (ZMQ_EVENTS; this also takes in the socket's pending commands).

    A loop that sleeps on ZMQ_FD must ask this before it sleeps, and after each send: the descriptor is
    edge-triggered, and any operation on the socket may take in the signal of a message that arrived.
    """
    return bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)


def recv_waiting(sock: zmq.Socket[Any]) -> list[Any] | None:
    """The parts of the next message waiting (zero-copy frames), or None if none is; never blocks.

    recv_multipart without its RCVMORE getsockopt per part, and ZMQ_EVENTS rather than a raised
    zmq.Again to find the end: a third of the cost per message."""
    if not has_message(sock):
        return None
    frame = sock.recv(NOBLOCK, copy=False)
    parts = [frame]
    while frame.more:  # the rest of a multipart message is always there
        frame = sock.recv(NOBLOCK, copy=False)
        parts.append(frame)
    return parts


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


def keep_links_alive(sock: zmq.Socket[Any], timeout_s: float) -> None:
    """Before bind or connect: the kernel closes a TCP connection whose peer is gone without a FIN or
    RST (a cut link, a host that vanished, a NAT that forgot it) within about timeout_s, and libzmq
    then reconnects. TCP keepalive probes an idle connection; TCP_USER_TIMEOUT (ZMQ_TCP_MAXRT) bounds
    how long sent data may stay unacknowledged, and on Linux how long probes may go unanswered.

    Not ZMTP heartbeats (ZMQ_HEARTBEAT_IVL): with them, libzmq 4.3.5 aborts the whole process
    ("Assertion failed: !_io_error (src/stream_engine_base.cpp:310)", zeromq/libzmq#4364) when a
    heartbeat falls due on a connection whose input had stopped, as when a reconnecting peer's new
    connection hands its routing id over from the old one. The dispatcher died of it under load in CI.
    Liveness of the peer itself is the application's heartbeats (docs/protocol.md); this only makes
    dead TCP connections go away."""
    timeout_s = max(5.0, timeout_s)  # a slow, lossy link retransmits for seconds and is still alive
    timeout_ms = int(timeout_s * 1000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, int(timeout_s / 3)))  # seconds, as the kernel counts
    # Probes a second apart, as many as fit in timeout_s; Linux takes at most 127 (TCP_KEEPCNT), and
    # libzmq fails the connection on a value it refuses: beyond that, the probes are spaced out.
    probes = max(1, min(MAX_KEEPALIVE_PROBES, int(timeout_s)))
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, math.ceil(timeout_s / probes)))
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, probes)
    sock.setsockopt(zmq.TCP_MAXRT, timeout_ms)

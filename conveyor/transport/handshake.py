"""A DEALER's handshake, watched: a key the dispatcher refuses, or a keys/no-keys mismatch, ends in a clear
`AccessDenied` instead of a silent wait (such peers never exchange a single message with the dispatcher).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import zmq

from conveyor.errors import AccessDenied
from conveyor.security.keys import PeerCredentials

log = logging.getLogger("conveyor.security")

HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
)
VAGUE_FAILURES = 3  # a handshake that fails without a reason this many times in a row is reported


class HandshakeWatch:
    """A monitor on one DEALER that turns handshake failures into an AccessDenied with a clear message,
    and counts the handshakes that succeeded: one after the first means a new TCP connection (the old
    one broke, and whatever ZeroMQ had queued on it may be lost; the client then asks again).

    The monitor's PAIR socket is a plain (synchronous) socket even for an asyncio DEALER, so that
    `failure()` can be called anywhere without awaiting. Call `close()` before closing the DEALER.
    """

    def __init__(self, sock: zmq.Socket[Any], address: str, credentials: PeerCredentials | None, role: str):
        self.address = address
        self.credentials = credentials
        self.role = role
        self._sock: zmq.Socket[Any] | None = sock
        endpoint = f"inproc://conveyor-monitor-{uuid.uuid4().hex}"
        sock.monitor(endpoint, HANDSHAKE_EVENTS)
        self._ctx: zmq.Context[Any] = zmq.Context.shadow(sock.context.underlying)
        self.socket: zmq.Socket[Any] = self._ctx.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self._last_log = 0.0
        self._vague = 0  # failures in a row without a reason (a connection cut during a handshake is one)
        self._succeeded = False  # a handshake succeeded once: vague failures since are a restart, not our keys
        self._definite: AccessDenied | None = None
        self.handshakes = 0  # succeeded so far, as seen by failure(): one after the first is a new TCP connection

    def failure(self) -> AccessDenied | None:
        """The handshake failure reported since the last call, as an exception (None if none).

        A refused key (ZAP) and a keys/no-keys mismatch count at once; a failure without a reason (a
        wrong dispatcher public key looks like that) only after VAGUE_FAILURES in a row, since a
        dispatcher that stops in the middle of a handshake causes one too. Every successful handshake
        read here adds one to `handshakes`.
        """
        from zmq.utils.monitor import parse_monitor_message

        found: AccessDenied | None = None
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again: nothing more
                return found
            try:
                event = parse_monitor_message(parts)
            except Exception:
                continue
            kind, value = int(event["event"]), int(event["value"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
                self._vague, self._definite, found = 0, None, None
                self._succeeded = True
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH or (
                kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
            ):
                self._definite = found = self._explain(kind, value)
            else:  # the other side may close first: a mismatch can also look like this
                self._vague += 1
                if self._definite is not None:
                    found = self._definite
                elif self._vague >= VAGUE_FAILURES and not self._succeeded:
                    # Once a handshake succeeded, these keys were right: failures without a reason are a
                    # dispatcher restarting behind a proxy that accepts first (docker-proxy, port-forward).
                    found = self._explain(kind, value)

    def log_failure(self, every: float = 10.0) -> AccessDenied | None:
        """failure(), also logged as one error line (at most once per `every` seconds)."""
        exc = self.failure()
        now = time.monotonic()
        if exc is not None and now - self._last_log >= every:
            self._last_log = now
            log.error("%s", exc)
        return exc

    def _explain(self, event: int, value: int) -> AccessDenied:
        where = f"the dispatcher at {self.address}"
        keys = self.credentials
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            name = f" ({keys.directory}/{self.role}.key_secret)" if keys else ""
            return AccessDenied(
                f"{where} refused this {self.role}'s key{name}: it is not among its authorized {self.role} keys "
                f"(or it was revoked); authorize it with `conveyor keys add-{self.role} DIR NAME --public-key FILE`"
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if keys is None:
                return AccessDenied(
                    f"{where} requires keys (CurveZMQ): pass --keys DIR or set CONVEYOR_KEYS=DIR "
                    f"(a directory holding {self.role}.key_secret and dispatcher.key)"
                )
            return AccessDenied(f"{where} does not use keys, but this {self.role} does (--keys / CONVEYOR_KEYS)")
        if keys is None:
            return AccessDenied(
                f"{where} keeps failing the handshake: it probably requires keys (CurveZMQ): pass --keys DIR or "
                f"set CONVEYOR_KEYS=DIR (a directory holding {self.role}.key_secret and dispatcher.key)"
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return AccessDenied(f"the CurveZMQ handshake with {where} failed (protocol error 0x{value:x})")
        return AccessDenied(
            f"the CurveZMQ handshake with {where} failed: is {keys.directory if keys else 'DIR'}/dispatcher.key "
            "the public key of that dispatcher?"
        )

    def close(self) -> None:
        if self._sock is not None and not self._sock.closed:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self._sock = None
        self.socket.close(linger=0)


def watch_handshakes(
    sock: zmq.Socket[Any], address: str, credentials: PeerCredentials | None, role: str
) -> HandshakeWatch | None:
    """A HandshakeWatch, or None where the transport has no handshake to watch (inproc)."""
    if address.startswith("inproc://"):
        return None
    return HandshakeWatch(sock, address, credentials, role)

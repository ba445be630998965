"""Security pieces shared by the dispatcher, workers and clients (docs/security.md explains the model).

- `check_bind`: the dispatcher refuses a non-loopback address without keys unless told `insecure`.
- `configure_socket`: CurveZMQ client keys and ZMQ_MAXMSGSIZE on a worker's or client's DEALER.
- `HandshakeWatch`: reads a DEALER's handshake failures (a ZeroMQ socket monitor), so that a key the
  dispatcher does not accept, or a keys/no-keys mismatch, ends in a clear `AccessDenied` instead of
  a silent wait: such peers never get to exchange a single message with the dispatcher.
- `oversized` / `fit_outcome`: frames larger than the peers' ZMQ_MAXMSGSIZE are refused before
  sending, because a receiver drops the whole connection on such a frame.

The dispatcher's side (ZAP handler, roles, revocation, quarantine) is `conveyor/dispatcher/access.py`.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from conveyor.errors import AccessDenied, InsecureBindError
from conveyor.keys import PeerCredentials
from conveyor.protocol import errors as perr

log = logging.getLogger("conveyor.security")

DEFAULT_MAX_MESSAGE_SIZE = 512 * 1024 * 1024  # ZMQ_MAXMSGSIZE: the largest single frame a socket accepts
ENV_INSECURE = "CONVEYOR_INSECURE"

HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
)
VAGUE_FAILURES = 3  # a handshake that fails without a reason this many times in a row is reported


# --- binding --------------------------------------------------------------------------------------


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


# --- worker and client sockets ----------------------------------------------------------------------


def configure_socket(sock: zmq.Socket[Any], credentials: PeerCredentials | None, max_message_size: int) -> None:
    """Before connect: bound inbound frames, and with keys, CurveZMQ (the dispatcher's key is checked)."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    if credentials is not None:
        sock.setsockopt(zmq.CURVE_SECRETKEY, credentials.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, credentials.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, credentials.server_public)


class HandshakeWatch:
    """A monitor on one DEALER that turns handshake failures into an AccessDenied with a clear message.

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
        self._definite: AccessDenied | None = None

    def failure(self) -> AccessDenied | None:
        """The handshake failure reported since the last call, as an exception (None if none).

        A refused key (ZAP) and a keys/no-keys mismatch count at once; a failure without a reason (a
        wrong dispatcher public key looks like that) only after VAGUE_FAILURES in a row, since a
        dispatcher that stops in the middle of a handshake causes one too.
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
                self._vague, self._definite, found = 0, None, None
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH or (
                kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
            ):
                self._definite = found = self._explain(kind, value)
            else:  # the other side may close first: a mismatch can also look like this
                self._vague += 1
                if self._definite is not None:
                    found = self._definite
                elif self._vague >= VAGUE_FAILURES:
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


# --- sizes --------------------------------------------------------------------------------------------


def oversized(frames: Sequence[Any], limit: int) -> int | None:
    """The size of the first frame larger than `limit` bytes, or None."""
    for frame in frames:
        n = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
        if n > limit:
            return n
    return None


def check_frames(frames: Sequence[Any], limit: int, what: str = "the task's call") -> None:
    """Raise ValueError if a frame would make the dispatcher drop the connection (ZMQ_MAXMSGSIZE)."""
    n = oversized(frames, limit)
    if n is not None:
        raise ValueError(
            f"{what} has a frame of {n} bytes, over the {limit}-byte max_message_size of Conveyor's sockets "
            "(raise it on the dispatcher, workers and clients alike, e.g. --max-message-mib)"
        )


def fit_outcome(outcome: Any, limit: int) -> Any:
    """A worker's Outcome whose frames fit the limit: itself, or a failure saying the result is too large."""
    n = oversized(outcome.frames, limit) if outcome.frames else None
    if n is None:
        return outcome
    from conveyor.worker.execution import Outcome

    message = (
        f"the result has a frame of {n} bytes, over the {limit}-byte max_message_size "
        "(raise it on the dispatcher, workers and clients alike)"
    )
    return Outcome(outcome.job_id, outcome.attempt, False, perr.error_info(perr.EXCEPTION, "ValueError", message))

"""The witness's socket loop: the standby pair's third vote (docs/standby.md). No data: one integer on disk.

A loop around `standby.Witness`: each LEASE a dispatcher sends is granted or refused, and the highest
epoch granted is written (atomically, fsynced) before the grant goes out, so a restarted witness never
grants a lower epoch again. A witness that restarts grants nothing for a whole lease (it forgot whom it
granted one), as the state machine says. With keys, the witness is a CURVE server on the dispatcher key
pair and accepts only that key: a lease request from anything but one of the pair's dispatchers is
refused at the handshake.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from conveyor.dispatcher import standby as sb
from conveyor.dispatcher.pair import ZAP_ENDPOINT, answer_zap
from conveyor.protocol import Cmd, ProtocolError, encode
from conveyor.protocol import commands as c
from conveyor.protocol.frames import split
from conveyor.security.keys import DispatcherCredentials

log = logging.getLogger("conveyor.witness")
POLL_MS = 200  # how often `stopping()` is asked


def read_state(path: Path) -> int:
    """The highest epoch granted, as persisted (0: none yet). OSError or ValueError if unreadable."""
    return int(path.read_text().strip() or 0) if path.exists() else 0


class WitnessServer:
    """Owns the witness's sockets; `run(stopping)` serves until `stopping()` is true, then closes them."""

    def __init__(self, bind: str, state: Path, lease_s: float, credentials: DispatcherCredentials | None = None):
        """Binds at once (zmq.ZMQError if the address is taken); reads the state (OSError, ValueError)."""
        self.state = state
        self.witness = sb.Witness(lease_s, time.monotonic(), read_state(state))
        self._credentials = credentials
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._zap: zmq.Socket[Any] | None = None
        self.sock: zmq.Socket[Any] = self._ctx.socket(zmq.ROUTER)
        try:
            self.sock.setsockopt(zmq.LINGER, 0)
            if credentials is not None:
                self._zap = self._ctx.socket(zmq.REP)
                self._zap.bind(ZAP_ENDPOINT)
                self.sock.setsockopt(zmq.CURVE_SERVER, 1)
                self.sock.setsockopt(zmq.CURVE_SECRETKEY, credentials.secret)
                self.sock.setsockopt(zmq.ZAP_DOMAIN, b"conveyor-witness")
            self.sock.bind(bind)
        except BaseException:
            self.close()
            raise

    def run(self, stopping: Callable[[], bool]) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap, zmq.POLLIN)
        try:
            while not stopping():
                ready = dict(poller.poll(POLL_MS))
                if self._zap is not None and self._zap in ready:
                    assert self._credentials is not None
                    answer_zap(self._zap, self._credentials.public, "witness")
                if self.sock in ready:
                    self._serve(self.sock.recv_multipart())
        finally:
            self.close()

    def _serve(self, parts: list[bytes]) -> None:
        try:
            cmd, raw, _ = split(parts[1:])
            if cmd != Cmd.LEASE:
                return
            ask = c.decode_body(cmd, raw)
        except ProtocolError as exc:
            log.warning("dropped a malformed message: %s", exc)
            return
        w = self.witness
        for action in w.handle(ask.node, sb.AskLease(ask.epoch, ask.ref), time.monotonic()):
            if isinstance(action, sb.PersistEpoch):
                persist(self.state, action.epoch)
                log.info("lease for epoch %d granted to %s", action.epoch, ask.node)
                continue
            granted = isinstance(action, sb.LeaseGranted)
            reply = c.LeaseReply(granted, ask.epoch, ask.ref, w.highest)
            self.sock.send_multipart([parts[0], *encode(Cmd.LEASE_REPLY, reply)])

    def close(self) -> None:
        for sock in (self.sock, self._zap):
            if sock is not None:
                sock.close(0)
        self._zap = None
        self._ctx.term()


def persist(path: Path, epoch: int) -> None:
    """Write the epoch durably before the grant leaves (a new file, fsynced, renamed over the old)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{epoch}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)

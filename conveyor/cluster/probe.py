"""Asking one dispatcher of a standby pair, and only that one, whether it is active (`cluster status`).

A Client given both addresses follows the active one, which is what jobs need; `cluster status` needs
each dispatcher's own answer: one STATUS on a socket of its own, never redirected. An active one
answers with its status (its epoch in the command frame), a passive one with a REDIRECT (its highest
epoch, and the active's address if it hears one). Asking a passive dispatcher is a client's vote, as
for any client (docs/standby.md): it matters only once the active has been silent for the failover
timeout, when a client would vote the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq

from conveyor.protocol import Cmd, decode, encode
from conveyor.protocol.frames import frame_epoch
from conveyor.transport.sockets import configure_socket

MAX_REPLY = 64 << 20  # a status reply of a large cluster stays far below this


@dataclass
class Answer:
    """One dispatcher's answer: active (with its status) or passive, or why there is none."""

    address: str
    state: str | None  # "active", "passive", or None: no answer
    epoch: int = 0
    status: dict[str, Any] | None = None  # an active one's STATUS_REPLY
    redirects_to: str = ""  # a passive one: the active it hears ("" if none)
    problem: str = ""  # no answer: why

    def summary(self) -> str:
        """'active in epoch 3, replication in-sync' / 'passive in epoch 3 (hears the active at ...)'."""
        if self.state == "active":
            pair = (self.status or {}).get("dispatcher", {}).get("pair", {})
            return f"active in epoch {self.epoch}, replication {pair.get('replication', '?')}"
        if self.state == "passive":
            hears = f"hears the active at {self.redirects_to}" if self.redirects_to else "hears no active"
            return f"passive in epoch {self.epoch} ({hears})"
        return f"does not answer from here ({self.problem})"

    def as_json(self) -> dict[str, Any]:
        return {"address": self.address, "state": self.state, "epoch": self.epoch,
                "redirects_to": self.redirects_to or None, "problem": self.problem or None}


def ask(address: str, keys: str | None, timeout: float = 5.0) -> Answer:
    """Send one STATUS to the dispatcher at `address` (with a client key directory when it uses keys)."""
    credentials = None
    try:
        if keys is not None:
            from conveyor.security.keys import load_peer_credentials

            credentials = load_peer_credentials(keys, "client")
    except Exception as exc:  # KeysError, OSError: the same one line for every dispatcher
        return Answer(address, None, problem=f"{type(exc).__name__}: {exc}")
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        configure_socket(sock, credentials, MAX_REPLY)
        sock.connect(address)
        sock.send_multipart(encode(Cmd.STATUS, {"req": 1}))
        if not sock.poll(int(timeout * 1000)):
            return Answer(address, None, problem=f"no answer within {timeout:g} s")
        parts = sock.recv_multipart()
        message = decode(parts)
    except Exception as exc:  # a bad address, a malformed answer: say so on its line
        return Answer(address, None, problem=f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
    body = message.body if isinstance(message.body, dict) else {}
    if message.cmd == Cmd.REDIRECT:
        return Answer(address, "passive", int(body.get("epoch", 0)), redirects_to=str(body.get("active", "")))
    if message.cmd == Cmd.STATUS_REPLY:
        body.pop("req", None)
        return Answer(address, "active", frame_epoch(parts[1]), status=body)
    return Answer(address, None, problem=f"answered {message.cmd.name}")

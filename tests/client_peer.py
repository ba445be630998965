"""A scripted dispatcher for client tests: a bare ROUTER socket that speaks just enough of the protocol
(WELCOME to HELLO, HEARTBEAT to pings) and lets a test send exactly the message it wants (a JOB_DONE
with a gap in its numbers, an ACCEPTED that refuses a job) and read what the real client sends back.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import zmq

from conveyor.protocol import Cmd, encode
from conveyor.protocol.frames import split, unpack

INSTANCE = "scripted"


class Received:
    __slots__ = ("body", "cmd", "frames", "peer")

    def __init__(self, peer: bytes, cmd: Cmd, body: Any, frames: list[Any]):
        self.peer, self.cmd, self.body, self.frames = peer, cmd, body, frames

    def __repr__(self) -> str:
        return f"<{self.cmd.name} {self.body!r}>"


class ScriptedDispatcher:
    """`address` to connect a Client to; `expect(cmd)` returns the next message of that command (others
    are kept, in order, in `received`); `send(cmd, body)` sends to the last client heard from."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._inbox: queue.Queue[Received] = queue.Queue()
        self._out: queue.Queue[tuple[Cmd, Any, list[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.peer: bytes | None = None
        self.address = ""
        self._thread = threading.Thread(target=self._run, name="scripted-dispatcher", daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._ready.set()
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        cmd, body, frames = self._out.get_nowait()
                    except queue.Empty:
                        break
                    assert self.peer is not None, "no client connected yet"
                    sock.send_multipart([self.peer, *encode(cmd, body, frames)])
                if not sock.poll(10):
                    continue
                peer, *parts = sock.recv_multipart()
                cmd, raw, frames = split(parts)
                body = unpack(raw)
                self.peer = peer
                if cmd == Cmd.HELLO:
                    sock.send_multipart([peer, *encode(Cmd.WELCOME, {"instance": INSTANCE, "heartbeat_interval": 1.0,
                                                                      "req": None})])
                elif cmd == Cmd.HEARTBEAT:
                    sock.send_multipart([peer, *encode(Cmd.HEARTBEAT, {"role": "dispatcher", "instance": INSTANCE})])
                else:
                    self._inbox.put(Received(peer, cmd, body, frames))
        finally:
            sock.close(0)
            ctx.term()

    def send(self, cmd: Cmd, body: Any, frames: list[Any] | None = None) -> None:
        self._out.put((cmd, body, frames or []))

    def expect(self, cmd: Cmd, timeout: float = 10.0) -> Received:
        """The next message of this command (messages of other commands are only recorded)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {cmd.name} within {timeout} s; got {self.received}")
            try:
                msg = self._inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            self.received.append(msg)
            if msg.cmd == cmd:
                return msg

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

"""A TCP proxy on 127.0.0.1 that breaks connections the way networks do, for tests of broken links.

    with ResetProxy("127.0.0.1", dispatcher_port) as proxy:
        worker connects to proxy.address ...
        proxy.reset()      # every current connection gets a TCP RST on both sides (a NAT box, a conntrack flush)
        proxy.hold()       # bytes stop flowing both ways, connections stay open (a cut link)
        proxy.release()    # they flow again; what was held is delivered, as TCP would after a cut
        proxy.refuse(True) # new connections are reset at once (the link is still down)

Real sockets and real resets (SO_LINGER 0 makes close() send RST), no mocks. The network-namespace
tests (tests/test_link_faults.py) do the same with iptables on real hosts; this proxy gives the same
faults in a plain test on one host.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from types import TracebackType


class ResetProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.address = f"tcp://{listen_host}:{self.port}"
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held = False
        self._refusing = False
        self.resets = 0  # connections reset so far
        self.accepted = 0  # connections accepted so far
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reset-proxy", daemon=True)
        self._thread.start()

    # --- faults -------------------------------------------------------------------------------------

    def reset(self) -> int:
        """Reset every current connection (RST both ways); returns how many were reset."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            for a, b in pairs:
                _rst(a)
                _rst(b)
            self.resets += len(pairs)
        self._wake()
        return len(pairs)

    def hold(self) -> None:
        """Stop forwarding in both directions; connections stay open, bytes wait (a cut link)."""
        self._held = True
        self._wake()

    def release(self) -> None:
        self._held = False
        self._wake()

    def refuse(self, on: bool = True) -> None:
        """While on, every new connection is reset at once."""
        self._refusing = on

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # --- the loop -----------------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            while not self._stopping:
                for key in list(sel.get_map().values()):
                    sel.unregister(key.fileobj)
                sel.register(self._listener, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                with self._lock:
                    pairs = list(self._pairs)
                if not self._held:
                    for a, b in pairs:
                        sel.register(a, selectors.EVENT_READ, (a, b))
                        sel.register(b, selectors.EVENT_READ, (b, a))
                for key, _ in sel.select(0.5):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        src, dst = key.data
                        self._forward(src, dst)
        finally:
            sel.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        self.accepted += 1
        if self._refusing:
            _rst(conn)
            with self._lock:
                self.resets += 1
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _rst(conn)
            return
        for s in (conn, upstream):
            s.setblocking(True)
            s.settimeout(5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append((conn, upstream))

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            data = src.recv(1 << 16)
            if data:
                dst.sendall(data)
                return
        except OSError:
            pass
        with self._lock:  # one side closed or failed: close the pair as a network would
            for pair in self._pairs:
                if src in pair:
                    self._pairs.remove(pair)
                    for s in pair:
                        _rst(s)
                    break

    def close(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(5)
        self.reset()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> ResetProxy:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _rst(s: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER on, 0 seconds)."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass

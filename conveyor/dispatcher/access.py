"""Who may talk to the dispatcher, and what they may say: CurveZMQ + ZAP, roles, revocation, quarantine.

The dispatcher's loop owns one `Gate` and asks it about every message:

- **Handshake (ZAP).** With keys, the ROUTER is a CurveZMQ server and the Gate is its ZAP handler, a
  ROUTER socket on `inproc://zeromq.zap.01` served from the dispatcher's own poll loop (no thread).
  It accepts a connection only if the peer's public key is a file in `authorized/workers/` or
  `authorized/clients/` (re-read on every handshake when anything there changed), and names the
  connection with a ZAP User-Id `"<role>:<name>:<key>"` that libzmq attaches to every message.
- **Roles.** `screen()` reads the User-Id of each message (`frame.get("User-Id")`) and returns the
  commands that key may send: worker commands for worker keys, client commands for client keys
  (HEARTBEAT for both). The dispatcher answers anything else with ERROR `forbidden`.
- **Revocation.** Removing a key file refuses new connections at once. Live connections stay open
  in libzmq, so `tick()` (every heartbeat) re-reads the directories and returns the peers whose key
  is gone; the dispatcher drops their state, tells them ERROR `forbidden` once, sends them nothing
  more and drops whatever they send, unread.
- **Quarantine.** A peer that sends `malformed_limit` malformed messages within `malformed_window`
  seconds is ignored for `ban_seconds`: its messages are dropped unread and nothing is sent to it
  (with keys, its key is also refused new connections). A ROUTER cannot close one connection, so
  this is what "disconnected" means here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from conveyor.errors import KeysError
from conveyor.protocol import Cmd
from conveyor.security.keys import PUBLIC_SUFFIX, ROLES, DispatcherCredentials, authorized_dir, read_public_key

log = logging.getLogger("conveyor.dispatcher")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"conveyor"
# Roles follow the command code ranges of docs/protocol.md §4: 0x01-0x0f are sent by workers,
# 0x20-0x2f by clients; HEARTBEAT (0x40) by both.
WORKER_COMMANDS = frozenset(c for c in Cmd if 0x01 <= c <= 0x0F) | {Cmd.HEARTBEAT}
CLIENT_COMMANDS = frozenset(c for c in Cmd if 0x20 <= c <= 0x2F) | {Cmd.HEARTBEAT}
ANY_COMMAND = WORKER_COMMANDS | CLIENT_COMMANDS  # returned by identity when nothing is restricted
NO_COMMAND: frozenset[Cmd] = frozenset()
REFUSAL_INTERVAL = 1.0  # at most one ERROR per peer per second
REVOKED_BLOCK = 3600.0  # how long the routing id of a revoked peer stays blocked
BIND_GENERATION = 300.0  # seconds; a routing id silent for 2 generations is forgotten


@dataclass(frozen=True, slots=True)
class Principal:
    """An authorized key: its name (the file's), its roles and what it may send."""

    user_id: str
    name: str
    roles: frozenset[str]
    commands: frozenset[Cmd]

    @property
    def label(self) -> str:
        return f"{'+'.join(sorted(self.roles))} key {self.name!r}"


class AuthorizedKeys:
    """The public keys in DIR/authorized/{workers,clients}/, reloaded whenever a file there changes."""

    def __init__(self, root: Path):
        self.root = root
        self.by_key: dict[bytes, Principal] = {}
        self.by_user_id: dict[str, Principal] = {}
        self._signature: tuple[Any, ...] | None = None
        self.counts = {role: 0 for role in ROLES}
        self.generation = 0  # +1 whenever the set of keys changes (whoever noticed it first)

    def _scan(self) -> tuple[Any, ...]:
        entries: list[tuple[Any, ...]] = []
        for role in ROLES:
            folder = authorized_dir(self.root, role)
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        if entry.name.endswith(PUBLIC_SUFFIX):
                            try:
                                st = entry.stat()
                            except OSError:
                                continue
                            entries.append((role, entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                entries.append((role, None))
        return tuple(sorted(entries, key=repr))

    def refresh(self) -> bool:
        """Re-read the directories if anything in them changed; True if the set of keys changed."""
        signature = self._scan()
        if signature == self._signature:
            return False
        self._signature = signature
        found: dict[bytes, tuple[str, set[str]]] = {}
        for role in ROLES:
            folder = authorized_dir(self.root, role)
            for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")) if folder.is_dir() else []:
                try:
                    key = read_public_key(path)
                except KeysError as exc:
                    log.warning("ignoring %s", exc)
                    continue
                name, roles = found.setdefault(key, (path.name[: -len(PUBLIC_SUFFIX)], set()))
                roles.add(role)
        by_key = {}
        for key, (name, roles) in found.items():
            commands = (WORKER_COMMANDS if "worker" in roles else NO_COMMAND) | (
                CLIENT_COMMANDS if "client" in roles else NO_COMMAND
            )
            user_id = f"{'+'.join(sorted(roles))}:{name}:{key.decode()}"
            by_key[key] = Principal(user_id, name, frozenset(roles), commands)
        changed = set(by_key) != set(self.by_key) or any(by_key[k] != self.by_key[k] for k in by_key)
        self.by_key = by_key
        self.by_user_id = {p.user_id: p for p in by_key.values()}
        self.counts = {role: sum(1 for p in by_key.values() if role in p.roles) for role in ROLES}
        if changed:
            self.generation += 1
            log.info(
                "authorized keys: %d worker(s), %d client(s) in %s",
                self.counts["worker"], self.counts["client"], self.root / "authorized",
            )
        return changed


class Gate:
    """The dispatcher's access control; see the module docstring. Not thread-safe: the loop owns it."""

    def __init__(
        self,
        credentials: DispatcherCredentials | None,
        *,
        malformed_limit: int = 50,
        malformed_window: float = 10.0,
        ban_seconds: float = 60.0,
    ):
        self.credentials = credentials
        self.curve = credentials is not None
        self.keys = AuthorizedKeys(credentials.directory) if credentials is not None else None
        if self.keys is not None:
            self.keys.refresh()
        self.malformed_limit = malformed_limit
        self.malformed_window = malformed_window
        self.ban_seconds = ban_seconds
        self.zap_socket: zmq.Socket[Any] | None = None
        self.mechanism = "NULL"
        self.screening = self.curve  # True when screen() must see every message
        self.blocked: dict[bytes, float] = {}  # routing id -> until: dropped unread, never sent to
        self._banned_users: dict[str, float] = {}  # user id -> until (keys only)
        self._strikes: dict[Any, tuple[int, float]] = {}  # routing id or user id -> (count, window start)
        self._bound: dict[bytes, str] = {}  # routing id -> the user id of its messages (recent peers)
        self._bound_old: dict[bytes, str] = {}  # the generation before: peers silent for a while
        self._next_rotation = 0.0
        self._generation = self.keys.generation if self.keys is not None else 0
        self._last_refusal: dict[bytes, float] = {}
        self._last_log = 0.0
        self._principal: Principal | None = None  # of the message screen() saw last
        self._takeover = False
        self.stats = {"handshakes_refused": 0, "forbidden": 0, "dropped": 0, "quarantined": 0, "revoked": 0}

    # --- sockets --------------------------------------------------------------------------------------

    def secure(self, ctx: zmq.Context[Any], router: zmq.Socket[Any]) -> None:
        """Before bind: make the ROUTER a CurveZMQ server and start answering ZAP requests."""
        if self.credentials is not None:
            self._secure(ctx, router, self.credentials)
        names = {int(zmq.NULL): "NULL", int(zmq.PLAIN): "PLAIN", int(zmq.CURVE): "CURVE"}
        self.mechanism = names.get(int(router.getsockopt(zmq.MECHANISM)), "?")  # what status reports

    def _secure(self, ctx: zmq.Context[Any], router: zmq.Socket[Any], credentials: DispatcherCredentials) -> None:
        zap = ctx.socket(zmq.ROUTER)
        zap.setsockopt(zmq.LINGER, 0)
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            zap.close()
            raise RuntimeError(
                f"cannot start the ZAP handler ({exc}): another one runs in this zmq.Context; "
                "give the dispatcher a context of its own"
            ) from None
        self.zap_socket = zap
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, credentials.secret)
        router.setsockopt(zmq.CURVE_PUBLICKEY, credentials.public)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def close(self) -> None:
        if self.zap_socket is not None:
            self.zap_socket.close(linger=0)
            self.zap_socket = None

    def serve_zap(self, now: float) -> None:
        """Answer every pending ZAP request (one per CurveZMQ handshake)."""
        zap = self.zap_socket
        assert zap is not None and self.keys is not None
        while True:
            try:
                msg = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(msg) < 4:
                continue  # not a ZAP request: nothing to answer
            rid, version, request_id = msg[0], msg[2], msg[3]
            status, text, user_id = self._authenticate(msg, now)
            if version != b"1.0":
                status, text, user_id = b"400", b"unsupported ZAP version", b""
            zap.send_multipart([rid, b"", b"1.0", request_id, status, text, user_id, b""])

    def _authenticate(self, msg: list[bytes], now: float) -> tuple[bytes, bytes, bytes]:
        assert self.keys is not None
        if len(msg) < 9 or msg[7] != b"CURVE" or len(msg[8]) != 32:
            return b"400", b"CURVE required", b""
        import zmq.utils.z85

        address = msg[5].decode(errors="replace")
        key = zmq.utils.z85.encode(msg[8])
        try:
            self.keys.refresh()
        except OSError as exc:  # keep the keys we had
            log.warning("cannot read %s: %s", self.keys.root / "authorized", exc)
        principal = self.keys.by_key.get(key)
        if principal is None:
            self._refused_handshake(f"unknown key {key.decode()[:8]}... from {address}", now)
            return b"400", b"unknown key", b""
        if self._banned_users.get(principal.user_id, 0.0) > now:
            self._refused_handshake(f"{principal.label} from {address} is quarantined", now)
            return b"400", b"key quarantined", b""
        return b"200", b"OK", principal.user_id.encode()

    def _refused_handshake(self, what: str, now: float) -> None:
        self.stats["handshakes_refused"] += 1
        if now - self._last_log > 5.0:
            self._last_log = now
            log.warning("refused a connection: %s (%d refused so far)", what, self.stats["handshakes_refused"])

    # --- per message ------------------------------------------------------------------------------------

    def screen(self, peer: bytes, frame: Any, now: float) -> frozenset[Cmd] | None:
        """The commands this message's sender may send; None: drop it unread (quarantined or revoked)."""
        until = self.blocked.get(peer)
        if until is not None:
            if until > now:
                self.stats["dropped"] += 1
                return None
            del self.blocked[peer]
            self._update_screening()
        if self.keys is None:
            return ANY_COMMAND
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            user_id = ""
        if self._banned_users and self._banned_users.get(user_id, 0.0) > now:
            self.stats["dropped"] += 1
            return None
        principal = self.keys.by_user_id.get(user_id)
        self._principal = principal
        self._takeover = False
        bound = self._bound.get(peer)
        if bound is None:
            bound = self._bound_old.get(peer)
        if bound is not None and bound != user_id and bound in self.keys.by_user_id:
            self._takeover = True  # another key took this routing id over (ROUTER_HANDOVER): refuse it
            return NO_COMMAND
        self._bound[peer] = user_id
        return principal.commands if principal is not None else NO_COMMAND

    def refusal(self, peer: bytes, cmd: Cmd, now: float) -> str | None:
        """Why the message screen() just saw may not be sent (None: do not answer, rate-limited)."""
        self.stats["forbidden"] += 1
        last = self._last_refusal.get(peer, 0.0)
        if now - last < REFUSAL_INTERVAL:
            return None
        self._last_refusal[peer] = now
        p = self._principal
        if self._takeover:
            reason = "this routing id belongs to a connection with another key"
        elif p is None:
            reason = "this key is not authorized (it was revoked)"
        else:
            wanted = "worker" if cmd in WORKER_COMMANDS else "client"
            reason = f"the {p.label} may not send {cmd.name}: only {wanted} keys may"
        log.warning("forbidden: %s (routing id %r)", reason, peer[:16])
        return reason

    def malformed(self, peer: bytes, now: float) -> bool:
        """Count a malformed message; True when this makes its sender quarantined."""
        who: Any = peer
        if self.keys is not None:
            who = self._bound.get(peer) or self._bound_old.get(peer) or peer
        count, since = self._strikes.get(who, (0, now))
        if now - since > self.malformed_window:
            count, since = 0, now
        count += 1
        if count < self.malformed_limit:
            self._strikes[who] = (count, since)
            return False
        self._strikes.pop(who, None)
        self.block(peer, now + self.ban_seconds)
        if isinstance(who, str):
            self._banned_users[who] = now + self.ban_seconds
        self.stats["quarantined"] += 1
        return True

    def block(self, peer: bytes, until: float) -> None:
        self.blocked[peer] = until
        self.screening = True

    def revoke(self, peer: bytes, now: float) -> None:
        """Block a peer whose key was revoked (after telling it so)."""
        self.block(peer, now + REVOKED_BLOCK)

    def may_send(self, peer: bytes, now: float) -> bool:
        until = self.blocked.get(peer)
        return until is None or until <= now

    # --- every heartbeat ----------------------------------------------------------------------------------

    def tick(self, now: float) -> list[tuple[bytes, str]]:
        """Re-read the keys and prune old state; return the peers whose key was revoked, with a reason.

        The caller tells each of them, then calls `revoke()`.
        """
        revoked: list[tuple[bytes, str]] = []
        if self.keys is not None:
            try:
                self.keys.refresh()
            except OSError as exc:
                log.warning("cannot read %s: %s", self.keys.root / "authorized", exc)
            changed = self.keys.generation != self._generation  # a handshake may have noticed it first
            self._generation = self.keys.generation
            if changed:
                valid = self.keys.by_user_id
                for peer, user_id in {**self._bound_old, **self._bound}.items():
                    if user_id not in valid and peer not in self.blocked:
                        name = user_id.split(":")[1] if user_id.count(":") >= 2 else user_id
                        revoked.append((peer, f"the key {name!r} was revoked"))
                        self.stats["revoked"] += 1
            if now >= self._next_rotation:  # peers silent for two generations are forgotten
                self._bound_old, self._bound = self._bound, {}
                self._next_rotation = now + BIND_GENERATION
        self.blocked = {k: until for k, until in self.blocked.items() if until > now}
        self._banned_users = {k: until for k, until in self._banned_users.items() if until > now}
        self._strikes = {k: v for k, v in self._strikes.items() if now - v[1] <= self.malformed_window}
        self._last_refusal = {k: t for k, t in self._last_refusal.items() if now - t <= 60.0}
        self._update_screening()
        return revoked

    def _update_screening(self) -> None:
        self.screening = self.curve or bool(self.blocked)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "curve": self.curve, "mechanism": self.mechanism, **self.stats, "blocked_now": len(self.blocked)
        }
        if self.keys is not None:
            out["authorized"] = {f"{role}s": n for role, n in self.keys.counts.items()}
        return out

"""The standby pair's driver: the sockets, the journal shipping and the fencing around `Standby` (standby.py).

A dispatcher started with `--peer` owns one `Pair`. The loop (server.py) polls its sockets, asks it to
screen every message a worker or client sends (`screen`: a passive dispatcher answers REDIRECT, never
work; a STALE answer or a higher epoch is news for the state machine) and stamps every message it sends
with `epoch`. Durability (durability.py) hands it each group-commit batch as it goes to the disk
(`ship`) and holds that batch's ACCEPTED replies until the passive has acknowledged it, while in sync.

Sockets, all in a context of their own (so the dispatcher's ZAP handler, which knows workers and clients,
does not judge the pair): `inbox`, a ROUTER bound at `--pair-bind`, receives the peer's beats, batches and
acknowledgements; `outbox`, a DEALER connected to the peer's pair address (`--peer`), sends ours
(ZMQ_IMMEDIATE: nothing queues for a peer that is not connected; a batch lost so is a gap, and a gap is
made good by a snapshot); `witness`, a DEALER to `conveyor witness`. With keys, both dispatchers use the
dispatcher key pair of the keys directory, and the inbox accepts that key only.

Shipping: batches are numbered across epochs (`seq`); the passive applies batch n only on top of n - 1
of the same epoch (`stream`), else it asks for a snapshot (`want`), which the active takes from its
committed journal when no commit is in flight (so it holds exactly the batches up to its number). A
passive that starts, or sees a new active, begins with a snapshot.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
from zmq.utils import z85

from conveyor.dispatcher import standby as sb
from conveyor.dispatcher.journal import Batch, Journal
from conveyor.protocol import Cmd, ProtocolError, encode
from conveyor.protocol import commands as c
from conveyor.protocol.frames import frame_epoch, split, split_frames
from conveyor.security.keys import DispatcherCredentials
from conveyor.transport.sockets import NOBLOCK, send_parts

log = logging.getLogger("conveyor.dispatcher")

OUTBOX_HWM = 10_000  # messages queued for the peer at most; beyond, a batch is dropped (a gap: a snapshot)
SNAPSHOT_AGAIN_S = 5.0  # a snapshot asked for again after this long is sent again (the first was lost)
_EMPTY_LIST = msgpack.packb([])
_EMPTY_MAP = msgpack.packb({})
# Peer commands the pair answers itself: a passive dispatcher lets none of the others through.
_ALWAYS = frozenset({Cmd.STALE})
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def now_s() -> float:
    """The pair's clock: CLOCK_BOOTTIME, which (unlike CLOCK_MONOTONIC) runs on through a host suspend."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Pair:
    def __init__(
        self,
        config: sb.StandbyConfig,
        *,
        peer: str,
        bind: str,
        journal: Journal,
        endpoint: str,
        witness: str | None = None,
        credentials: DispatcherCredentials | None = None,
        require_backup: bool = False,
    ):
        self.config = config
        # Accept new jobs only while in sync (both journals): degraded, SUBMIT answers busy (clients send
        # again later) instead of acknowledging on one copy. Availability traded for the second copy.
        self.require_backup = require_backup
        self.held_back = 0  # new jobs answered busy for want of the backup
        self.peer_address = peer
        self.bind_address = bind
        self.witness_address = witness
        self.journal = journal
        self.endpoint = endpoint  # our client endpoint, told to the peer (its REDIRECT names it)
        self.node = f"{config.role}-{uuid.uuid4().hex[:8]}"
        self.standby = sb.Standby(config, now_s(), epoch=journal.epoch)
        self.epoch = 0  # stamped on everything the dispatcher sends: ours while active, else the highest seen
        self.serving = False
        self.in_sync = False
        self.peer_endpoint = ""
        self.deadline_at = now_s()
        # Called on the loop thread: activate(epoch) loads the journal and serves; step_down(reason) stops.
        self.on_activate: Callable[[int, bool], None] = lambda epoch, behind: None
        self.on_step_down: Callable[[str], None] = lambda reason: None
        self.on_acked: Callable[[int | None], None] = lambda upto: None  # ACCEPTED up to here may go (None: all)
        self.on_handover: Callable[[Batch], dict[str, int]] = lambda batch: {}  # merge what a former active held
        self.snapshot_ready: Callable[[], bool] = lambda: True  # no commit in flight
        # shipping (active)
        self.seq = 0  # the last batch shipped
        self.committed_seq = 0  # the last batch our own journal committed
        self.acked = 0  # the last batch the passive acknowledged in our epoch
        self.snapshots = 0
        self._snapshot_wanted = False
        self._snapshot_at = -float("inf")
        self._peer_instance = ""
        # applying (passive)
        self.stream = 0  # the epoch whose batches `applied` counts (0: none since we started)
        self.applied = 0
        self.applied_snapshot = 0
        self._want_sent_at = -float("inf")
        # Active once (an epoch in our journal): the first snapshot may lack jobs only we accepted (cut
        # off, degraded). They are kept and handed to the active instead of being deleted (the merge).
        self._may_hold_more = journal.epoch > 0
        self.handed_over = 0
        self.adopted = 0
        self.adopted_finals = 0
        self.ran_twice = 0  # jobs both sides ran to the end while apart (at-least-once: counted, not hidden)
        # counts, for status
        self.redirected = 0
        self.stale_answers = 0  # STALE answers received: messages of ours a peer refused
        self.shipped = 0
        self.degraded_since: float | None = None
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._credentials = credentials
        self.inbox: zmq.Socket[Any] | None = None
        self.outbox: zmq.Socket[Any] | None = None
        self.witness: zmq.Socket[Any] | None = None
        self._zap: zmq.Socket[Any] | None = None

    # --- sockets ----------------------------------------------------------------------------------------

    def open(self) -> None:
        ctx, creds = self._ctx, self._credentials
        if creds is not None:  # the inbox accepts the dispatcher key only (both dispatchers hold it)
            self._zap = ctx.socket(zmq.REP)
            self._zap.bind(ZAP_ENDPOINT)
        inbox = ctx.socket(zmq.ROUTER)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.setsockopt(zmq.RCVHWM, 0)
        if creds is not None:
            inbox.setsockopt(zmq.CURVE_SERVER, 1)
            inbox.setsockopt(zmq.CURVE_SECRETKEY, creds.secret)
            inbox.setsockopt(zmq.ZAP_DOMAIN, b"conveyor-pair")
        inbox.bind(self.bind_address)
        self.inbox = inbox
        self.outbox = self._dealer(self.peer_address, OUTBOX_HWM)
        if self.witness_address is not None:
            self.witness = self._dealer(self.witness_address, 100)
        log.info("standby pair: %s, pair socket %s, peer %s%s", self.config.role, self.bind_address,
                 self.peer_address, f", witness {self.witness_address}" if self.witness_address else ", no witness")
        self._apply(self.standby.handle(sb.Tick(), now_s()))

    def _dealer(self, address: str, hwm: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        # At most a heartbeat: a peer that restarts hears us within one, long before its failover timeout
        # (with 1 s of backoff against a 1 s timeout, a restarted old primary took over from a live active).
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(100, int(self.config.heartbeat_s * 1000)))
        creds = self._credentials
        if creds is not None:
            sock.setsockopt(zmq.CURVE_SECRETKEY, creds.secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, creds.public)
            sock.setsockopt(zmq.CURVE_SERVERKEY, creds.public)
        sock.connect(address)
        return sock

    @property
    def sockets(self) -> list[zmq.Socket[Any]]:
        return [s for s in (self.inbox, self.witness, self._zap) if s is not None]

    def close(self) -> None:
        for sock in (self.inbox, self.outbox, self.witness, self._zap):
            if sock is not None:
                sock.close(0)
        self.inbox = self.outbox = self.witness = self._zap = None
        self._ctx.term()

    # --- the loop's calls -------------------------------------------------------------------------------

    def readable(self) -> None:
        """Read what the peer, the witness and the ZAP handshakes sent (the loop saw one readable)."""
        if self._zap is not None:
            self._serve_zap()
        if self.witness is not None:
            for parts in _drain(self.witness):
                self._on_witness(parts)
        if self.inbox is not None:
            for parts in _drain(self.inbox):
                self._on_peer(parts[1:])
        self.tick()

    def tick(self) -> None:
        now = now_s()
        if now >= self.deadline_at:
            self._apply(self.standby.handle(sb.Tick(), now))
        if self._snapshot_wanted and self.standby.active and self.snapshot_ready():
            self._send_snapshot()

    @property
    def deadline(self) -> float:
        """When the loop must call tick(), on time.monotonic()'s scale."""
        return time.monotonic() + max(0.0, self.deadline_at - now_s())

    def screen(self, cmd: Cmd, command_frame: Any, send: Callable[[Cmd, Any], Any]) -> bool:
        """A worker's or client's message: True if the dispatcher serves it; False if it was answered here
        (REDIRECT while passive, STALE taken in)."""
        seen = frame_epoch(command_frame)
        standby = self.standby
        if cmd in _ALWAYS:
            self.stale_answers += 1
            if seen > standby.seen:
                self._apply(standby.handle(sb.Stale(seen), now_s()))
            return False
        if standby.active and seen <= standby.seen and (not self.config.witness or standby.serving(now_s())):
            return True  # the common case, without a turn of the state machine
        served = False
        for action in self._apply(standby.handle(sb.ClientSeen(seen), now_s())):
            if isinstance(action, sb.Serve):
                served = True
        if not served:
            self.redirected += 1
            hears = standby.peer_active and standby.peer_at is not None and (
                now_s() - standby.peer_at < self.config.peer_timeout_s)
            send(Cmd.REDIRECT, c.Redirect(self.peer_endpoint if hears else "", standby.seen))
        return served

    def promote(self, force: bool) -> tuple[bool, str]:
        """An operator's PROMOTE (answered whether we are active or passive): (ok, what happens)."""
        log.warning("standby pair: an operator asks us to become active%s", " (forced)" if force else "")
        answer = (False, "no answer from the state machine")
        for action in self._apply(self.standby.handle(sb.Promote(force), now_s())):
            if isinstance(action, sb.Promoted):
                answer = (action.ok, action.message)
        return answer

    # --- actions ----------------------------------------------------------------------------------------

    def _apply(self, actions: list[sb.Action]) -> list[sb.Action]:
        for action in actions:
            if isinstance(action, sb.SendBeat):
                stream_seq = self.committed_seq if self.standby.active else self.applied
                self._send_peer(Cmd.PAIR_BEAT, c.PairBeat(
                    action.epoch, action.active, stream_seq, action.ref, action.echo, self.endpoint,
                    self.standby.epoch if self.standby.active else self.stream, action.promote, self.node))
            elif isinstance(action, sb.AskLease):
                if self.witness is not None:
                    _send(self.witness, Cmd.LEASE, c.Lease(self.node, action.epoch, action.ref))
            elif isinstance(action, sb.PersistEpoch):
                self.journal.save_epoch(action.epoch)
            elif isinstance(action, sb.Activate):
                self.epoch = action.epoch
                self.seq = self.committed_seq = self.acked = max(self.applied, self.standby.seq)
                self.in_sync = False
                self.degraded_since = time.monotonic()
                log.warning("standby pair: active in epoch %d%s", action.epoch,
                            " (behind what the old active announced)" if action.behind else "")
                self.on_activate(action.epoch, action.behind)
            elif isinstance(action, sb.StepDown):
                self.epoch = action.seen
                log.warning("standby pair: stepping down (%s; epoch %d seen)", action.reason, action.seen)
                self.on_step_down(action.reason)
            elif isinstance(action, sb.Replication):
                self._replication(action.in_sync)
            elif isinstance(action, sb.ArmTimer):
                self.deadline_at = action.at
        if not self.standby.active:
            self.epoch = self.standby.seen
        return actions

    def _replication(self, in_sync: bool) -> None:
        self.in_sync = in_sync
        if in_sync:
            self.degraded_since = None
            log.info("standby pair: in sync; ACCEPTED waits for both journals")
        else:
            self.degraded_since = time.monotonic()
            log.warning("standby pair: DEGRADED: the backup is gone or behind; %s until it catches up",
                        "new jobs wait (--require-backup)" if self.require_backup
                        else "jobs are acknowledged with one copy of the journal")
            self.on_acked(None)

    def _send_peer(self, cmd: Cmd, body: Any, frames: list[Any] | None = None) -> bool:
        return self.outbox is not None and _send(self.outbox, cmd, body, frames)

    # --- the peer and the witness -----------------------------------------------------------------------

    def _on_peer(self, parts: list[Any]) -> None:
        try:
            cmd, raw, frames = split(parts)
            body = c.decode_body(cmd, raw)
        except ProtocolError as exc:
            log.warning("standby pair: dropped a malformed message from the peer: %s", exc)
            return
        now = now_s()
        if cmd == Cmd.PAIR_BEAT:
            self.peer_endpoint = body.endpoint
            if body.instance != self._peer_instance:  # the peer (re)started: a snapshot sent before is lost
                self._peer_instance = body.instance
                self._snapshot_at = -float("inf")
            # An active's position is its own; a passive's counts only if it is of our epoch's stream.
            ours = self.standby.active and body.stream == self.standby.epoch
            seq = body.seq if body.active or ours else 0
            self._apply(self.standby.handle(
                sb.PeerBeat(body.epoch, body.active, seq, body.ref, body.echo, body.promote), now))
            if self.standby.active and not body.active and not ours:
                self._want_snapshot()  # a passive that holds nothing of our epoch yet
        elif cmd == Cmd.PAIR_BATCH:
            self._on_batch(body, frames, now)
        elif cmd == Cmd.PAIR_ACK and self.standby.active and body.epoch == self.standby.epoch:
            if body.want:
                self._want_snapshot()
            elif body.seq > self.acked:
                self.acked = body.seq
                self.on_acked(body.seq)

    def _on_witness(self, parts: list[Any]) -> None:
        try:
            cmd, raw, _ = split(parts)
            body = c.decode_body(cmd, raw)
        except ProtocolError as exc:
            log.warning("standby pair: dropped a malformed message from the witness: %s", exc)
            return
        if cmd != Cmd.LEASE_REPLY:
            return
        event: sb.Event = sb.LeaseGranted(body.epoch, body.ref) if body.granted else sb.LeaseRefused(body.highest)
        self._apply(self.standby.handle(event, now_s()))

    def _serve_zap(self) -> None:
        """The inbox's ZAP handler: only the dispatcher key may ship a journal to us."""
        assert self._zap is not None and self._credentials is not None
        answer_zap(self._zap, self._credentials.public, "standby pair")

    # --- shipping (active) ------------------------------------------------------------------------------

    def ship(self, batch: Batch) -> int:
        """Send one group-commit batch to the passive; its number."""
        self.seq += 1
        self.shipped += 1
        body, frames = _batch_body(self.standby.epoch, self.seq, 0, batch)
        self._send_peer(Cmd.PAIR_BATCH, body, frames)
        return self.seq

    def committed(self, seq: int) -> None:
        """Our own journal committed batch `seq`."""
        self.committed_seq = max(self.committed_seq, seq)
        self._apply(self.standby.handle(sb.JournalAt(seq), now_s()))

    def must_wait(self, seq: int) -> bool:
        """Whether ACCEPTED for batch `seq` waits for the passive's acknowledgement."""
        return self.in_sync and self.acked < seq

    def _want_snapshot(self) -> None:
        if now_s() - self._snapshot_at >= SNAPSHOT_AGAIN_S:  # else the last one is on its way
            self._snapshot_wanted = True

    def _send_snapshot(self) -> None:
        self._snapshot_wanted = False
        self._snapshot_at = now_s()
        self.snapshots += 1
        batch = self.journal.dump()
        body, frames = _batch_body(self.standby.epoch, self.committed_seq, self.snapshots, batch)
        self._send_peer(Cmd.PAIR_BATCH, body, frames)
        log.info("standby pair: sent a snapshot of %d job(s) as of batch %d", len(batch.inserts), self.committed_seq)

    # --- applying (passive) -----------------------------------------------------------------------------

    def _on_batch(self, b: c.PairBatch, frames: list[Any], now: float) -> None:
        batch = _batch_of(b, frames)
        if self.standby.active:
            if b.handover and b.epoch == self.standby.epoch:
                counts = self.on_handover(batch)
                self.adopted += counts.get("jobs", 0)
                self.adopted_finals += counts.get("finals", 0)
                self.ran_twice += counts.get("ran_twice", 0)
                log.warning("standby pair: merged what the peer handed over: %d job(s) only its journal held, "
                            "%d final state(s) it reached, %d job(s) that ended on both sides (ours stands)",
                            counts.get("jobs", 0), counts.get("finals", 0), counts.get("ran_twice", 0))
            return  # else two actives (a split): the higher epoch wins; their merge is a later step
        if b.snapshot:
            batch.deletes = self.journal.job_ids()
            if self._may_hold_more:
                self._hand_over(b.epoch, batch)
            self.journal.write(batch)
            self.stream, self.applied, self.applied_snapshot = b.epoch, b.seq, b.snapshot
            log.info("standby pair: applied a snapshot of %d job(s) from epoch %d", len(batch.inserts), b.epoch)
        elif b.epoch == self.stream and b.seq <= self.applied:
            return  # seen already
        elif b.epoch == self.stream and b.seq == self.applied + 1:
            self.journal.write(batch)
            self.applied = b.seq
        else:  # a gap, or a new active: nothing applies until a snapshot
            if now - self._want_sent_at >= self.config.heartbeat_s:
                self._want_sent_at = now
                self._send_peer(Cmd.PAIR_ACK, c.PairAck(b.epoch, self.applied, self.applied_snapshot, want=True))
            return
        self._send_peer(Cmd.PAIR_ACK, c.PairAck(b.epoch, self.applied, self.applied_snapshot))
        self._apply(self.standby.handle(sb.JournalAt(self.applied), now))

    def _hand_over(self, epoch: int, snapshot: Batch) -> None:
        """Before our journal takes the snapshot: what we hold that it lacks goes to the active (the merge).

        That is every job it does not know (accepted here while we were cut off, degraded, or active beside
        it in a split), and every final state we reached for a job it still has unfinished. The active
        applies the rule (Durability.adopt): a final state beats an unfinished one, its own final state
        stands. Jobs it lacks stay in our journal until its stream brings them back."""
        self._may_hold_more = False
        ours = self.journal.dump()
        theirs = snapshot.inserts
        only_ours = {i for i in ours.inserts if i not in theirs}
        ended_here = {i for i in ours.finishes if i in theirs and i not in snapshot.finishes}
        # Ended on both sides with different attempts: it ran twice (in a split both sides ran it).
        done_there = snapshot.finishes
        twice = sum(1 for i, row in ours.finishes.items() if i in done_there and row[2] != done_there[i][2])
        self.ran_twice += twice
        send = only_ours | ended_here
        if twice:
            log.warning("standby pair: %d job(s) ended on both sides while apart (they ran twice); the active's "
                        "final states stand", twice)
        if not send:
            return
        snapshot.deletes -= only_ours
        handover = Batch({i: ours.inserts[i] for i in send}, {i: ours.finishes[i] for i in send if i in ours.finishes},
                         set())
        body, frames = _batch_body(epoch, 0, 0, handover)
        self._send_peer(Cmd.PAIR_BATCH, c.PairBatch(body.epoch, 0, 0, body.inserts, body.finishes, handover=True),
                        frames)
        self.handed_over += len(send)
        log.warning("standby pair: handing %d job(s) only our journal holds and %d final state(s) only we reached "
                    "to the active (a merge)", len(only_ours), len(ended_here))

    # --- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.standby
        active = st.active
        return {
            "role": self.config.role,
            "state": "active" if active else "passive",
            "epoch": st.epoch if active else st.seen,
            "replication": ("in-sync" if self.in_sync else "degraded") if active else "passive",
            "require_backup": self.require_backup,
            "held_back": self.held_back,
            "degraded_s": None if self.degraded_since is None or not active
            else round(time.monotonic() - self.degraded_since, 3),
            "seq": self.committed_seq if active else self.applied,
            "peer_acked": self.acked,
            "peer": self.peer_address,
            "peer_active": st.peer_active,
            "witness": self.witness_address,
            "redirected": self.redirected,
            "stale_answers": self.stale_answers,
            "snapshots": self.snapshots,
            "handed_over": self.handed_over,
            "adopted": self.adopted,
            "adopted_finals": self.adopted_finals,
            "ran_twice": self.ran_twice,
        }


def _batch_body(epoch: int, seq: int, snapshot: int, batch: Batch) -> tuple[c.PairBatch, list[Any]]:
    frames: list[Any] = []
    inserts = []
    for job_id, jseq, owner, opts, data, deps in batch.inserts.values():
        inserts.append(c.ShippedInsert(job_id, jseq, owner, bytes(opts), len(data), deps))
        frames.extend(data)
    finishes = []
    for state, attempts, history, info, data, expires_at, job_id in batch.finishes.values():
        finishes.append(c.ShippedFinish(state, attempts, bytes(history or _EMPTY_LIST), bytes(info or _EMPTY_MAP),
                                        len(data), expires_at, job_id))
        frames.extend(data)
    body = c.PairBatch(epoch, seq, snapshot, inserts, finishes, sorted(batch.deletes), list(batch.schedules.items()))
    return body, frames


def _batch_of(b: c.PairBatch, frames: list[Any]) -> Batch:
    counts = [e.n_frames for e in b.inserts] + [e.n_frames for e in b.finishes]
    per_entry = split_frames(counts, frames)
    inserts = {
        e.job_id: (e.job_id, e.seq, e.owner, e.opts, tuple(data), e.deps)
        for e, data in zip(b.inserts, per_entry, strict=False)
    }
    finishes = {
        e.job_id: (e.state, e.attempts, e.history, e.info, tuple(data), e.expires_at, e.job_id)
        for e, data in zip(b.finishes, per_entry[len(b.inserts):], strict=True)
    }
    return Batch(inserts, finishes, set(b.deletes), dict(b.schedules))


def answer_zap(zap: zmq.Socket[Any], dispatcher_public: bytes, what: str) -> None:
    """Answer the pending ZAP requests of a CURVE server socket that only the dispatcher key may reach
    (the pair's inbox, the witness): both dispatchers of a pair hold that key, nothing else does."""
    while True:
        try:
            msg = zap.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        ok = len(msg) >= 7 and msg[5] == b"CURVE" and _key32(msg[6]) == _key32(dispatcher_public)
        if not ok:
            log.warning("%s: refused a connection from a key that is not the dispatcher's", what)
        zap.send_multipart([b"1.0", msg[1] if len(msg) > 1 else b"", b"200" if ok else b"400",
                            b"OK" if ok else b"not the dispatcher key", b"pair" if ok else b"", b""])


def _key32(key: bytes) -> bytes:
    """A CURVE public key as its 32 raw bytes (keys are also written Z85-encoded, 40 characters)."""
    return key if len(key) == 32 else z85.decode(key)


def _drain(sock: zmq.Socket[Any], limit: int = 1000) -> list[list[Any]]:
    out: list[list[Any]] = []
    for _ in range(limit):
        try:
            out.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return out


def _send(sock: zmq.Socket[Any], cmd: Cmd, body: Any, frames: list[Any] | None = None) -> bool:
    try:
        send_parts(sock, encode(cmd, body, frames or ()), NOBLOCK)
    except zmq.Again:
        return False
    return True

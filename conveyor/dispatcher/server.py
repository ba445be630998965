"""The dispatcher's socket loop: one ROUTER socket, a thin shell around the Scheduler.

Read this top to bottom: `run()` is the loop; `_receive()` decodes each message into its typed body
(conveyor/protocol/commands.py) and routes it through `_handlers`, the one table of every command a
peer may send (the worker commands are here, the client commands in clients.py, progress and output in
observe/); `_flush()` turns the scheduler's actions into messages. All scheduling decisions live in
`scheduler.py`, the journal's commits in `durability.py`; this file only decodes, encodes, and keeps
time.

Liveness is judged on evidence only: a worker is lost when nothing came from it for the liveness
window *before the last moment the socket was found empty*, so a slow turn (a burst, a big query)
never expires workers whose heartbeats wait unread; after a turn that hit the read cap, nobody is
expired at all. The journal's commits run on their own thread, so a slow disk cannot stall the loop.

A little over 500 lines: the loop, its liveness judgement and the worker handlers read best together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from conveyor.dispatcher.access import ANY_COMMAND, Gate
from conveyor.dispatcher.clients import ClientSide
from conveyor.dispatcher.durability import Durability
from conveyor.dispatcher.journal import Journal
from conveyor.dispatcher.limits import Rule
from conveyor.dispatcher.model import Resend
from conveyor.dispatcher.observe.observer import Observer
from conveyor.dispatcher.pair import Pair
from conveyor.dispatcher.schedule_file import Declared
from conveyor.dispatcher.scheduler import OFFLOADED, Assign, CancelRunning, Deliver, Job, Scheduler
from conveyor.dispatcher.timetable import Timetable
from conveyor.protocol import Cmd, ProtocolError, VersionMismatch, encode, split_frames
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.protocol.frames import split
from conveyor.protocol.joined import join_frames
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.security.bind import check_bind
from conveyor.security.keys import load_dispatcher_credentials
from conveyor.transport import shm
from conveyor.transport.sockets import NOBLOCK, keep_links_alive, send_parts

log = logging.getLogger("conveyor.dispatcher")

MAX_MESSAGES_PER_TURN = 2000  # then flush, so a flood from one peer cannot starve assignment
SEND_HWM = 100_000  # messages queued for one peer at most; beyond, that peer counts as unreachable
DEFAULT_MAX_QUEUED_BYTES = 2 << 30  # call frames held for unfinished jobs, at most (then submitters wait)


class Dispatcher:
    def __init__(
        self,
        bind: str,
        *,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        infra_retries: int = 3,
        result_ttl: float = 3600.0,
        journal: Journal | None = None,
        max_queued: int = 1_000_000,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        context: zmq.Context[Any] | None = None,
        keys: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        limits: Iterable[tuple[str, Rule]] = (),
        priority_aging_s: float | None = None,
        schedules: Iterable[Declared] = (),
        pair: Pair | None = None,
    ):
        self.bind_address = bind
        self.journal = journal
        self.heartbeat_interval = heartbeat_interval
        self.liveness_s = heartbeat_interval * liveness  # silence after which a worker is lost
        self.instance = uuid.uuid4().hex[:12]
        self.scheduler = Scheduler(
            infra_retries=infra_retries, liveness=self.liveness_s, result_ttl=result_ttl, aging_s=priority_aging_s
        )
        for key, rule in limits:  # declared at start (--limit, --limits-file); LIMITS changes them later
            self.scheduler.limits.declare(key, rule, time.monotonic())
        self._ctx = context or zmq.Context.instance()
        self._router: zmq.Socket[Any] | None = None
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.endpoint: str | None = None
        self.malformed = 0
        self._last_malformed_log = 0.0
        self.insecure = insecure  # allow a non-loopback bind without keys (docs/security.md)
        self.max_message_size = max_message_size
        self._gate = Gate(load_dispatcher_credentials(keys) if keys is not None else None)
        self._connections = _Connections()
        self._closers: list[Callable[[], None]] = []  # what else to close when the loop ends (HTTP servers)
        self._saturated = False  # the last read hit MAX_MESSAGES_PER_TURN: messages may still be waiting
        self._shm_workers: set[bytes] = set()  # workers that share our /dev/shm: ASSIGN names segments
        self.shm_assigned = 0  # segments named in ASSIGN (their bytes did not cross TCP)
        # Progress, output, job history, metrics, the dashboard's snapshots.
        self.observer = Observer(self.scheduler, self._send, self._wake, self._about)
        self.durability = (
            None if journal is None else Durability(journal, self.scheduler, self._send, self._wake, result_ttl)
        )
        if self.durability is not None:
            self.durability.on_commit = lambda seconds: self.observer.journal_committed(
                journal.commits if journal is not None else 0, seconds)
        # Cron and interval schedules: the jobs they create go through the scheduler like any other.
        self.timetable = Timetable(self.scheduler, self.durability, self._send)
        self._declared = list(schedules)
        # A standby pair (pair.py): passive until the state machine says otherwise; every message we send
        # carries the epoch; `restart` asks the CLI to start us again, passive, after a step-down.
        self.pair = pair
        self.restart = False
        self._epoch = 0
        if pair is not None:
            pair.on_activate = self._activate
            pair.on_step_down = self._step_down
            if self.durability is not None:
                pair.on_acked = self.durability.release
                pair.on_handover = lambda batch: self.durability.adopt(batch) if self.durability else {}
                pair.snapshot_ready = lambda: self.durability is not None and self.durability.idle
        self._fired = False  # the timetable created jobs this turn: the next poll does not wait
        self.clients = ClientSide(
            self.scheduler, self.observer, self.durability, self._send, instance=self.instance,
            heartbeat_interval=heartbeat_interval, max_queued=max_queued, max_queued_bytes=max_queued_bytes,
            decorate_status=self._decorate_status,
        )
        # Every command a peer may send, and who handles it (each gets the typed body of its command).
        self._handlers: dict[Cmd, Callable[[bytes, Any, list[Any], float], None]] = {
            # workers
            Cmd.READY: self._on_ready,
            Cmd.RESULTS: self._on_results,
            Cmd.GIVEBACK: self._on_giveback,
            Cmd.LEAVING: self._on_leaving,
            Cmd.LENT: self._on_lent,
            Cmd.GOODBYE: self._on_goodbye,
            Cmd.PROGRESS: self.observer.on_progress,
            Cmd.OUTPUT: self.observer.on_output,
            # clients: HELLO, SUBMIT, WATCH, CANCEL_JOBS, STATUS, JOB_INFO, JOBS, LOGS, ACK
            **self.clients.handlers(),
            Cmd.SCHEDULE: self.timetable.on_schedule,
            # both
            Cmd.HEARTBEAT: self._on_heartbeat,
        }

    # --- lifecycle ------------------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the ROUTER socket; returns the actual endpoint (port 0 picks a free port)."""
        check_bind(self.bind_address, self._gate.curve, self.insecure)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # know when a peer is gone instead of dropping silently
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer with the same id takes over
        router.setsockopt(zmq.SNDHWM, SEND_HWM)  # a peer that never reads cannot grow our memory forever
        router.setsockopt(zmq.LINGER, 500)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        # a connection whose peer vanished without a FIN or RST is closed in the end instead of lingering
        # half-open (peers detect it sooner on their side and reconnect)
        keep_links_alive(router, max(5.0, 3 * self.liveness_s))
        self._gate.secure(self._ctx, router)  # with keys: a CurveZMQ server, its ZAP handler up before bind
        self._connections.watch(router)
        address = self.bind_address
        if address.startswith("tcp://") and address.endswith(":0"):
            address = address[:-2] + ":*"
        router.bind(address)
        self._router = router
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        return self.endpoint

    def stop(self) -> None:
        """Ask the loop to finish (thread-safe and signal-safe)."""
        self._stopping = True
        self._wake()

    def on_close(self, close: Callable[[], None]) -> None:
        """Also close this when the dispatcher stops (the metrics and dashboard servers)."""
        self._closers.append(close)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> None:
        """Serve until stop(); then say goodbye to every peer and close everything, in order."""
        with contextlib.ExitStack() as stack:
            # Closed in reverse order, each whatever happened to the others: the wake sockets last, the
            # journal (which may fail on a full disk) before the ROUTER, which goes before the ZAP handler.
            stack.callback(self._wake_w.close)
            stack.callback(self._wake_r.close)
            stack.callback(self._gate.close)
            if self._router is None:
                self.bind()
            router = self._router
            assert router is not None
            stack.callback(router.close, 500)
            stack.callback(self._connections.close)
            for close in self._closers:
                stack.callback(close)
            if self.durability is not None:
                stack.callback(self.durability.close)
            if self.clients.shm and shm.sweep():  # segments of a dispatcher killed with -9
                log.info("removed shared-memory segments left by processes that are gone")
            if self.pair is None:
                self._recover()
            else:  # passive until activated (then _activate recovers)
                stack.callback(self.pair.close)
                self.pair.open()
            log.info("dispatcher %s listening on %s", self.instance, self.endpoint)
            self._loop(router)
            self._goodbye()

    def _recover(self) -> None:
        if self.durability is not None:
            self.observer.stats.remember(self.durability.recover(), time.monotonic())
        self.timetable.recover()  # after the jobs: a slot's job is found again by its id
        self.timetable.apply_file(self._declared)

    def _activate(self, epoch: int, behind: bool) -> None:
        """The pair's state machine made us active: a new instance (clients re-send what is unfinished),
        the journal (shipped to us while passive) into the scheduler, and from now on we ship."""
        self._epoch = epoch
        self.instance = self.clients.instance = uuid.uuid4().hex[:12]
        self.clients.beat = c.Heartbeat("dispatcher", self.instance, self.heartbeat_interval)
        self._recover()
        if self.durability is not None:
            self.durability.replica = self.pair

    def _step_down(self, reason: str) -> None:
        """A higher epoch exists: stop accepting and assigning now; the CLI starts us again, passive."""
        self.restart = True
        self.stop()

    def _loop(self, router: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        zap = self._gate.zap_socket
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        monitor = self._connections.socket
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        pair = self.pair
        pair_sockets = pair.sockets if pair is not None else []
        for sock in pair_sockets:
            poller.register(sock, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        durability = self.durability
        while not self._stopping:
            now = time.monotonic()
            deadline = min(next_heartbeat, self.observer.next_tick)  # statistics, snapshots: once a second
            timer = self.scheduler.next_timer()
            if timer is not None:
                deadline = min(deadline, timer)
            if durability is not None and durability.deadline is not None:
                deadline = min(deadline, durability.deadline)
            wake = self.timetable.wake_at(now, time.time())  # a wall clock jump is seen within a heartbeat
            if wake is not None:
                deadline = min(deadline, wake)
            if pair is not None:
                deadline = min(deadline, pair.deadline)
            busy = self._saturated or self._fired
            timeout_ms = 0 if busy else max(0, int((deadline - now) * 1000) + 1)
            events = dict(poller.poll(timeout_ms))
            turn_started = time.monotonic()
            if self._wake_r.fileno() in events:
                self._drain_wakeups()
                if durability is not None:
                    durability.committed(turn_started)  # the writer thread is done: ACCEPTED goes out
            if zap is not None and zap in events:
                self._gate.serve_zap(turn_started)  # handshakes: accept authorized keys only
            if monitor is not None and monitor in events:
                self._connections.read()
            if pair is not None:  # the peer, the witness; the state machine's timers
                self._epoch = pair.epoch
                if any(sock in events for sock in pair_sockets):
                    pair.readable()
                else:
                    pair.tick()
                self._epoch = pair.epoch
                if self._stopping:
                    break
            # The last moment the socket was empty: everything peers sent before it has been read.
            drained_at = self._receive(router) if router in events else turn_started
            self._saturated = drained_at is None
            now = time.monotonic()
            if now >= next_heartbeat:
                self._heartbeat(now, drained_at)
                next_heartbeat = now + self.heartbeat_interval
            self.scheduler.tick(now)
            self.observer.tick(now)
            self.scheduler.schedule(now)
            self._flush()

    def _goodbye(self) -> None:
        """Tell every worker and client we are going, so they reconnect instead of waiting out liveness."""
        if self.durability is not None:  # what the group commit still holds: durable, then acknowledged
            self.durability.close()
            self.durability = None
        if self.restart:
            log.info("dispatcher %s stepped down", self.instance)
            return  # what we would say is stale: the active speaks now
        body = c.Shutdown(self.instance)
        for peer in [*self.scheduler.workers, *self.clients.clients]:
            self._send(peer, Cmd.SHUTDOWN, body)
        log.info("dispatcher %s stopped", self.instance)

    def _wake(self) -> None:
        """Wake the loop from another thread (or a signal handler)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _about(self) -> dict[str, Any]:
        """Who this dispatcher is and how its journal and connections are, for status views."""
        now = time.monotonic()
        return {
            "instance": self.instance, "endpoint": self.endpoint, "malformed": self.malformed,
            "journal": self.durability.status(now) if self.durability is not None else {"state": "off", "path": None},
            "connections": self._connections.status(),
            **({"pair": self.pair.status()} if self.pair is not None else {}),
        }

    def _decorate_status(self, status: dict[str, Any], now: float) -> None:
        """The server's part of STATUS_REPLY: endpoint, security, journal, connections."""
        status["dispatcher"]["endpoint"] = self.endpoint
        status["totals"]["malformed"] = self.malformed
        status["totals"]["shm_in"] = self.clients.shm_adopted  # arguments clients left in /dev/shm
        status["totals"]["shm_out"] = self.shm_assigned  # ...and named in ASSIGN to a worker of this host
        status["security"] = self._gate.status()
        about = self._about()
        status["journal"], status["connections"] = about["journal"], about["connections"]
        if self.pair is not None:
            status["dispatcher"]["pair"] = about["pair"]

    # --- receiving --------------------------------------------------------------------------------

    def _receive(self, router: zmq.Socket[Any]) -> float | None:
        """Handle what is waiting, up to MAX_MESSAGES_PER_TURN: when the socket was found empty, or None
        if the cap was hit first (more may be waiting)."""
        gate = self._gate
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return time.monotonic()
            now = time.monotonic()
            peer = parts[0].bytes
            allowed = gate.screen(peer, parts[-1], now) if gate.screening else ANY_COMMAND
            if allowed is None:
                continue  # quarantined, or its key was revoked: dropped unread
            try:
                cmd, raw, frames = split(parts[1:])
                if cmd == Cmd.PROMOTE:  # active or passive, an operator's word is answered
                    if allowed is not ANY_COMMAND and cmd not in allowed:
                        self._forbidden(peer, cmd, now)
                    else:
                        self._promote(peer, c.decode_body(cmd, raw))
                    continue
                if self.pair is not None and not self.pair.screen(
                        cmd, parts[2], lambda cmd, body: self._send(peer, cmd, body)):  # noqa: B023
                    continue  # passive: redirected; or a STALE answer, news for the pair
                handler = self._handlers.get(cmd)
                if handler is None:
                    self._malformed(peer, f"unexpected command {cmd.name}", now)
                    continue
                if allowed is not ANY_COMMAND and cmd not in allowed:
                    self._forbidden(peer, cmd, now)  # e.g. a client key sending READY
                    continue
                body = c.decode_body(cmd, raw)
            except VersionMismatch as exc:
                self._send(peer, Cmd.ERROR, c.Error("version", str(exc)))
                continue
            except ProtocolError as exc:
                self._malformed(peer, str(exc), now)
                continue
            try:
                handler(peer, body, frames, now)
            except ProtocolError as exc:  # what a type cannot say (frame counts that do not add up)
                self._malformed(peer, f"{cmd.name}: {exc}", now)
            except Exception:  # a bug of ours, not the peer's: loud, with its traceback, and nobody is blamed
                log.exception("handling %s from %r failed", cmd.name, peer[:16])
        return None

    def _promote(self, peer: bytes, b: c.PromoteRequest) -> None:
        ok, message = (False, "this dispatcher is not one of a standby pair (it runs without --peer)") \
            if self.pair is None else self.pair.promote(b.force)
        self._send(peer, Cmd.PROMOTE_REPLY, c.PromoteReply(ok, message, b.req))

    def _malformed(self, peer: bytes, reason: str, now: float) -> None:
        self.malformed += 1
        if now - self._last_malformed_log > 5.0:  # rate-limited: garbage must not flood the log
            self._last_malformed_log = now
            log.warning("dropped malformed message from %r: %s (%d so far)", peer[:16], reason, self.malformed)
        if self._gate.malformed(peer, now):
            self._drop_peer(peer, f"too many malformed messages: ignored for {self._gate.ban_seconds:g} s", now)

    def _forbidden(self, peer: bytes, cmd: Cmd, now: float) -> None:
        """A key sent a command its role may not send, or its key was revoked: ERROR forbidden (rate-limited)."""
        reason = self._gate.refusal(peer, cmd, now)
        if reason is not None:
            self._send(peer, Cmd.ERROR, c.Error("forbidden", reason))

    def _drop_peer(self, peer: bytes, why: str, now: float) -> None:
        """Forget a quarantined or revoked peer: a worker's registration (its jobs queue again), a client's ping."""
        w = self.scheduler.workers.get(peer)
        self.scheduler.worker_gone(peer, now)
        self.clients.clients.pop(peer, None)
        log.warning("%s: %s", f"worker {w.name}" if w is not None else f"peer {peer[:16]!r}", why)

    # --- worker commands ----------------------------------------------------------------------------

    def _on_ready(self, peer: bytes, b: c.Ready, frames: list[Any], now: float) -> None:
        w = self.scheduler.worker_ready(
            peer,
            name=b.name,
            host=b.host,
            pid=b.pid,
            mode=b.mode,
            concurrency=b.concurrency,
            tags=b.tags,
            credit=b.credit,
            running=[(r.job_id, r.attempt) for r in b.running],
            now=now,
            session=b.session,
            prefetch=b.prefetch,
            prefetch_auto=b.prefetch_auto,
            results_seq=b.results_seq,
        )
        if b.shm and b.shm == self.clients.shm:
            self._shm_workers.add(peer)
        else:
            self._shm_workers.discard(peer)
        self._send(peer, Cmd.HEARTBEAT, self._beat(w.results_acked))
        log.info("worker %s (%s, %s x%d) registered from %s", w.name, w.pid, w.mode, w.concurrency, w.host)

    def _on_results(self, peer: bytes, b: c.Results, frames: list[Any], now: float) -> None:
        known = self.scheduler.heard_from(peer, now)
        per_entry = split_frames([e.n_frames for e in b.outcomes], frames)  # all checked before any is applied
        if self.scheduler.results_in_order(peer, b.seq):  # else: a re-send we have, or one after a gap
            outcome = self.scheduler.outcome
            for e, data in zip(b.outcomes, per_entry, strict=True):
                outcome(peer, e.job_id, e.attempt, e.ok, e.info, data, now)
        if not known:
            self._send(peer, Cmd.RECONNECT, c.Reconnect(self.instance))

    def _on_giveback(self, peer: bytes, entries: list[c.AttemptRef], frames: list[Any], now: float) -> None:
        self.scheduler.heard_from(peer, now)
        for e in entries:
            self.scheduler.give_back(peer, e.job_id, e.attempt, now)

    def _on_lent(self, peer: bytes, b: c.Lent, frames: list[Any], now: float) -> None:
        self.scheduler.heard_from(peer, now)
        self.scheduler.worker_lent(peer, b.slots)

    def _on_leaving(self, peer: bytes, b: c.Empty, frames: list[Any], now: float) -> None:
        self.scheduler.heard_from(peer, now)
        self.scheduler.worker_leaving(peer)

    def _on_goodbye(self, peer: bytes, b: c.Empty, frames: list[Any], now: float) -> None:
        self._shm_workers.discard(peer)
        w = self.scheduler.workers.get(peer)
        self.scheduler.worker_gone(peer, now)
        if w is not None:
            log.info("worker %s left", w.name)

    def _on_heartbeat(self, peer: bytes, b: c.Heartbeat, frames: list[Any], now: float) -> None:
        if b.role != "worker":
            self.clients.on_ping(peer, b, now)
        elif not self.scheduler.heard_from(peer, now):
            self._send(peer, Cmd.RECONNECT, c.Reconnect(self.instance))

    # --- sending ----------------------------------------------------------------------------------

    def _beat(self, ack: int) -> c.Heartbeat:
        """Our heartbeat to a worker: it also tells our interval (workers beat at least this often) and
        acknowledges the worker's RESULTS."""
        return c.Heartbeat("dispatcher", self.instance, self.heartbeat_interval, ack)

    def _heartbeat(self, now: float, drained_at: float | None) -> None:
        for peer, why in self._gate.tick(now):  # keys removed from authorized/: tell, block and forget
            self._send(peer, Cmd.ERROR, c.Error("forbidden", why))
            self._gate.revoke(peer, now)
            self._drop_peer(peer, why, now)
        self.clients.expire(now)
        if drained_at is not None:  # else unread messages may be heartbeats: expire no one without evidence
            for w in self.scheduler.expire_workers(drained_at):
                self.observer.heartbeat_missed()
                log.warning("worker %s (pid %d on %s) missed its heartbeats: lost", w.name, w.pid, w.host)
        for wid, w in list(self.scheduler.workers.items()):
            self._send(wid, Cmd.HEARTBEAT, self._beat(w.results_acked))

    def _flush(self) -> None:
        """Send what the scheduler decided, then record the turn in the journal (durability.py)."""
        for action in self.scheduler.take_actions():
            if isinstance(action, Assign):
                self._send_assign(action)
            elif isinstance(action, Deliver):
                self.clients.send_done(action)
            elif isinstance(action, CancelRunning):
                self._send(action.worker, Cmd.CANCEL, c.Cancel(action.job_id, action.attempt))
            elif isinstance(action, Resend):
                self._send(action.worker, Cmd.RESEND, c.Resend(action.seq))
        finished, forgotten = self.scheduler.drain_finished(), self.scheduler.drain_forgotten()
        self.observer.turn(finished, forgotten)  # drained every turn, journal or not (they would pile up)
        # Schedules fire and note their jobs' ends; their jobs and changes join this turn's journal batch.
        self._fired = self.timetable.turn(time.monotonic(), time.time(), finished)
        if self.durability is not None:
            self.durability.turn(finished, forgotten, time.monotonic(), self._stopping)

    def _send_assign(self, action: Assign) -> None:
        entries = []
        frames: list[Any] = []
        same_host = action.worker in self._shm_workers
        for job in action.jobs:
            data = job.frames if job.frames is not None else []  # not `or`: OFFLOADED is an empty list
            if data is OFFLOADED:  # due at last: its call comes back from the journal
                loaded = self._reload(job)
                if loaded is None:
                    continue
                data = loaded
            opts = job.opts
            parents, joined, parent_frames = self._parent_results(job)
            refs: tuple[c.ShmRef, ...] = ()
            if same_host and any(type(f) is shm.Segment for f in data):  # the worker maps them: no TCP
                refs = tuple(c.ShmRef(i, f.name, len(f)) for i, f in enumerate(data) if type(f) is shm.Segment)
                data = [b"" if type(f) is shm.Segment else f for f in data]
                self.shm_assigned += len(refs)
            entries.append(
                c.AssignEntry(job.id, job.attempt, opts.timeout, opts.retry_on, len(data), parents, joined, refs)
            )
            frames.extend(data)
            frames.extend(parent_frames)
        w = self.scheduler.workers.get(action.worker)
        body = c.Assign(w.results_acked if w is not None else 0, entries)
        if not self._send(action.worker, Cmd.ASSIGN, body, frames):
            # The worker vanished between its credit and our send: the jobs go back to the queue.
            self.scheduler.worker_gone(action.worker, time.monotonic())

    def _parent_results(self, job: Job) -> tuple[list[c.ParentResult], c.JoinedResults | None, list[Any]]:
        """What the job's call refers to: its parents' results (pinned for it), as opaque frames. When
        every parent succeeded with one frame, they go joined (a fan-in: a few frames, not 100,000)."""
        node = job.node
        if node is None or not node.parents:
            return [], None, []
        early = node.joined_early()  # a large fan-in: kept as its parents succeeded
        if early is not None:
            joined, joined_frames = join_frames(early)
            return [], joined, joined_frames
        jobs = self.scheduler.jobs
        singles: list[Any] = []
        for parent_id in node.parents:
            parent = jobs.get(parent_id)
            if parent is None or parent.state != "succeeded" or len(parent.result_frames) != 1:
                break
            singles.append(parent.result_frames[0])
        else:
            joined, joined_frames = join_frames(singles)
            return [], joined, joined_frames
        entries: list[c.ParentResult] = []
        frames: list[Any] = []
        for parent_id in node.parents:
            parent = self.scheduler.jobs.get(parent_id)
            if parent is None:  # only after a restart: a parent finished and forgotten before it
                entries.append(c.ParentResult(parent_id, "unknown", 0, {"message": "its result is gone"}))
                continue
            error = None if parent.state == "succeeded" else parent.result_info
            entries.append(c.ParentResult(parent_id, parent.state, len(parent.result_frames), error))
            frames.extend(parent.result_frames)
        return entries, None, frames

    def _reload(self, job: Job) -> list[Any] | None:
        """An offloaded job's call frames, read back from the journal; None (and the job failed) if they
        cannot be read."""
        try:
            assert self.durability is not None
            frames = self.durability.journal.read_frames(job.id)
        except (AssertionError, LookupError, OSError, ValueError) as exc:
            log.error("job %s: its call cannot be read back from the journal (%s)", job.id, exc)
            info = perr.error_info(perr.EXCEPTION, "JournalError", f"its call could not be read back: {exc}")
            assert job.worker is not None
            self.scheduler.outcome(job.worker, job.id, job.attempt, False, info, [], time.monotonic())
            return None
        self.scheduler.reload(job, frames)
        return frames

    def _send(self, peer: bytes, cmd: Cmd, body: Any, frames: list[Any] | None = None) -> bool:
        """Send without ever blocking; False if the peer is not connected (or does not read)."""
        assert self._router is not None
        if self._gate.blocked and not self._gate.may_send(peer, time.monotonic()):
            return False  # quarantined or revoked: nothing more goes to it
        try:
            send_parts(self._router, [peer, *encode(cmd, body, frames or (), self._epoch)], NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        return True


class _Connections:
    """Connections the ROUTER could not accept (too many open files): logged once, shown in status."""

    def __init__(self) -> None:
        self.socket: zmq.Socket[Any] | None = None
        self.accept_failures = 0
        self.last_error: str | None = None
        self._logged = False

    def watch(self, router: zmq.Socket[Any]) -> None:
        self.socket = router.get_monitor_socket(zmq.EVENT_ACCEPT_FAILED)

    def read(self) -> None:
        assert self.socket is not None
        for _ in range(100):  # libzmq retries a failing accept in a tight loop: read a bounded share per turn
            try:
                event = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            self.accept_failures += 1
            # Parsed here, not by zmq.utils.monitor (it loads asyncio, ~5 MiB): a 16-bit event id, a 32-bit
            # value (the errno), then the endpoint (zmq_socket_monitor(3)).
            value = struct.unpack("=hi", event[0][:6])[1] if len(event) == 2 and len(event[0]) == 6 else 0
            self.last_error = os.strerror(value) if value else "unknown"
            if not self._logged:
                self._logged = True
                log.error("cannot accept more connections (%s): serving the ones we have; raise the limit "
                          "(ulimit -n) for more", self.last_error)

    def status(self) -> dict[str, Any]:
        return {"accept_failures": self.accept_failures, "last_error": self.last_error}

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

"""The dispatcher's socket loop: one ROUTER socket, a thin shell around the Scheduler.

Read this top to bottom: `run()` is the loop; `_receive()` decodes each message into its typed body
(conveyor/protocol/commands.py) and routes it through `_handlers`, the one table of every command a
peer may send; `_flush()` turns the scheduler's actions into messages. All scheduling decisions live
in `scheduler.py`; this file only decodes, encodes, and keeps time.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from conveyor.dispatcher.access import ANY_COMMAND, Gate
from conveyor.dispatcher.journal import Journal
from conveyor.dispatcher.model import Resend, shift_history, wall_clock_offset, wall_clock_view
from conveyor.dispatcher.observe.observer import Observer
from conveyor.dispatcher.scheduler import FINISHED_STATES, SUCCEEDED, Assign, CancelRunning, Deliver, Scheduler
from conveyor.protocol import Cmd, ProtocolError, VersionMismatch, encode, split_frames
from conveyor.protocol import commands as c
from conveyor.protocol.frames import split
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.security.bind import check_bind
from conveyor.security.keys import load_dispatcher_credentials
from conveyor.transport.sockets import NOBLOCK, send_parts

log = logging.getLogger("conveyor.dispatcher")

MAX_MESSAGES_PER_TURN = 2000  # then flush, so a flood from one peer cannot starve assignment


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
        context: zmq.Context[Any] | None = None,
        keys: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ):
        self.bind_address = bind
        self.journal = journal
        self.result_ttl = result_ttl
        self.max_queued = max_queued
        self._acks: list[tuple[bytes, c.Accepted]] = []  # ACCEPTED replies waiting for the journal commit
        self._commit_at: float | None = None  # when the journal commits what this and later turns recorded
        self._clients: dict[bytes, float] = {}  # client peers by last message time, told when we stop
        self.heartbeat_interval = heartbeat_interval
        self.instance = uuid.uuid4().hex[:12]
        # Our heartbeat also tells peers our interval: workers beat at least this often.
        self._beat_body = c.Heartbeat("dispatcher", self.instance, heartbeat_interval)
        self.scheduler = Scheduler(
            infra_retries=infra_retries, liveness=heartbeat_interval * liveness, result_ttl=result_ttl
        )
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
        # Progress, output, job history, metrics, the dashboard's snapshots.
        self.observer = Observer(self.scheduler, self._send, self._wake, self._about)
        # Every command a peer may send, and who handles it (each gets the typed body of its command).
        self._handlers: dict[Cmd, Callable[[bytes, Any, list[Any], float], None]] = {
            # workers
            Cmd.READY: self._on_ready,
            Cmd.RESULTS: self._on_results,
            Cmd.GIVEBACK: self._on_giveback,
            Cmd.LEAVING: self._on_leaving,
            Cmd.GOODBYE: self._on_goodbye,
            Cmd.PROGRESS: self.observer.on_progress,
            Cmd.OUTPUT: self.observer.on_output,
            # clients
            Cmd.HELLO: self._on_hello,
            Cmd.SUBMIT: self._on_submit,
            Cmd.WATCH: self._on_watch,
            Cmd.CANCEL_JOBS: self._on_cancel,
            Cmd.STATUS: self._on_status,
            Cmd.JOB_INFO: self._on_job_info,
            Cmd.JOBS: self.observer.on_jobs,
            Cmd.LOGS: self.observer.on_logs,
            Cmd.ACK: self._on_ack,
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
        router.setsockopt(zmq.SNDHWM, 0)  # never block or drop on a slow peer; clients bound their windows
        router.setsockopt(zmq.LINGER, 500)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        self._gate.secure(self._ctx, router)  # with keys: a CurveZMQ server, its ZAP handler up before bind
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

    def _wake(self) -> None:
        """Wake the loop from another thread (or a signal handler)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _about(self) -> dict[str, Any]:
        """Who this dispatcher is, for status views."""
        return {"instance": self.instance, "endpoint": self.endpoint, "malformed": self.malformed}

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> None:
        if self._router is None:
            self.bind()
        router = self._router
        assert router is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        zap = self._gate.zap_socket
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        if self.journal is not None:
            self._recover(self.journal)
        log.info("dispatcher %s listening on %s", self.instance, self.endpoint)
        try:
            while not self._stopping:
                now = time.monotonic()
                deadline = next_heartbeat
                timer = self.scheduler.next_timer()
                if timer is not None:
                    deadline = min(deadline, timer)
                deadline = min(deadline, self.observer.next_tick)  # once a second: statistics, snapshots
                if self._commit_at is not None:
                    deadline = min(deadline, self._commit_at)
                events = dict(poller.poll(max(0, int((deadline - now) * 1000) + 1)))
                if self._wake_r.fileno() in events:
                    self._drain_wakeups()
                if zap is not None and zap in events:
                    self._gate.serve_zap(time.monotonic())  # handshakes: accept authorized keys only
                if router in events:
                    self._receive(router)
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._heartbeat(now)
                    next_heartbeat = now + self.heartbeat_interval
                self.scheduler.tick(now)
                self.observer.tick(now)
                self.scheduler.schedule(now)
                self._flush()
            self._shutdown()
        finally:
            if self.journal is not None:
                self.journal.close()
            router.close(linger=500)
            self._gate.close()
            self._wake_r.close()
            self._wake_w.close()

    def _recover(self, journal: Journal) -> None:
        """Load the journal: finished jobs keep their results, unfinished ones are queued to run again."""
        now, now_wall = time.monotonic(), time.time()
        expired = journal.expire(now_wall)
        n_done = n_again = 0
        for stored in journal.load():
            try:
                opts = c.options_from_raw(stored.opts)
            except ValueError as exc:  # written by an older version, or damaged: skip it, keep the rest
                log.error("journal: job %s has unusable options (%s); dropped", stored.id, exc)
                journal.forgotten(stored.id)
                continue
            if stored.state in FINISHED_STATES:
                remaining = (stored.expires_at or now_wall) - now_wall
                self.scheduler.restore_finished(
                    stored.id, opts, stored.owner, stored.state, stored.attempts,
                    shift_history(stored.history, now - now_wall),  # the journal keeps wall-clock times
                    stored.result_info, list(stored.result_frames), finished_at=now - (self.result_ttl - remaining),
                )
                n_done += 1
            else:
                self.scheduler.submit(stored.id, opts, list(stored.frames), stored.owner, now)
                n_again += 1
        self.scheduler.take_actions()  # nobody to deliver to yet: owners re-attach when they reconnect
        log.info(
            "journal %s: %d finished job(s) restored, %d unfinished job(s) queued again, %d expired",
            journal.path, n_done, n_again, expired,
        )

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _shutdown(self) -> None:
        """Tell every worker and client we are going, so they reconnect instead of waiting out liveness."""
        if self.journal is not None:  # what the group commit still held: durable, then acknowledged
            self._commit(self.journal)
        body = c.Shutdown(self.instance)
        for peer in [*self.scheduler.workers, *self._clients]:
            self._send(peer, Cmd.SHUTDOWN, body)
        log.info("dispatcher %s stopped", self.instance)

    # --- receiving --------------------------------------------------------------------------------

    def _receive(self, router: zmq.Socket[Any]) -> None:
        gate = self._gate
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            peer = parts[0].bytes
            allowed = gate.screen(peer, parts[-1], now) if gate.screening else ANY_COMMAND
            if allowed is None:
                continue  # quarantined, or its key was revoked: dropped unread
            try:
                cmd, raw, frames = split(parts[1:])
                handler = self._handlers.get(cmd)
                if handler is None:
                    self._malformed(peer, f"unexpected command {cmd.name}", now)
                    continue
                if allowed is not ANY_COMMAND and cmd not in allowed:
                    self._forbidden(peer, cmd, now)  # e.g. a client key sending READY
                    continue
                body = c.decode_body(cmd, raw)
            except VersionMismatch as exc:
                self._send(peer, Cmd.ERROR, {"code": "version", "message": str(exc)})
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
            self._send(peer, Cmd.ERROR, {"code": "forbidden", "message": reason})

    def _drop_peer(self, peer: bytes, why: str, now: float) -> None:
        """Forget a quarantined or revoked peer: a worker's registration (its jobs queue again), a client's ping."""
        w = self.scheduler.workers.get(peer)
        self.scheduler.worker_gone(peer, now)
        self._clients.pop(peer, None)
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
        self._send(peer, Cmd.HEARTBEAT, self._beat_body)
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

    def _on_leaving(self, peer: bytes, b: c.Empty, frames: list[Any], now: float) -> None:
        self.scheduler.heard_from(peer, now)
        self.scheduler.worker_leaving(peer)

    def _on_goodbye(self, peer: bytes, b: c.Empty, frames: list[Any], now: float) -> None:
        w = self.scheduler.workers.get(peer)
        self.scheduler.worker_gone(peer, now)
        if w is not None:
            log.info("worker %s left", w.name)

    def _on_heartbeat(self, peer: bytes, b: c.Heartbeat, frames: list[Any], now: float) -> None:
        if b.role == "worker":
            if not self.scheduler.heard_from(peer, now):
                self._send(peer, Cmd.RECONNECT, c.Reconnect(self.instance))
        else:  # a client's ping: answer, so it knows we are alive and which instance we are
            self._clients[peer] = now
            if b.ack is not None:  # it also acknowledges JOB_DONE, in case an ACK was lost
                self.scheduler.acked(peer, b.ack)
            self._send(peer, Cmd.HEARTBEAT, self._beat_body)

    # --- client commands ----------------------------------------------------------------------------

    def _on_hello(self, peer: bytes, b: c.Hello, frames: list[Any], now: float) -> None:
        self._clients[peer] = now
        self._send(peer, Cmd.WELCOME, c.Welcome(self.instance, self.heartbeat_interval, b.req))

    def _on_submit(self, peer: bytes, entries: list[c.SubmitEntry], frames: list[Any], now: float) -> None:
        per_entry = split_frames([e.n_frames for e in entries], frames)
        accepted: list[str] = []
        rejected: list[tuple[str, str]] = []
        busy: list[str] = []
        jobs = self.scheduler.jobs
        submits = self.observer.submits
        last_raw = b""
        last_opts: c.TaskOptions | None = None
        last_stored = b""
        for e, data in zip(entries, per_entry, strict=True):
            job_id = e.job_id
            try:
                raw = bytes(e.options)
                if last_opts is None or raw != last_raw:  # a batch's tasks mostly share their options' bytes
                    last_opts = c.options_from_raw(e.options)
                    last_raw = raw
                    last_stored = last_opts.to_wire()  # journaled as the known fields only
                opts = last_opts
                if not data:
                    raise ValueError("a task needs its call frames")
            except ValueError as exc:
                rejected.append((job_id, str(exc)))
                continue
            is_new = job_id not in jobs
            if is_new and self.scheduler.n_queued >= self.max_queued:
                busy.append(job_id)  # backpressure: the client re-sends these a little later
                continue
            job = self.scheduler.submit(job_id, opts, data, peer, now)
            if is_new:
                submits[opts.fn] = submits.get(opts.fn, 0) + 1
            if is_new and self.journal is not None:
                self.journal.submitted(job_id, job.seq, peer, last_stored, data)
            accepted.append(job_id)
        reply = c.Accepted(accepted, rejected, busy)
        if self.journal is None:
            self._send(peer, Cmd.ACCEPTED, reply)
        else:
            self._acks.append((peer, reply))

    def _on_ack(self, peer: bytes, b: c.Ack, frames: list[Any], now: float) -> None:
        self._clients[peer] = now
        self.scheduler.acked(peer, b.seq)

    def _on_watch(self, peer: bytes, b: c.Ids, frames: list[Any], now: float) -> None:
        unknown = self.scheduler.watch(peer, b.ids)
        if unknown:
            entries = [c.JobDoneEntry(job_id, "unknown", {"error": _unknown_job(job_id)}, 0) for job_id in unknown]
            self._send(peer, Cmd.JOB_DONE, c.JobDone(self.scheduler.deliveries.number(peer), entries))

    def _on_cancel(self, peer: bytes, b: c.CancelJobs, frames: list[Any], now: float) -> None:
        done = [job_id for job_id in b.ids if self.scheduler.cancel(job_id, now)]
        self._send(peer, Cmd.CANCELLED, c.Cancelled(done, b.req))

    def _on_status(self, peer: bytes, b: c.Request, frames: list[Any], now: float) -> None:
        status = self.scheduler.status(now)
        status["dispatcher"] = {"instance": self.instance, "endpoint": self.endpoint, "pid": os.getpid()}
        self.observer.decorate_status(status, now)
        status["req"] = b.req
        status["totals"]["malformed"] = self.malformed
        status["security"] = self._gate.status()
        self._send(peer, Cmd.STATUS_REPLY, status)

    def _on_job_info(self, peer: bytes, b: c.Ids, frames: list[Any], now: float) -> None:
        views: list[dict[str, Any] | None] = []
        offset = wall_clock_offset()
        for job_id in b.ids:
            job = self.scheduler.jobs.get(job_id)
            if job is None:
                views.append(None)
                continue
            views.append(self.observer.decorate_view(wall_clock_view(self.scheduler.job_view(job), offset), now))
        self._send(peer, Cmd.JOB_INFO_REPLY, c.JobInfoReply(views, b.req))

    # --- sending ----------------------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        for peer, why in self._gate.tick(now):  # keys removed from authorized/: tell, block and forget
            self._send(peer, Cmd.ERROR, {"code": "forbidden", "message": why})
            self._gate.revoke(peer, now)
            self._drop_peer(peer, why, now)
        for peer, seen in list(self._clients.items()):
            if now - seen > CLIENT_GONE_S:  # clients ping every second; this one is gone
                del self._clients[peer]
                self.scheduler.client_gone(peer)
        for w in self.scheduler.expire_workers(now):
            self.observer.heartbeat_missed()
            log.warning("worker %s (pid %d on %s) missed its heartbeats: lost", w.name, w.pid, w.host)
        for wid, w in list(self.scheduler.workers.items()):  # each acknowledges that worker's RESULTS
            self._send(wid, Cmd.HEARTBEAT, c.Heartbeat("dispatcher", self.instance, self.heartbeat_interval,
                                                       w.results_acked))

    def _flush(self) -> None:
        """Send what the scheduler decided, record it in the journal, and once the commit window has
        passed make it durable and acknowledge the submissions it holds.

        Results may go out before the commit: if we crash first, the job is still unfinished in the
        journal and runs again, and the client drops the duplicate. Acknowledgements may not.
        """
        for action in self.scheduler.take_actions():
            if isinstance(action, Assign):
                self._send_assign(action)
            elif isinstance(action, Deliver):
                self._send_done(action)
            elif isinstance(action, CancelRunning):
                self._send(action.worker, Cmd.CANCEL, c.Cancel(action.job_id, action.attempt))
            elif isinstance(action, Resend):
                self._send(action.worker, Cmd.RESEND, c.Resend(action.seq))
        finished, forgotten = self.scheduler.drain_finished(), self.scheduler.drain_forgotten()
        self.observer.turn(finished, forgotten)  # drained every turn, journal or not (they would pile up)
        journal = self.journal
        if journal is None:
            return
        wall = time.time()
        offset = wall - time.monotonic()
        gone = set(forgotten)  # delivered and dropped this turn: nothing to write (journal.forgotten below)
        for job in finished:
            if job.id in gone:
                continue
            journal.finished(
                job.id, job.state, job.attempt, shift_history(job.history, offset), job.result_info, job.result_frames,
                expires_at=wall + self.result_ttl,
            )
        for job_id in forgotten:
            journal.forgotten(job_id)
        # Group commit: the first turn with something to write sets a deadline COMMIT_WINDOW ahead; the
        # turns until then add to the same transaction. Jobs that are submitted and finish within the
        # window are never written at all, and ACCEPTED waits for the commit as before.
        now = time.monotonic()
        if self._commit_at is None:
            if not journal.dirty and not self._acks:
                return
            self._commit_at = now + COMMIT_WINDOW
        if now < self._commit_at and not self._stopping:
            return
        self._commit_at = None
        self._commit(journal)

    def _commit(self, journal: Journal) -> None:
        """Make everything recorded durable, then acknowledge the submissions waiting for it."""
        journal.commit()
        self.observer.journal_committed(journal.commits, journal.last_commit_seconds)
        for peer, reply in self._acks:
            self._send(peer, Cmd.ACCEPTED, reply)
        self._acks.clear()

    def _send_assign(self, action: Assign) -> None:
        entries = []
        frames: list[Any] = []
        for job in action.jobs:
            data = job.frames or []
            opts = job.opts
            entries.append(c.AssignEntry(job.id, job.attempt, opts.timeout, opts.retry_on, len(data)))
            frames.extend(data)
        w = self.scheduler.workers.get(action.worker)
        body = c.Assign(w.results_acked if w is not None else 0, entries)
        if not self._send(action.worker, Cmd.ASSIGN, body, frames):
            # The worker vanished between its credit and our send: the jobs go back to the queue.
            now = time.monotonic()
            self.scheduler.worker_gone(action.worker, now)

    def _send_done(self, action: Deliver) -> None:
        """JOB_DONE: the jobs are forgotten once the client acknowledges it (deliveries.py), not now."""
        jobs = action.jobs
        entries = []
        frames: list[Any] = []
        outputs = self.observer.outputs
        offset = wall_clock_offset()
        for job in jobs:
            info: dict[str, Any] = {
                "worker": job.history[-1]["worker"] if job.history else None,
                "attempts": job.attempt,
            }
            if outputs and job.id in outputs:
                info["output"] = self.observer.output_of(job.id)
            if job.state != SUCCEEDED or job.attempt > 1:
                info["history"] = shift_history(job.history, offset)
            if job.state != SUCCEEDED:
                info["error"] = job.result_info
            entries.append(c.JobDoneEntry(job.id, job.state, info, len(job.result_frames)))
            frames.extend(job.result_frames)
        if not self._send(action.client, Cmd.JOB_DONE, c.JobDone(action.seq, entries), frames):
            self.scheduler.delivery_failed(action.client, action.seq)

    def _send(self, peer: bytes, cmd: Cmd, body: Any, frames: list[Any] | None = None) -> bool:
        """Send without ever blocking; False if the peer is not connected."""
        assert self._router is not None
        if self._gate.blocked and not self._gate.may_send(peer, time.monotonic()):
            return False  # quarantined or revoked: nothing more goes to it
        try:
            send_parts(self._router, [peer, *encode(cmd, body, frames or ())], NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        return True


CLIENT_GONE_S = 60.0  # a client silent this long is gone: told nothing more, its unacknowledged deliveries dropped
COMMIT_WINDOW = 0.005  # seconds a journal write may wait for company (and the ACCEPTED of it)


def _unknown_job(job_id: str) -> dict[str, str]:
    return {"kind": "unknown", "type": "UnknownJob", "message": f"no job {job_id} (never submitted, or expired)"}

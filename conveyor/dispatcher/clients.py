"""The dispatcher's client side: the commands clients send, and what goes back to them.

Every handler gets the typed body of its command (conveyor/protocol/commands.py) and runs on the loop
thread; `server.py` routes to them. The rules:
- SUBMIT: each entry accepted, rejected (its own fault, with a reason), busy (no room now, or a pair
  with --require-backup is degraded: sent again later) or refused (it cannot be made durable now: the
  journal's disk is full). ACCEPTED goes out after the journal commit that holds the accepted jobs
  (durability.py).
- JOB_DONE is numbered per client and the jobs it carries are forgotten only once acknowledged (ACK,
  or `ack` in a ping): deliveries.py.
- Requests that read state (STATUS, JOBS, LOGS, JOB_INFO) are answered at most REPLIES_PER_S times a
  second per client and kind: a client that asks in a loop and never reads cannot make the
  dispatcher's send queue grow without bound; the excess is dropped and counted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from conveyor.dispatcher.durability import Durability
from conveyor.dispatcher.graph import UnknownParent
from conveyor.dispatcher.limits import check_key, parse_rule
from conveyor.dispatcher.model import SUCCEEDED, Deliver, shift_history, wall_clock_offset, wall_clock_view
from conveyor.dispatcher.observe.observer import Observer
from conveyor.dispatcher.scheduler import Scheduler
from conveyor.dispatcher.timing import check_limits, due_and_expiry, fix_times
from conveyor.errors import ProtocolError
from conveyor.protocol import Cmd, split_frames
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.transport import shm

log = logging.getLogger("conveyor.dispatcher")

CLIENT_GONE_S = 60.0  # a client silent this long is gone: told nothing more, its unacknowledged deliveries dropped
REPLIES_PER_S = 200  # answers to STATUS, JOBS, LOGS and JOB_INFO per client and kind and second, at most

Send = Callable[[bytes, Cmd, Any], bool]
SendFrames = Callable[[bytes, Cmd, Any, list[Any]], bool]


class ClientSide:
    def __init__(
        self,
        scheduler: Scheduler,
        observer: Observer,
        durability: Durability | None,
        send: SendFrames,
        *,
        instance: str,
        heartbeat_interval: float,
        max_queued: int,
        max_queued_bytes: int,
        decorate_status: Callable[[dict[str, Any], float], None],
    ):
        self.scheduler = scheduler
        self.observer = observer
        self.durability = durability
        self._send = send
        self.instance = instance
        self.heartbeat_interval = heartbeat_interval
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._decorate_status = decorate_status  # the server's part of STATUS_REPLY (security, journal, ...)
        self.beat = c.Heartbeat("dispatcher", instance, heartbeat_interval)
        self.clients: dict[bytes, float] = {}  # client peers by last message time, told when we stop
        self._answered: dict[tuple[bytes, Cmd], tuple[float, int]] = {}  # (peer, kind) -> (second, count)
        self.throttled = 0  # requests dropped by the rate limit
        self.shm = shm.namespace_id()  # told in WELCOME: a client that shares it may send segments
        self.shm_adopted = 0  # segments taken over from clients

    def handlers(self) -> dict[Cmd, Callable[[bytes, Any, list[Any], float], None]]:
        """The commands of clients, and who handles them (the server's routing table takes these)."""
        return {
            Cmd.HELLO: self.on_hello,
            Cmd.SUBMIT: self.on_submit,
            Cmd.WATCH: self.on_watch,
            Cmd.CANCEL_JOBS: self.on_cancel,
            Cmd.STATUS: self._throttled(Cmd.STATUS, self.on_status),
            Cmd.JOB_INFO: self._throttled(Cmd.JOB_INFO, self.on_job_info),
            Cmd.JOBS: self._throttled(Cmd.JOBS, self.observer.on_jobs),
            Cmd.LOGS: self._throttled(Cmd.LOGS, self.observer.on_logs),
            Cmd.ACK: self.on_ack,
            Cmd.LIMITS: self._throttled(Cmd.LIMITS, self.on_limits),
        }

    # --- commands -----------------------------------------------------------------------------------

    def on_hello(self, peer: bytes, b: c.Hello, frames: list[Any], now: float) -> None:
        self.clients[peer] = now
        self._send(peer, Cmd.WELCOME, c.Welcome(self.instance, self.heartbeat_interval, b.req, self.shm), [])

    def on_ping(self, peer: bytes, b: c.Heartbeat, now: float) -> None:
        """A client's HEARTBEAT: answered, so it knows we are alive and which instance we are."""
        self.clients[peer] = now
        if b.ack is not None:  # it also acknowledges JOB_DONE, in case an ACK was lost
            self.scheduler.acked(peer, b.ack)
        self._send(peer, Cmd.HEARTBEAT, self.beat, [])

    def on_ack(self, peer: bytes, b: c.Ack, frames: list[Any], now: float) -> None:
        self.clients[peer] = now
        self.scheduler.acked(peer, b.seq)

    def on_submit(self, peer: bytes, entries: list[c.SubmitEntry], frames: list[Any], now: float) -> None:
        per_entry = split_frames([e.n_frames for e in entries], frames)
        reply = _Reply()
        if any(e.shm for e in entries):
            entries, per_entry = _adopt_segments(entries, per_entry, reply)
            self.shm_adopted += sum(len(e.shm) for e in entries)
        checker = _Checker(self.scheduler, now)
        i = 0
        while i < len(entries):
            batch = entries[i].batch
            j = i + 1
            if batch:  # the entries of a batch come together and are accepted all or none
                while j < len(entries) and entries[j].batch == batch:
                    j += 1
            self._submit_group(peer, entries[i:j], per_entry[i:j], checker, reply, now, atomic=bool(batch))
            i = j
        durability = self.durability
        if reply.refused and durability is not None:
            durability.committer.refused += len(reply.refused)
        accepted = c.Accepted(reply.accepted, reply.rejected, reply.busy, reply.refused)
        if durability is None or not reply.accepted:
            self._send(peer, Cmd.ACCEPTED, accepted, [])  # nothing waits for the disk
        else:
            durability.reply(peer, accepted)

    def _submit_group(
        self, peer: bytes, entries: list[c.SubmitEntry], per_entry: list[list[Any]], checker: _Checker,
        reply: _Reply, now: float, atomic: bool,
    ) -> None:
        """Check then submit entries (a batch: all or none; else each on its own)."""
        scheduler = self.scheduler
        durability = self.durability
        checked: list[tuple[c.SubmitEntry, list[Any], _Checked]] = []
        earlier: set[str] = set()  # ids checked so far: a dependant may name a parent earlier in its batch
        new_data = 0
        for e, data in zip(entries, per_entry, strict=True):
            try:
                ok = checker.check(e, data, earlier)
            except ValueError as exc:
                kind = (perr.UNKNOWN_DEPENDENCY,) if isinstance(exc, UnknownParent) else ()
                if not atomic:
                    reply.rejected.append((e.job_id, str(exc), *kind))
                    continue
                why = f"the batch was not accepted: {e.job_id}: {exc}"
                reply.rejected += [(x.job_id, why, *kind) for x in entries]
                return
            checked.append((e, data, ok))
            earlier.add(e.job_id)
            if e.job_id not in scheduler.jobs:
                new_data += _nbytes(data)
        new = [x for x in checked if x[0].job_id not in scheduler.jobs]
        if new and durability is not None and not durability.accepting:
            if atomic:
                reply.refused += [(x.job_id, durability.reason) for x in entries]
                return
            reply.refused += [(e.job_id, durability.reason) for e, _, _ in new]
            checked = [x for x in checked if x[0].job_id in scheduler.jobs]
        if new and durability is not None and durability.needs_replica:  # --require-backup, degraded
            durability.replica.held_back += len(entries) if atomic else len(new)
            if atomic:
                reply.busy += [x.job_id for x in entries]
                return
            reply.busy += [e.job_id for e, _, _ in new]
            checked = [x for x in checked if x[0].job_id in scheduler.jobs]
            new = []
        waiting = scheduler.n_queued + scheduler.n_scheduled + scheduler.n_limited + scheduler.n_waiting
        full = (waiting + (len(new) if atomic else 1) > self.max_queued) or (
            scheduler.held_bytes > 0 and scheduler.held_bytes + (new_data if atomic else 0) > self.max_queued_bytes
        )
        if new and full and atomic:
            reply.busy += [x.job_id for x in entries]  # backpressure: the client sends them again later
            return
        for e, data, ok in checked:
            if e.job_id in scheduler.jobs:  # a re-send: never busy, never refused (it is held already)
                scheduler.submit(e.job_id, ok.opts, data, peer, now)
                reply.accepted.append(e.job_id)
                continue
            if not atomic and (
                scheduler.n_queued + scheduler.n_scheduled + scheduler.n_limited + scheduler.n_waiting
                >= self.max_queued
                or (scheduler.held_bytes and scheduler.held_bytes + _nbytes(data) > self.max_queued_bytes)
            ):
                reply.busy.append(e.job_id)
                continue
            try:
                job = scheduler.submit(e.job_id, ok.opts, data, peer, now, ok.due, ok.expires, e.parents, e.after,
                                       e.allow_failure)
            except UnknownParent as exc:  # checked already; only a bug gets here
                reply.rejected.append((e.job_id, str(exc), perr.UNKNOWN_DEPENDENCY))
                continue
            self.observer.submits[ok.opts.fn] = self.observer.submits.get(ok.opts.fn, 0) + 1
            if durability is not None:
                durability.submitted(job, peer, ok.stored, data, _deps(e))
            reply.accepted.append(e.job_id)

    def on_watch(self, peer: bytes, b: c.Ids, frames: list[Any], now: float) -> None:
        unknown = self.scheduler.watch(peer, b.ids)
        if unknown:
            entries = [c.JobDoneEntry(job_id, "unknown", {"error": _unknown_job(job_id)}, 0) for job_id in unknown]
            self._send(peer, Cmd.JOB_DONE, c.JobDone(self.scheduler.deliveries.number(peer), entries), [])

    def on_cancel(self, peer: bytes, b: c.CancelJobs, frames: list[Any], now: float) -> None:
        done = [job_id for job_id in b.ids if self.scheduler.cancel(job_id, now)]
        self._send(peer, Cmd.CANCELLED, c.Cancelled(done, b.req), [])

    def on_status(self, peer: bytes, b: c.Request, frames: list[Any], now: float) -> None:
        status = self.scheduler.status(now)
        status["dispatcher"] = {"instance": self.instance, "pid": os.getpid()}
        self.observer.decorate_status(status, now)
        self._decorate_status(status, now)
        status["totals"]["throttled"] = self.throttled
        status["req"] = b.req
        self._send(peer, Cmd.STATUS_REPLY, status, [])

    def on_job_info(self, peer: bytes, b: c.Ids, frames: list[Any], now: float) -> None:
        views: list[dict[str, Any] | None] = []
        offset = wall_clock_offset()
        for job_id in b.ids:
            job = self.scheduler.jobs.get(job_id)
            if job is None:
                views.append(None)
                continue
            views.append(self.observer.decorate_view(wall_clock_view(self.scheduler.job_view(job), offset), now))
        self._send(peer, Cmd.JOB_INFO_REPLY, c.JobInfoReply(views, b.req), [])

    def on_limits(self, peer: bytes, b: c.LimitsRequest, frames: list[Any], now: float) -> None:
        """LIMITS: set or remove rules at run time (all or none), then list every key."""
        error = None
        try:
            rules = {key: None if rule is None else parse_rule(rule) for key, rule in b.set.items()}
            for key in rules:
                check_key(key)
        except ValueError as exc:
            error = str(exc)
        else:
            for key, rule in rules.items():
                if rule is None:
                    self.scheduler.limits.remove(key)
                else:
                    self.scheduler.limits.declare(key, rule, now)
                log.info("limit %s: %s", key, rule if rule is not None else "removed")
        self._send(peer, Cmd.LIMITS_REPLY, c.LimitsReply(self.scheduler.limits_view(now), error, b.req), [])

    # --- outcomes -----------------------------------------------------------------------------------

    def send_done(self, action: Deliver) -> None:
        """JOB_DONE: the jobs are forgotten once the client acknowledges it (deliveries.py), not now."""
        entries = []
        frames: list[Any] = []
        outputs = self.observer.outputs
        offset = wall_clock_offset()
        for job in action.jobs:
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
            if job.id in action.withhold:  # its dependants use it; the client fetches it if it asks (WATCH)
                entries.append(c.JobDoneEntry(job.id, job.state, info, 0, withheld=True))
                continue
            entries.append(c.JobDoneEntry(job.id, job.state, info, len(job.result_frames)))
            frames.extend(job.result_frames)
        if not self._send(action.client, Cmd.JOB_DONE, c.JobDone(action.seq, entries), frames):
            self.scheduler.delivery_failed(action.client, action.seq)

    def expire(self, now: float) -> None:
        """Forget clients not heard from for CLIENT_GONE_S (they ping every second)."""
        for peer, seen in list(self.clients.items()):
            if now - seen > CLIENT_GONE_S:
                del self.clients[peer]
                self.scheduler.client_gone(peer)
        second = int(now)
        self._answered = {k: v for k, v in self._answered.items() if v[0] == second}

    def _throttled(
        self, kind: Cmd, handler: Callable[[bytes, Any, list[Any], float], None]
    ) -> Callable[[bytes, Any, list[Any], float], None]:
        def limited(peer: bytes, body: Any, frames: list[Any], now: float) -> None:
            second = int(now)
            at, n = self._answered.get((peer, kind), (second, 0))
            if at != second:
                n = 0
            if n >= REPLIES_PER_S:
                self.throttled += 1
                if self.throttled in (1, 100, 10_000) or self.throttled % 100_000 == 0:
                    log.warning("a client asks more than %d %s a second: the rest go unanswered (%d so far)",
                                REPLIES_PER_S, kind.name, self.throttled)
                return
            self._answered[(peer, kind)] = (second, n + 1)
            self.clients[peer] = now
            handler(peer, body, frames, now)

        return limited


class _Reply:
    """The four lists of one ACCEPTED."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.rejected: list[tuple[str, ...]] = []  # (id, reason) or (id, reason, kind)
        self.busy: list[str] = []
        self.refused: list[tuple[str, str]] = []


class _Checked:
    __slots__ = ("due", "expires", "opts", "stored")

    def __init__(self, opts: c.TaskOptions, stored: bytes, due: float | None, expires: float | None):
        self.opts, self.stored, self.due, self.expires = opts, stored, due, expires


class _Checker:
    """Checks SUBMIT entries; entries mostly share their options' bytes, so options are read once."""

    def __init__(self, scheduler: Scheduler, now: float):
        self.scheduler = scheduler
        self.now = now
        self.wall = time.time()
        self._raw = b""
        self._last: _Checked | None = None
        self._last_dependant = False

    def check(self, e: c.SubmitEntry, data: list[Any], earlier: set[str]) -> _Checked:
        """ValueError with the reason this entry cannot be accepted (its parents may be earlier entries)."""
        if not data:
            raise ValueError("a task needs its call frames")
        dependant = bool(e.parents or e.after)
        raw = bytes(e.options)
        if self._last is None or raw != self._raw or dependant != self._last_dependant:
            opts = c.options_from_raw(e.options)
            # A dependant's countdown and expiry count from when its parents are done, not from now.
            fixed = opts if dependant else fix_times(opts, self.wall)
            if dependant and fixed.eta is not None and fixed.expires_at is not None and fixed.eta >= fixed.expires_at:
                raise ValueError("the job would expire before it is due (eta after expires)")
            check_limits(fixed, self.scheduler.limits)
            due, expires = due_and_expiry(fixed, self.now, self.wall)
            self._last = _Checked(fixed, fixed.to_wire(), due, expires)
            self._raw, self._last_dependant = raw, dependant
        jobs = self.scheduler.jobs
        for parent in (*e.parents, *e.after):
            if parent not in jobs and parent not in earlier:
                raise UnknownParent(e.job_id, parent)
        named = frozenset((*e.parents, *e.after)) if e.allow_failure else frozenset()
        for parent in e.allow_failure:
            if parent not in named:
                raise ValueError(f"allow_failure names {parent}, which is not a parent")
        return self._last


def _adopt_segments(
    entries: list[c.SubmitEntry], per_entry: list[list[Any]], reply: _Reply
) -> tuple[list[c.SubmitEntry], list[list[Any]]]:
    """The call frames a client left in shared memory, taken over and mapped in place of their empty
    frames (transport/shm.py). An entry whose segment cannot be read is rejected (with its batch)."""
    bad: dict[str, str] = {}
    for e, data in zip(entries, per_entry, strict=True):
        for ref in e.shm:
            if ref.index >= len(data) or len(data[ref.index]) != 0:
                raise ProtocolError("a shared-memory reference names a frame that is not an empty frame of its entry")
            try:
                data[ref.index] = shm.adopt(ref.name, ref.nbytes)
            except OSError as exc:
                bad[e.job_id] = f"its shared-memory argument cannot be read here: {exc}"
    if not bad:
        return entries, per_entry
    failed_batches = {e.batch for e in entries if e.job_id in bad and e.batch}
    kept: tuple[list[c.SubmitEntry], list[list[Any]]] = ([], [])
    for e, data in zip(entries, per_entry, strict=True):
        why = bad.get(e.job_id)
        if why is None and e.batch in failed_batches:
            why = "the batch was not accepted: a shared-memory argument cannot be read here"
        if why is None:
            kept[0].append(e)
            kept[1].append(data)
        else:
            reply.rejected.append((e.job_id, why))
    return kept


def _deps(e: c.SubmitEntry) -> bytes | None:
    """What the journal keeps of a job's parents (None: it has none)."""
    if not (e.parents or e.after):
        return None
    return c.encode_body([list(e.parents), list(e.after), list(e.allow_failure)])


def _nbytes(frames: list[Any]) -> int:
    return sum(map(len, frames))  # bytes or zmq.Frame: len is the size in bytes


def _unknown_job(job_id: str) -> dict[str, str]:
    return {"kind": "unknown", "type": "UnknownJob", "message": f"no job {job_id} (never submitted, or expired)"}

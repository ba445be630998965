"""The dispatcher's client side: the commands clients send, and what goes back to them.

Every handler gets the typed body of its command (conveyor/protocol/commands.py) and runs on the loop
thread; `server.py` routes to them. The rules:
- SUBMIT: each entry accepted, rejected (its own fault, with a reason), busy (no room now: sent again
  later) or refused (it cannot be made durable now: the journal's disk is full). ACCEPTED goes out
  after the journal commit that holds the accepted jobs (durability.py).
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
from conveyor.dispatcher.limits import KEY_RE, parse_rule
from conveyor.dispatcher.model import SUCCEEDED, Deliver, shift_history, wall_clock_offset, wall_clock_view
from conveyor.dispatcher.observe.observer import Observer
from conveyor.dispatcher.scheduler import Scheduler
from conveyor.dispatcher.timing import check_limits, due_and_expiry, fix_times
from conveyor.protocol import Cmd, split_frames
from conveyor.protocol import commands as c

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
        self._send(peer, Cmd.WELCOME, c.Welcome(self.instance, self.heartbeat_interval, b.req), [])

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
        accepted: list[str] = []
        rejected: list[tuple[str, str]] = []
        busy: list[str] = []
        refused: list[tuple[str, str]] = []
        scheduler = self.scheduler
        jobs = scheduler.jobs
        submits = self.observer.submits
        durability = self.durability
        durable = durability is None or durability.accepting
        last_raw = b""
        last_opts: c.TaskOptions | None = None
        last_stored = b""
        due: float | None = None
        expires: float | None = None
        wall = time.time()
        for e, data in zip(entries, per_entry, strict=True):
            job_id = e.job_id
            try:
                raw = bytes(e.options)
                if last_opts is None or raw != last_raw:  # a batch's tasks mostly share their options' bytes
                    fixed = fix_times(c.options_from_raw(e.options), wall)  # countdown -> eta, ...
                    check_limits(fixed, scheduler.limits)
                    due, expires = due_and_expiry(fixed, now, wall)
                    last_opts, last_raw = fixed, raw
                    last_stored = fixed.to_wire()  # journaled as the known fields only, times absolute
                opts = last_opts
                if not data:
                    raise ValueError("a task needs its call frames")
            except ValueError as exc:
                rejected.append((job_id, str(exc)))
                continue
            if job_id in jobs:  # a re-send: never busy, never refused (it is held already)
                scheduler.submit(job_id, opts, data, peer, now)
                accepted.append(job_id)
                continue
            if not durable:
                assert durability is not None
                refused.append((job_id, durability.reason))
                continue
            if scheduler.n_queued + scheduler.n_scheduled + scheduler.n_limited >= self.max_queued or (
                scheduler.held_bytes and scheduler.held_bytes + _nbytes(data) > self.max_queued_bytes
            ):
                busy.append(job_id)  # backpressure: the client re-sends these a little later
                continue
            job = scheduler.submit(job_id, opts, data, peer, now, due, expires)
            submits[opts.fn] = submits.get(opts.fn, 0) + 1
            if durability is not None:
                durability.submitted(job, peer, last_stored, data)
            accepted.append(job_id)
        if refused and durability is not None:
            durability.committer.refused += len(refused)
        reply = c.Accepted(accepted, rejected, busy, refused)
        if durability is None or not accepted:
            self._send(peer, Cmd.ACCEPTED, reply, [])  # nothing waits for the disk
        else:
            durability.reply(peer, reply)

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
                if not KEY_RE.match(key):
                    raise ValueError(f"bad limit key {key!r}")
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


def _nbytes(frames: list[Any]) -> int:
    return sum(len(f) if type(f) is bytes else memoryview(f).nbytes for f in frames)


def _unknown_job(job_id: str) -> dict[str, str]:
    return {"kind": "unknown", "type": "UnknownJob", "message": f"no job {job_id} (never submitted, or expired)"}

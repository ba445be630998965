"""The client's side of the wire: one DEALER socket owned by one background I/O thread.

This module is over 500 lines on purpose: it is one state machine (what is pending, watched and asked
for, and how it is asked for again after a broken connection) and its socket loop, read top to bottom.

ZeroMQ sockets are not thread-safe, so the socket belongs to whoever holds `_sock_lock`: the I/O
thread, except while it sleeps in poll. User threads append work to thread-safe queues and wake the
I/O thread through a socketpair; only a submission to an idle connection (nothing else pending, one
call at a time) is sent by the calling thread itself, which saves a thread hop on the round trip.
The I/O thread batches every submission that arrived since its last turn into one SUBMIT message,
resolves futures from JOB_DONE batches, answers requests (status, job info, cancel) and pings the
dispatcher.

Nothing hangs after a broken link (docs/protocol.md §12): ZeroMQ drops whatever it had queued on a TCP
connection that breaks, in either direction (SUBMIT, ACCEPTED, JOB_DONE, replies). The client notices
a new TCP connection (a second successful handshake on its socket monitor), a gap in the JOB_DONE
numbers, or a new dispatcher instance, and then *resyncs*: it sends again every pending job (SUBMIT,
same ids: idempotent), the cancellations of cancelled ones, one WATCH of everything it watches and, after
a new connection, every request still unanswered. TCP keepalive on the socket makes the kernel tear down a
half-open connection (a peer gone without a reset), so that libzmq reconnects instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import msgspec
import zmq

from conveyor.client.deps import Batching, Deps
from conveyor.client.future import WITHHELD, JobFuture
from conveyor.errors import AccessDenied, DispatcherUnavailable, VersionMismatch
from conveyor.protocol import Cmd, ProtocolError, encode, split_frames
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.protocol.frames import split, unpack
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.protocol.payload import decode_value
from conveyor.security.keys import PeerCredentials
from conveyor.transport import shm
from conveyor.transport.failover import Failover
from conveyor.transport.handshake import watch_handshakes
from conveyor.transport.sockets import configure_socket, has_message, keep_links_alive, recv_waiting, send_parts

log = logging.getLogger("conveyor.client")

_REPLIES = frozenset({
    Cmd.STATUS_REPLY, Cmd.JOB_INFO_REPLY, Cmd.CANCELLED, Cmd.JOBS_REPLY, Cmd.LOGS_REPLY,
    Cmd.LIMITS_REPLY, Cmd.SCHEDULE_REPLY,
})
_NO_OPTIONS = msgspec.Raw(b"\xc0")  # nil: the dispatcher's defaults

SUBMIT_BATCH = 2048  # tasks per SUBMIT message at most
# ... and about this many bytes of call frames (a larger job goes alone): a dispatcher reads a message
# whole, so this bounds what one SUBMIT costs it in memory, and what a busy one costs to send again.
SUBMIT_BATCH_BYTES = 8 << 20
# An ACK waits this long for a message to go out with, usually the caller's next SUBMIT: sent together,
# they wake the dispatcher once, where an ACK of its own would cost three wake-ups (ours, ZeroMQ's I/O
# threads, the dispatcher's loop) on every lone round trip.
ACK_DELAY_S = 0.002  # under the commit window (5 ms): a lone job is still forgotten before its commit, never written
CLOSE_LINGER_MS = 200  # closing with an ACK just sent: ZeroMQ gets this long to deliver it
BUSY_RETRY_S = 0.2  # a job the dispatcher had no room for is sent again this much later (§6 ACCEPTED)
LINK_TIMEOUT_BEATS = 5  # a dead TCP connection is torn down within this many heartbeat intervals (5 s at least)
ALIVE_BEATS = 3  # the dispatcher counts as reachable if heard from within this many intervals


class Connection:
    def __init__(
        self,
        address: str,
        *,
        heartbeat_interval_s: float = 1.0,
        reconnect_timeout_s: float = 60.0,
        max_pending: int = 100_000,
        context: zmq.Context[Any] | None = None,
        credentials: PeerCredentials | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ):
        self.failover = Failover(address)  # several addresses: a standby pair (docs/standby.md)
        self.address = self.failover.current
        self.credentials = credentials  # CurveZMQ keys (docs/security.md), or None
        self.max_message_size = max_message_size  # bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.max_pending = max_pending  # jobs
        self.client_id = uuid.uuid4().hex[:10]
        self._ids = itertools.count(1)
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # submitters wait here when max_pending is reached
        self._acceptance = threading.Condition(self._lock)  # job_states waits here for ACCEPTED
        self._accept_waiters = 0
        self._woken = False
        self._submits: deque[JobFuture] = deque()  # submitted, not sent yet
        self._commands: deque[tuple[Cmd, Any, Sequence[Any]]] = deque()  # (cmd, body, data frames)
        self._pending: dict[str, JobFuture] = {}  # until JOB_DONE (or a rejection) resolves them
        self._watchers: dict[str, list[Future[Any]]] = {}
        # Unanswered requests, by req: (cmd, body, future, data frames).
        self._requests: dict[int, tuple[Cmd, dict[str, Any], Future[Any], Sequence[Any]]] = {}
        self._instance: str | None = None
        self._done_seq = 0  # the highest JOB_DONE number received (acknowledged with ACK)
        self._acked_seq = 0
        self._ack_at = 0.0  # when an ACK of _done_seq goes out at the latest (0: nothing to acknowledge)
        self._sends = 0  # messages sent: an ACK due goes with whatever else leaves in the same turn
        self._resync_why: str | None = None  # set when something may have been lost: resync this turn
        self._resend_requests = False
        self.resyncs = 0  # times everything pending was asked for again (after a gap, a reconnection, ...)
        self.duplicate_results = 0  # outcomes for jobs already resolved here (after re-sends); dropped
        self._busy: list[str] = []  # jobs the dispatcher had no room for: re-sent after a pause
        self._shm = False  # the dispatcher shares our /dev/shm (WELCOME): large arguments go as segments
        self._segments: dict[str, list[str]] = {}  # job id -> its segments, until ACCEPTED answers (shm.py)
        self._busy_at = 0.0
        # Outcomes taken off _pending and not yet given to their futures (see _resolve_many).
        self._settling: list[tuple[list[Any], list[tuple[JobFuture | None, list[Future[Any]] | None]]]] = []
        self._fatal: BaseException | None = None
        self._closing = False
        self._last_heard = 0.0  # monotonic time of the dispatcher's last message (0: never)
        # The socket, and the lock that owns it: the I/O thread holds it except while it waits in poll,
        # so that a submission to an idle connection can be sent from the calling thread (see submit).
        self._sock: zmq.Socket[Any] | None = None
        self._sock_lock = threading.Lock()
        self.batching = Batching()  # the batch each thread fills, if any (deps.batch)
        self.submitter: Any = None  # the client that owns this connection (JobFuture.then submits through it)
        self.welcome: Future[dict[str, Any]] = Future()  # WELCOME (or a first HEARTBEAT) arrived
        self.closed: Future[None] = Future()  # the I/O thread has ended and released everything
        self._thread = threading.Thread(target=self._run, name="conveyor-client-io", daemon=True)
        self._thread.start()

    # --- API for user threads -----------------------------------------------------------------------

    @property
    def fatal(self) -> BaseException | None:
        """The error that ended this connection for good (lost dispatcher, refused key), or None."""
        return self._fatal

    @property
    def closing(self) -> bool:
        """close() was called."""
        return self._closing

    def new_job_id(self) -> str:
        return f"{self.client_id}-{next(self._ids):x}"

    def connect(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the dispatcher's WELCOME; raise DispatcherUnavailable if it does not come in time."""
        try:
            return self.welcome.result(timeout_s)
        except TimeoutError:
            self.close()
            raise self.no_answer(timeout_s) from None
        except BaseException:
            self.close()
            raise

    def no_answer(self, timeout_s: float) -> DispatcherUnavailable:
        return DispatcherUnavailable(f"no Conveyor dispatcher answered at {self.address} within {timeout_s:g} s")

    def submit(self, job_id: str, opts: msgspec.Raw, frames: Sequence[Any], deps: Deps | None = None) -> JobFuture:
        # A tuple of bytes, unlike a list, drops out of the garbage collector's sight at its first pass.
        future = JobFuture(job_id, self, opts, tuple(frames))
        batch = self.batching.batch
        if deps is not None:
            future._deps = deps
        if batch is not None:  # sent with the rest of its batch when the block ends (submit_batch)
            future._batch = batch.id
            batch.futures.append(future)
            return future
        with self._lock:
            while len(self._pending) >= self.max_pending and self._fatal is None and not self._closing:
                self._space.wait(1.0)
            self._raise_if_broken()
            self._pending[job_id] = future
            # The only job in flight (one call at a time): send it from this thread, saving the hop
            # to the I/O thread. Otherwise queue it, so that a burst still goes out in batches.
            # A job with parents goes from the I/O thread: its entry is built there, just before it leaves.
            if self._submits or len(self._pending) > 1 or deps is not None:
                self._submits.append(future)
                if not self._woken:
                    self._wake_locked()
                return future
            future._sent = True  # from here on a SUBMIT may leave (cancel_unstarted reads it under the lock)
        if not self._send_now(future):
            with self._lock:
                self._submits.append(future)
                if not self._woken:
                    self._wake_locked()
        return future

    def submit_batch(self, futures: list[JobFuture]) -> None:
        """Send these jobs in one SUBMIT (their entries share a batch id: accepted all or none)."""
        with self._lock:
            self._raise_if_broken()
            for future in futures:
                self._pending[future.job_id] = future
            self._submits.extend(futures)
            self._wake_locked()

    def _send_now(self, future: JobFuture) -> bool:
        """Send one submission from the calling thread if the I/O thread is waiting in poll."""
        if not self._sock_lock.acquire(blocking=False):
            return False
        try:
            sock = self._sock
            if sock is None:
                return False
            try:
                self._send_submit([future])
                self._ack_with_submit()
            except BaseException as exc:
                # Failed, or interrupted between two parts (KeyboardInterrupt in the main thread): an
                # empty part ends any partial message, which the dispatcher then drops as malformed, and
                # the I/O thread sends the job (again, under the same id).
                with contextlib.suppress(zmq.ZMQError):
                    sock.send(b"")
                if isinstance(exc, zmq.ZMQError):
                    return False
                with self._lock:
                    self._submits.append(future)
                    self._wake_locked()
                raise
            # The send may have taken in the signal for a message that arrived meanwhile (ZMQ_FD is
            # edge-triggered): then the I/O thread would sleep on it, so wake it.
            readable = has_message(sock)
        finally:
            self._sock_lock.release()
        if readable:
            with self._lock:
                self._wake_locked()
        return True

    def watch(self, job_id: str) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            self._raise_if_broken()
            self._watchers.setdefault(job_id, []).append(future)
            self._commands.append((Cmd.WATCH, {"ids": [job_id]}, ()))
            self._wake_locked()
        return future

    def start_request(self, cmd: Cmd, body: dict[str, Any], frames: Sequence[Any] = ()) -> tuple[int, Future[Any]]:
        """Send a request (with data frames, e.g. a schedule's call); its reply (a plain map) will be the
        future's result. end_request(req) when done."""
        future: Future[Any] = Future()
        req = next(self._ids)
        body = {**body, "req": req}
        frames = tuple(frames)
        with self._lock:
            self._raise_if_broken()
            self._requests[req] = (cmd, body, future, frames)
            self._commands.append((cmd, body, frames))
            self._wake_locked()
        return req, future

    def end_request(self, req: int) -> None:
        with self._lock:
            self._requests.pop(req, None)

    def request(self, cmd: Cmd, body: dict[str, Any], timeout_s: float, frames: Sequence[Any] = ()) -> Any:
        req, future = self.start_request(cmd, body, frames)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            raise self.no_reply(timeout_s) from None
        finally:
            self.end_request(req)

    def no_reply(self, timeout_s: float) -> DispatcherUnavailable:
        return DispatcherUnavailable(f"the dispatcher at {self.address} did not answer within {timeout_s:g} s")

    def queue_command(self, cmd: Cmd, body: dict[str, Any]) -> bool:
        """Send a command without waiting for a reply (sent after the submissions queued before it)."""
        with self._lock:
            if self._closing or self._fatal is not None:
                return False
            self._commands.append((cmd, body, ()))
            self._wake_locked()
            return True

    def take_unsent(self, jobs: Iterable[JobFuture]) -> list[JobFuture]:
        """Those of these jobs that never left this process, withdrawn: they will not be sent (nor waited for)."""
        with self._lock:
            unsent = [job for job in jobs if not job._sent and not job.done()]
            for job in unsent:
                self._drop_unsent(job)
        return unsent

    def wait_accepted(self, jobs: Sequence[JobFuture], timeout_s: float) -> None:
        """Wait until the dispatcher has accepted each of these jobs (or it is done), at most timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            waiting = [j for j in jobs if not j._accepted and not j.done()]
            self._accept_waiters += 1
            try:
                while waiting and not self._closing and self._fatal is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._acceptance.wait(remaining)
                    waiting = [j for j in waiting if not j._accepted and not j.done()]
            finally:
                self._accept_waiters -= 1

    def on_io_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def dispatcher_reachable(self) -> bool:
        """Heard from the dispatcher recently (within ALIVE_BEATS heartbeat intervals)."""
        return (
            self._fatal is None and not self._closing and self._last_heard > 0
            and time.monotonic() - self._last_heard < ALIVE_BEATS * self.heartbeat_interval_s
        )

    def pending_futures(self) -> list[JobFuture]:
        """Futures without an outcome (a cancelled one waits for the dispatcher's word, but is done)."""
        with self._lock:
            jobs = list(self._pending.values())
        return [job for job in jobs if not job.done()]

    def begin_close(self) -> None:
        """Ask the I/O thread to stop; `closed` is set once it has."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake_locked()
            self._space.notify_all()
            self._acceptance.notify_all()

    def close(self) -> None:
        self.begin_close()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    # --- internals ------------------------------------------------------------------------------------

    def _raise_if_broken(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise RuntimeError(f"the client of {self.address} is closed")

    def _drop_unsent(self, job: JobFuture) -> None:
        """A job that never left (called with the lock held): it will not be sent, nor waited for."""
        job._opts = job._frames = None  # _send_submit skips it
        if self._pending.pop(job.job_id, None) is not None:
            self._space.notify()

    def _wake_locked(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    def _run(self) -> None:
        self._sock_lock.acquire()  # this thread owns the socket, except while it waits in poll
        try:
            self._serve()
        finally:
            self._sock_lock.release()
            self.closed.set_result(None)

    def _open_socket(self) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.DEALER)
        # Random and not the job-id prefix: another peer that learned it could take the route over.
        sock.setsockopt(zmq.ROUTING_ID, f"c-{uuid.uuid4().hex[:20]}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # a dead connection (a peer gone without a reset) is torn down by the kernel, then re-established
        keep_links_alive(sock, LINK_TIMEOUT_BEATS * max(0.1, self.heartbeat_interval_s))
        configure_socket(sock, self.credentials, self.max_message_size)
        return sock

    def _serve(self) -> None:
        sock = self._open_socket()
        try:
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            self._fatal = DispatcherUnavailable(f"bad dispatcher address {self.address!r}: {exc}")
            self.welcome.set_exception(self._fatal)
            sock.close(linger=0)
            if self._own_context:
                self._ctx.term()
            self._wake_r.close()
            self._wake_w.close()
            return
        self._sock = sock
        # Poll the socket's file descriptor, not the socket: zmq_poll on the socket would use it while a
        # caller thread may be sending on it (_send_now). The fd only signals new events, so the loop
        # checks ZMQ_EVENTS before it sleeps.
        sock_fd = sock.getsockopt(zmq.FD)
        poller = zmq.Poller()
        poller.register(sock_fd, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        watch = watch_handshakes(sock, self.address, self.credentials, "client")
        if watch is not None:  # refused keys fail at once; a second handshake means a new TCP connection
            poller.register(watch.socket, zmq.POLLIN)
        handshakes = 0
        self.failover.started(time.monotonic())  # the first address's silence counts from now, not from 0
        self._send(Cmd.HELLO, {"client": self.client_id, "pid": os.getpid()})
        next_ping = time.monotonic() + self.heartbeat_interval_s
        try:
            while True:
                wake_at = min(next_ping, self._busy_at) if self._busy else next_ping
                if self._ack_at:
                    wake_at = min(wake_at, self._ack_at)
                timeout_s = max(0.0, wake_at - time.monotonic())
                readable = has_message(sock)
                self._sock_lock.release()
                try:
                    if self._settling:
                        self._settle_outcomes()
                    events = dict(poller.poll(0 if readable else int(timeout_s * 1000) + 1))
                finally:
                    self._sock_lock.acquire()
                if self._wake_r.fileno() in events:
                    self._drain_wakeups()
                if readable or sock_fd in events:
                    self._receive(sock)
                if watch is not None and watch.socket in events:
                    refused = watch.failure()
                    if refused is not None:
                        self._fail_all(refused)
                    if watch.handshakes > max(1, handshakes):  # the first is the first connection
                        self._resync_why = "the connection to the dispatcher was re-established"
                        self._resend_requests = True
                    handshakes = watch.handshakes
                if self._closing:
                    if self._ack_at and self._resync_why is None:  # what it has received: the dispatcher may forget it
                        self._send_ack()
                        sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
                    break
                if self.failover.several or self.failover.seen:
                    self._follow(sock)
                if self._resync_why is not None:
                    self._resync()  # before the ACK below, so that it never acknowledges past a loss unasked
                sends = self._sends
                self._send_queued()
                now = time.monotonic()
                if self._busy and now >= self._busy_at:
                    self._resend_busy()
                if now >= next_ping:
                    self._send(Cmd.HEARTBEAT, c.Heartbeat("client", ack=self._done_seq))
                    self._acked_seq, self._ack_at = self._done_seq, 0.0
                    next_ping = now + self.heartbeat_interval_s
                    if self._instance is not None and now - self._last_heard > self.reconnect_timeout_s:
                        self._fail_all(DispatcherUnavailable(
                            f"lost the dispatcher at {self.address}: no answer for {self.reconnect_timeout_s:g} s"
                        ))
                        break
                if self._done_seq != self._acked_seq:  # after the resync above: never past a loss unasked
                    self._ack_due(now, self._sends != sends)
        except Exception as exc:  # never leave futures hanging because of a bug here
            log.exception("client I/O thread failed")
            self._fail_all(exc)
        finally:
            self._settle_outcomes()
            if watch is not None:
                watch.close()
            self._sock = None
            sock.close()  # LINGER 0, or CLOSE_LINGER_MS after a last ACK
            for names in list(self._segments.values()):  # SUBMITs never answered: nobody took these over
                for name in names:
                    shm.remove(name)
            if self._own_context:
                self._ctx.term()
            self._wake_r.close()
            self._wake_w.close()
            self._fail_all(RuntimeError(f"the client of {self.address} is closed"), only_if_unset=True)

    def _follow(self, sock: zmq.Socket[Any]) -> None:
        """A standby pair: go to the address the failover rules name (transport/failover.py), and ask."""
        switch = self.failover.due(time.monotonic(), self._last_heard)
        if switch is None:
            return
        address, new = switch
        if new:
            log.info("dispatcher: trying %s (was %s)", address, self.address)
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(self.address)
            self.address = address
            sock.connect(address)
            self._resync_why = f"now talking to the dispatcher at {address}"
            self._resend_requests = True
        self._send(Cmd.HELLO, {"client": self.client_id, "pid": os.getpid()})

    def _drain_wakeups(self) -> None:
        # Bytes first, flag second: clearing the flag first let a wake-up byte written in between be
        # swallowed here while the flag stayed set, so later submissions waited for the next ping (~1 s).
        # Whatever was queued before the flag is cleared is sent by this same loop turn.
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            self._woken = False

    def _send(self, cmd: Cmd, body: Any, frames: Sequence[Any] | None = None) -> None:
        sock = self._sock
        if sock is None:
            raise RuntimeError(f"the client of {self.address} is closed")
        send_parts(sock, encode(cmd, body, frames or (), self.failover.seen))
        self._sends += 1

    def _ack_due(self, now: float, sent_this_turn: bool) -> None:
        """JOB_DONE arrived: acknowledge it now, unless nothing else is pending or went this turn: a lone
        round trip's caller is about to send its next SUBMIT (_ack_with_submit), so the ACK waits for it,
        at most ACK_DELAY_S. (With jobs pending, it goes at once: the dispatcher forgets their jobs before
        its next commit instead of writing them.)"""
        if not self._ack_at:
            self._ack_at = now + ACK_DELAY_S
        if sent_this_turn or self._pending or now >= self._ack_at:
            self._send_ack()

    def _ack_with_submit(self) -> None:
        """A caller sent its SUBMIT (holding _sock_lock, like every user of the socket): the ACK due goes too."""
        if self._ack_at and self._resync_why is None:
            self._send_ack()

    def _send_ack(self) -> None:
        self._acked_seq, self._ack_at = self._done_seq, 0.0
        self._send(Cmd.ACK, c.Ack(self._done_seq))

    def _send_queued(self) -> None:
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
            batch = list(self._submits)
            self._submits.clear()
            for future in batch:
                future._sent = True
        self._send_submit(batch)  # submissions first: a command may name a job submitted just before it
        for cmd, body, data in commands:
            self._send(cmd, body, data)

    def _send_submit(self, jobs: Iterable[JobFuture]) -> None:
        """SUBMIT messages for these jobs, of at most SUBMIT_BATCH entries and about SUBMIT_BATCH_BYTES each."""
        entries: list[c.SubmitEntry] = []
        frames: list[Any] = []
        size = 0
        for future in jobs:
            data = future._frames
            if data is None:  # resolved meanwhile, or cancelled before it left
                continue
            entry = None
            if future._deps is not None:
                entry = future._deps.entry(self, future)
                if type(entry) is dict:  # a parent whose outcome arrived meanwhile ended badly
                    self._resolve(future.job_id, "failed", {"error": entry}, [])
                    continue
                data = future._frames or ()
            n_bytes = sum(map(len, data))
            # The entries of a batch go in one message whatever its size: the dispatcher accepts all or none.
            if entries and (len(entries) >= SUBMIT_BATCH or size + n_bytes > SUBMIT_BATCH_BYTES) and (
                not future._batch or future._batch != entries[-1].batch
            ):
                self._send(Cmd.SUBMIT, entries, frames)
                entries, frames, size = [], [], 0
            if entry is None:
                refs: tuple[c.ShmRef, ...] = ()
                if self._shm and not future._shm_sent and n_bytes >= shm.SHM_MIN_BYTES:
                    future._shm_sent = True  # once: a re-send goes as frames (the segment is the dispatcher's)
                    data, made = shm.offload(list(data))
                    if made:
                        refs = tuple(c.ShmRef(i, name, n) for i, name, n in made)
                        self._segments[future.job_id] = [name for _, name, _ in made]
                        n_bytes = 0
                entry = c.SubmitEntry(
                    future.job_id, future._opts or _NO_OPTIONS, len(data), batch=future._batch, shm=refs
                )
            entries.append(entry)
            frames.extend(data)
            size += n_bytes
        if entries:
            self._send(Cmd.SUBMIT, entries, frames)

    def _receive(self, sock: zmq.Socket[Any]) -> None:
        while (parts := recv_waiting(sock)) is not None:
            try:
                cmd, raw, frames = split(parts)
                if not self.failover.admit(parts[1]):  # a dispatcher of a lower epoch than one obeyed
                    self._send(Cmd.STALE, self.failover.stale_reply())
                    continue
                self._last_heard = time.monotonic()
                body = c.decode_body(cmd, raw)
                if cmd in _REPLIES:  # checked against its type; the caller gets every key as a plain map
                    body = unpack(raw)
            except ProtocolError as exc:  # one odd message must not fail every pending future
                log.warning("ignoring a malformed message from the dispatcher: %s", exc)
                continue
            try:
                self._handle(cmd, body, frames)
            except ProtocolError as exc:  # what a type cannot say (frame counts that do not add up)
                log.warning("ignoring a malformed %s from the dispatcher: %s", cmd.name, exc)
            except Exception:  # a bug of ours: loud, and the other futures carry on
                log.exception("handling %s from the dispatcher failed", cmd.name)

    def _handle(self, cmd: Cmd, body: Any, frames: list[Any]) -> None:
        if cmd == Cmd.JOB_DONE:
            self._on_done(body, frames)
        elif cmd in (Cmd.WELCOME, Cmd.HEARTBEAT):
            instance = body.instance
            if self._instance is not None and instance != self._instance:
                log.warning("dispatcher restarted; re-sending %d unfinished job(s)", len(self._pending))
                self._done_seq = self._acked_seq = 0  # the new instance numbers its JOB_DONE from 1
                self._ack_at = 0.0
                self._resync_why = "the dispatcher restarted"
                self._resend_requests = True
            self._instance = instance
            if cmd == Cmd.WELCOME:
                self._shm = bool(body.shm) and body.shm == shm.namespace_id()
            if not self.welcome.done():
                self.welcome.set_result({"instance": body.instance, "heartbeat_interval": body.heartbeat_interval})
        elif cmd == Cmd.ACCEPTED:
            self._on_accepted(body)
        elif cmd in _REPLIES:
            with self._lock:
                entry = self._requests.pop(body.get("req"), None)
            if entry is not None and not entry[2].done():
                entry[2].set_result(body)
        elif cmd == Cmd.REDIRECT:
            self.failover.redirected(body, time.monotonic())
        elif cmd == Cmd.SHUTDOWN:
            log.info("the dispatcher is shutting down")
        elif cmd == Cmd.ERROR:
            exc: BaseException
            if body.code == "version":
                exc = VersionMismatch(f"protocol version mismatch: {body.message}")
            elif body.code == "forbidden":
                exc = AccessDenied(f"the dispatcher refused this client: {body.message}")
            else:
                exc = DispatcherUnavailable(f"the dispatcher refused this client: {body.message}")
            self._fatal = exc
            if not self.welcome.done():
                self.welcome.set_exception(exc)
            self._fail_all(exc)

    def _on_accepted(self, body: c.Accepted) -> None:
        pending = self._pending
        if self._segments:  # answered: the dispatcher took its segments over, or will never read them
            for ids in (body.accepted, body.busy, [r[0] for r in body.rejected], [r[0] for r in body.refused]):
                for job_id in ids:
                    for name in self._segments.pop(job_id, ()):
                        shm.remove(name)
        for job_id in body.accepted:
            job = pending.get(job_id)
            if job is not None:
                job._accepted = True
        if self._accept_waiters:
            with self._lock:
                self._acceptance.notify_all()
        if body.busy:
            self._busy.extend(body.busy)
            self._busy_at = time.monotonic() + BUSY_RETRY_S
        for job_id, reason, *kind in body.rejected:  # [id, reason] or [id, reason, kind]
            error = perr.error_info(kind[0] if kind else perr.REJECTED, "ValueError", reason)
            self._resolve(job_id, "failed", {"error": error}, [])
        for job_id, reason in body.refused:  # its journal's disk is full: JournalFull
            self._resolve(job_id, "failed", {"error": perr.error_info(perr.REFUSED, "JournalFull", reason)}, [])

    def _resend_busy(self) -> None:
        with self._lock:
            entries = [self._pending[i] for i in self._busy if i in self._pending]
            for job in entries:
                if job.cancelled():  # never stored (busy) and no longer wanted: not sent again
                    self._drop_unsent(job)
        self._busy = []
        self._send_submit(entries)

    def _resync(self) -> None:
        """Ask again for everything that may have been lost: every pending job (SUBMIT, same ids), the
        cancellation of cancelled ones, one WATCH of every watched id, and after a new connection or a
        new dispatcher, every request not answered yet. Job ids make every answer idempotent."""
        why, self._resync_why = self._resync_why, None
        with self._lock:
            self._submits.clear()  # they are pending too: sent below, once
            jobs = list(self._pending.values())
            for job in jobs:
                job._sent = True
            watched = list(self._watchers)
            requests = [(e[0], e[1], e[3]) for e in self._requests.values()] if self._resend_requests else []
            self._resend_requests = False
        self._busy = []
        self.resyncs += 1
        log.info("%s: asking again for %d pending job(s) and %d watched one(s)", why, len(jobs), len(watched))
        self._send_submit(jobs)
        cancelled = [job.job_id for job in jobs if job.cancelled()]
        if cancelled:  # sent again too, so that they end (cancelled) and leave _pending
            self._send(Cmd.CANCEL_JOBS, {"ids": cancelled, "req": None})
        if watched:
            self._send(Cmd.WATCH, {"ids": watched})
        for cmd, body, data in requests:
            self._send(cmd, body, data)

    def _on_done(self, done: c.JobDone, frames: list[Any]) -> None:
        if done.seq > self._done_seq + 1:
            self._resync_why = f"JOB_DONE {self._done_seq + 1} to {done.seq - 1} never arrived"
        self._done_seq = max(self._done_seq, done.seq)
        entries = done.jobs
        per_entry = split_frames([e.n_frames for e in entries], frames)
        if any(e.withheld for e in entries):  # a large result its dependants use, sent without it
            self._on_withheld([e for e in entries if e.withheld])
            entries_data = [(e, d) for e, d in zip(entries, per_entry, strict=True) if not e.withheld]
            self._resolve_many([(e.job_id, e.state, e.info, d) for e, d in entries_data])
            return
        self._resolve_many([(e.job_id, e.state, e.info, data) for e, data in zip(entries, per_entry, strict=True)])

    def _on_withheld(self, entries: list[c.JobDoneEntry]) -> None:
        """Jobs done whose result stayed in the dispatcher (it keeps them until its result TTL): their
        futures are done, and fetch the result when result() is called; watchers (result by id) ask
        for it now."""
        with self._lock:
            rewatch = {e.job_id for e in entries if e.job_id in self._watchers}
            lazy = [e for e in entries if e.job_id not in rewatch]
            found: list[tuple[JobFuture | None, list[Future[Any]] | None]] = [
                (self._pending.pop(e.job_id, None), None) for e in lazy
            ]
            self._space.notify(len(lazy))
        if rewatch:  # the WATCH answer (with the result) settles their future too
            self._commands.append((Cmd.WATCH, {"ids": sorted(rewatch)}, ()))
        self._settling.append(([(e.job_id, e.state, e.info, WITHHELD) for e in lazy], found))

    def _resolve(self, job_id: str, state: str, info: dict[str, Any], data: list[Any]) -> None:
        self._resolve_many([(job_id, state, info, data)])

    def _resolve_many(self, outcomes: list[tuple[str, str, dict[str, Any], list[Any]]]) -> None:
        """Take the futures (and watches) of a batch of outcomes, with one lock round trip.

        They are settled by _settle_outcomes once this loop turn is over and the socket is free, so that
        a caller woken by its result can send its next submission at once (_send_now)."""
        pending, watching = self._pending, self._watchers
        with self._lock:
            found = [(pending.pop(o[0], None), watching.pop(o[0], None) if watching else None) for o in outcomes]
            self._space.notify(len(outcomes))
        self._settling.append((outcomes, found))

    def _settle_outcomes(self) -> None:
        batches, self._settling = self._settling, []
        for outcomes, found in batches:
            self._settle_batch(outcomes, found)

    def _settle_batch(
        self,
        outcomes: list[tuple[str, str, dict[str, Any], list[Any]]],
        found: list[tuple[JobFuture | None, list[Future[Any]] | None]],
    ) -> None:
        for (job_id, state, info, data), (future, watchers) in zip(outcomes, found, strict=True):
            if future is None and not watchers:
                self.duplicate_results += 1
                continue
            record = {"id": job_id, "state": state, **info}
            if future is not None:
                future.info = record
                future._opts = future._frames = None
                if future._begin_settle():
                    _settle(future, state, info, data)
            for w in watchers or ():
                if w.set_running_or_notify_cancel():
                    w.set_result((record, data))

    def _fail_all(self, exc: BaseException, only_if_unset: bool = False) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            for job in pending:
                job._opts = job._frames = None
            watchers = [f for fs in self._watchers.values() for f in fs]
            self._watchers.clear()
            requests = [entry[2] for entry in self._requests.values()]
            if self._fatal is None and not only_if_unset:
                self._fatal = exc
            self._space.notify_all()
            self._acceptance.notify_all()
        for job in pending:
            if job._begin_settle():
                job.set_exception(exc)
        for f in [*watchers, *requests]:
            if not f.done() and f.set_running_or_notify_cancel():
                f.set_exception(exc)
        if not self.welcome.done():
            self.welcome.set_exception(exc)


def outcome_error(info: dict[str, Any], data: list[Any]) -> BaseException:
    """The exception of a job that did not succeed, from its JOB_DONE info and frames."""
    return perr.rebuild_exception(info.get("error") or {}, data)


def _settle(future: Future[Any], state: str, info: dict[str, Any], data: Any) -> None:
    if data is WITHHELD:
        future.set_result(WITHHELD)  # JobFuture.result() fetches it
    elif state == "succeeded":
        try:
            future.set_result(decode_value(data))
        except Exception as exc:  # e.g. the result's class is not importable here
            future.set_exception(exc)
    else:
        future.set_exception(outcome_error(info, data))

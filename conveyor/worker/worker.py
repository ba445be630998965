"""The worker: one DEALER socket to the dispatcher, one execution mode, heartbeats both ways.

Life of a worker (`Worker.run`):
1. start the mode (threads, child processes or an event loop);
2. connect and send READY with its free slots (credit) and what it still runs;
3. serve: run assigned tasks, batch their outcomes into RESULTS, answer CANCEL, heartbeat;
   if the dispatcher goes silent for `liveness` intervals (or says SHUTDOWN), reconnect with
   backoff and register again (Paranoid Pirate);
4. on SIGTERM/SIGINT: send LEAVING, let running tasks finish for up to `drain_timeout`,
   hand back the rest (GIVEBACK), send GOODBYE and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from typing import Any
from urllib.parse import urlparse

import zmq
import zmq.asyncio

from conveyor.errors import DispatcherRefused
from conveyor.protocol import Cmd, Message, ProtocolError, encode, split_frames
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.security.keys import load_peer_credentials
from conveyor.transport.handshake import HandshakeWatch, watch_handshakes
from conveyor.transport.sockets import configure_socket
from conveyor.worker.capture import DEFAULT_LIMIT, TaskReports
from conveyor.worker.execution import Outcome, Task, fit_outcome, infra_failure
from conveyor.worker.modes import MODES, Mode, ProcessesMode

log = logging.getLogger("conveyor.worker")

MAX_BACKOFF = 5.0
AUTO_PREFETCH = 256  # most jobs held beyond the slots when the dispatcher sizes the window itself
STALL_AFTER = 0.1  # auto prefetch: no task started or ended for this long: hand the jobs not started back
FLUSH_BATCH = 64  # outcomes that go out at once even while the worker holds more jobs than slots
FLUSH_DELAY = 0.001  # how long outcomes may wait for company while it holds more jobs than slots
KILL_WAIT = 5.0  # seconds to let handed-back tasks stop before the worker exits


def default_concurrency(mode: str) -> int:
    return 1000 if mode == "asyncio" else (os.cpu_count() or 1)


def local_address_for(endpoint: str) -> str:
    """The local IP address this host uses to reach the dispatcher (what `status` shows as host)."""
    host = urlparse(endpoint.replace("tcp://", "tcp://", 1)).hostname if endpoint.startswith("tcp://") else None
    if not host or host == "*":
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


class Worker:
    def __init__(
        self,
        connect: str,
        *,
        mode: str = "processes",
        concurrency: int | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        drain_timeout: float = 30.0,
        max_child_memory_mb: int | None = None,
        prefetch: int | None = None,
        capture_output: bool = True,
        output_limit: int = DEFAULT_LIMIT,
        context: zmq.asyncio.Context | None = None,
        keys: str | os.PathLike[str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        health_file: str | os.PathLike[str] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        self.connect_address = connect
        self.mode_name = mode
        self.concurrency = default_concurrency(mode) if concurrency is None else concurrency
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch is not None and prefetch < 0:
            raise ValueError("prefetch must be 0 or more")
        # Jobs held beyond the slots: tiny tasks then never wait a dispatcher round trip, at the price of
        # a queue on this worker that other workers cannot take from. None (auto): the dispatcher holds
        # that queue to ~2 ms of work by the tasks' durations, and jobs stuck behind a slow task come back.
        self.prefetch_auto = prefetch is None
        self.prefetch = AUTO_PREFETCH if prefetch is None else prefetch
        self.tags = sorted(set(tags or []))
        self.host = local_address_for(connect)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat_interval = heartbeat_interval
        # Beat as often as whichever side asks for more; wait for the dispatcher as long as the slower side.
        # The dispatcher's interval arrives with its heartbeats.
        self._beat_every = heartbeat_interval
        self._patience = heartbeat_interval * liveness
        self.liveness = liveness
        self.drain_timeout = drain_timeout
        self.identity = f"w-{uuid.uuid4().hex[:12]}".encode()
        self.credentials = load_peer_credentials(keys, "worker") if keys is not None else None  # CurveZMQ
        self.max_message_size = max_message_size
        self._handshakes: HandshakeWatch | None = None
        if mode == "processes" and max_child_memory_mb:
            self.mode: Mode = ProcessesMode(self.concurrency, max_child_memory=max_child_memory_mb << 20)
        else:
            self.mode = MODES[mode](self.concurrency)
        # Tasks' output and progress (capture.py), sent as OUTPUT and PROGRESS a few times a second.
        self.reports = TaskReports(output_limit)
        self.mode.reports = self.reports
        self.mode.capture_output = capture_output
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        # Assignments held, by (job id, attempt): started ones (in a slot) and ones waiting for a slot.
        self._running: dict[tuple[str, int], Task] = {}
        self._waiting: deque[Task] = deque()  # prefetched, in arrival order; stale entries are skipped
        # What the mode may hold at once: its slots, or for a mode that queues work itself (threads) the
        # prefetch too, so its threads go from task to task without waiting for this loop.
        self._free_slots = self.concurrency + (self.prefetch if self.mode.takes_backlog else 0)
        self._handed_back: set[tuple[str, int]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_deadline = float("inf")
        self._session = ""
        self._started: set[tuple[str, int]] = set()  # assignments that hold a slot (not just prefetched)
        self._heard = False
        self._last_heard = 0.0
        self._outbox: list[Outcome] = []
        self._results_seq = 0  # the number of the last RESULTS sent (protocol §5: numbered, acknowledged)
        self._flush_soon = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self._last_progress = 0.0  # when a task last started or ended (stall detection)
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._dispatcher_instance: str | None = None
        self._connected = False
        # Touched by the worker's own loop every heartbeat interval, connected or not: a liveness probe that
        # reads it checks this process, never the dispatcher (conveyor-healthcheck worker --local).
        self.health_file = None if health_file is None else os.fspath(health_file)

    # --- lifecycle --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain. A second call: hand back what still runs, now."""
        if self._stop.is_set():
            self._drain_deadline = time.monotonic()
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests run workers in threads too)
        self.reports.bind(asyncio.get_running_loop(), self._send_reports)
        await self.mode.start()
        log.info(
            "worker %s: %s x%d, tags %s, connecting to %s",
            self.name, self.mode_name, self.concurrency, self.tags or "-", self.connect_address,
        )
        backoff = 0.1
        health = asyncio.create_task(self._touch_health_file()) if self.health_file else None
        try:
            while True:
                self._open()
                state = await self._serve()
                self._close_socket()
                if state == "done":
                    break
                if self._stop.is_set():  # lost the dispatcher while draining: finish what we can, then go
                    await self._finish_without_dispatcher()
                    break
                if state == "served":
                    backoff = 0.1
                log.warning("dispatcher unreachable; reconnecting in %.1f s", backoff)
                try:
                    await asyncio.wait_for(self._stop.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            if health is not None:
                health.cancel()
            await self.mode.shutdown()
            self._close_socket()
            if self._own_context:
                self._ctx.term()

    async def _touch_health_file(self) -> None:
        """Write the time into the health file every heartbeat interval (a stuck loop stops doing so)."""
        assert self.health_file is not None
        while True:
            try:
                with open(self.health_file, "w") as f:
                    f.write(f"{time.time():.3f}\n")
            except OSError as exc:
                log.warning("cannot write the health file %s: %s", self.health_file, exc)
            await asyncio.sleep(self.heartbeat_interval)

    def _open(self) -> None:
        """A new connection: a new session id, outcomes held while disconnected first, then READY."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        configure_socket(sock, self.credentials, self.max_message_size)
        sock.connect(self.connect_address)
        self._handshakes = watch_handshakes(sock, self.connect_address, self.credentials, "worker")
        self._sock = sock
        self._session = uuid.uuid4().hex[:12]
        self._dispatcher_instance = None
        self._connected = False
        self._flush()  # outcomes first, so the dispatcher records them before it reconciles our READY
        self._send(Cmd.READY, self._ready_body())
        if self._stop.is_set():
            self._send(Cmd.LEAVING, {})

    def _close_socket(self) -> None:
        if self._handshakes is not None:
            self._handshakes.log_failure()  # why the dispatcher never answered: it refused our keys (or none)
            self._handshakes.close()
            self._handshakes = None
        if self._sock is not None:
            self._sock.close(linger=200)
            self._sock = None

    def _ready_body(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "pid": os.getpid(),
            "mode": self.mode_name,
            "concurrency": self.concurrency,
            "tags": self.tags,
            "session": self._session,
            "prefetch": self.prefetch,
            "prefetch_auto": self.prefetch_auto,
            "credit": self.concurrency + self.prefetch - len(self._running),
            "running": [[job_id, attempt] for job_id, attempt in self._running],
            "results_seq": self._results_seq + 1,
        }

    # --- the session loop -------------------------------------------------------------------------

    async def _serve(self) -> str:
        """Serve one connection. Returns "done" (drained and said goodbye), "served" (lost the dispatcher
        after it had answered) or "silent" (it never answered).

        A reader task handles messages as they come; this loop only wakes for heartbeats, liveness
        checks and the drain.
        """
        sock = self._sock
        assert sock is not None
        self._heard = False
        self._last_heard = time.monotonic()
        next_beat = self._last_heard + self._beat_every
        draining = False
        reader = asyncio.create_task(self._read(sock))
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                if self._stop.is_set() and not draining:
                    draining = True
                    self._begin_drain()
                now = time.monotonic()
                if draining and (not self._running or now >= self._drain_deadline):
                    await self._finish_drain()
                    return "done"
                if now >= next_beat:
                    self._send(Cmd.HEARTBEAT, {"role": "worker"})
                    next_beat = now + self._beat_every
                if now - self._last_heard > self._patience:
                    return "served" if self._heard else "silent"
                wake_at = min(next_beat, self._drain_deadline) if draining else next_beat
                waiters: set[asyncio.Future[Any]] = {reader}
                if not draining:
                    waiters.add(stop_wait)
                else:
                    waiters.add(asyncio.ensure_future(self._idle.wait()))
                _, pending = await asyncio.wait(
                    waiters, timeout=max(0.0, wake_at - now), return_when=asyncio.FIRST_COMPLETED
                )
                for fut in pending:
                    if fut is not stop_wait and fut is not reader:
                        fut.cancel()
                if reader.done():
                    reader.result()  # re-raises DispatcherRefused
                    return "served"  # the dispatcher said it is shutting down
        finally:
            stop_wait.cancel()
            reader.cancel()

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        """Handle messages until the dispatcher says SHUTDOWN."""
        while True:
            parts = await sock.recv_multipart(copy=False)
            self._heard = True
            self._last_heard = time.monotonic()
            if not self._handle(parts):
                return

    def _handle(self, parts: list[Any]) -> bool:
        """Handle one message; False means: drop this connection and reconnect."""
        try:
            msg = c.decode_message(parts)
        except ProtocolError as exc:
            log.warning("ignoring a malformed message from the dispatcher: %s", exc)
            return True
        try:
            return self._dispatch_message(msg)
        except DispatcherRefused:
            raise
        except ProtocolError as exc:  # what a type cannot say (frame counts that do not add up)
            log.warning("ignoring a malformed message from the dispatcher: %s", exc)
            return True

    def _dispatch_message(self, msg: Message) -> bool:
        if msg.cmd == Cmd.ASSIGN:
            self._on_assign(msg)
        elif msg.cmd == Cmd.CANCEL:
            key = (msg.body.job, msg.body.attempt)
            task = self._running.get(key)
            if task is not None and key not in self._started:  # still waiting for a slot: it never starts
                del self._running[key]
                self._report(task, infra_failure(task, perr.CANCELLED, "JobCancelled", "the job was cancelled"))
            elif task is not None:
                self.mode.cancel(key)
        elif msg.cmd == Cmd.HEARTBEAT:
            instance = msg.body.instance
            theirs = msg.body.heartbeat_interval
            if theirs is not None and theirs > 0:
                self._beat_every = min(self.heartbeat_interval, float(theirs))
                self._patience = max(self.heartbeat_interval, float(theirs)) * self.liveness
            if self._dispatcher_instance is not None and instance != self._dispatcher_instance:
                log.info("dispatcher restarted (instance %s); registering again", instance)
                self._send(Cmd.READY, self._ready_body())
            self._dispatcher_instance = instance
            if not self._connected:
                self._connected = True
                log.info("connected to dispatcher %s", instance)
        elif msg.cmd == Cmd.RECONNECT:
            self._send(Cmd.READY, self._ready_body())
        elif msg.cmd == Cmd.SHUTDOWN:
            log.info("dispatcher is shutting down")
            return False
        elif msg.cmd == Cmd.ERROR:
            log.error("dispatcher refused this worker: %s", msg.body.message)
            raise DispatcherRefused(msg.body.message)
        return True

    def _on_assign(self, msg: Message) -> None:
        entries: list[c.AssignEntry] = msg.body.tasks
        per_entry = split_frames([e.n_frames for e in entries], msg.frames)
        for e, frames in zip(entries, per_entry, strict=True):
            task = Task(e.job_id, e.attempt, e.timeout, e.retry_on, frames)
            self._running[task.key] = task
            self._waiting.append(task)
        if entries:
            self._idle.clear()
        self._start_waiting()
        if len(self._running) > self.concurrency and self.prefetch_auto and self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(STALL_AFTER, self._check_stall)

    def _start_waiting(self) -> None:
        """Give free slots to waiting assignments, oldest first (the dispatcher's credit bounds them)."""
        while self._free_slots and self._waiting:
            task = self._waiting[0]
            if self._running.get(task.key) is not task:
                self._waiting.popleft()
                continue  # cancelled or handed back while it waited
            if task.timeout is not None and len(self._started) >= self.concurrency:
                break  # its clock starts when the mode takes it: only once a slot is really free (backlog modes)
            self._waiting.popleft()
            self._free_slots -= 1
            self._started.add(task.key)
            self._last_progress = time.monotonic()
            self.mode.submit(task, self._task_done)

    def _task_done(self, task: Task, outcome: Outcome) -> None:
        """The mode reports an ended task: free its slot, start the next, queue the outcome."""
        self._free_slots += 1
        self._last_progress = time.monotonic()
        key = task.key
        self._started.discard(key)
        if self._running.get(key) is task:
            del self._running[key]
        self.reports.finish(key)
        self._start_waiting()
        self._report(task, outcome)

    def _report(self, task: Task, outcome: Outcome) -> None:
        if not self._running:
            self._idle.set()
        outcome = fit_outcome(outcome, self.max_message_size)  # a frame over ZMQ_MAXMSGSIZE would cut us off
        if task.key in self._handed_back:
            self._handed_back.discard(task.key)  # the dispatcher has it queued again: no outcome
            return
        self._outbox.append(outcome)
        if len(self._running) <= self.concurrency or len(self._outbox) >= FLUSH_BATCH:
            if not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif self._flush_timer is None:  # more queued than slots (tiny tasks): fewer, fuller RESULTS
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flush)

    def _check_stall(self) -> None:
        """Auto prefetch: if no task started or ended for STALL_AFTER, give the jobs not started back."""
        self._stall_timer = None
        if len(self._running) <= self.concurrency or self._stop.is_set():
            return
        stalled_for = time.monotonic() - self._last_progress
        if stalled_for < STALL_AFTER:
            self._stall_timer = asyncio.get_running_loop().call_later(STALL_AFTER - stalled_for, self._check_stall)
            return
        n = self._give_back_unstarted()
        log.info("slots busy for %.2f s: handed %d waiting job(s) back to the dispatcher", stalled_for, n)

    def _give_back_unstarted(self) -> int:
        """Hand back every assignment no slot has started (waiting here, or queued in the mode)."""
        keys = []
        for key in list(self._running):
            if key in self._started:
                if not self.mode.withdraw(key):
                    continue  # running: it stays
                self._started.discard(key)
                self._free_slots += 1
            del self._running[key]
            keys.append(key)
        self._waiting.clear()  # every job in it was not started, so it has just been handed back
        if keys:
            if not self._running:
                self._idle.set()
            self._send(Cmd.GIVEBACK, [[job_id, attempt] for job_id, attempt in keys])
        return len(keys)

    def _flush(self) -> None:
        """Send every finished outcome in one RESULTS message (see _report for when)."""
        self._flush_soon = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._outbox or self._sock is None:
            return
        outcomes, self._outbox = self._outbox, []
        self._send_reports()  # a task's last output and progress reach the dispatcher before its outcome
        entries = []
        frames: list[Any] = []
        for o in outcomes:
            entries.append(c.OutcomeEntry(o.job_id, o.attempt, o.ok, o.info, len(o.frames)))
            frames.extend(o.frames)
        self._results_seq += 1
        self._send(Cmd.RESULTS, c.Results(self._results_seq, entries), frames)

    def _send_reports(self) -> None:
        """Send the running tasks' output and progress (dropped while disconnected: only the tail matters)."""
        self.reports.send(self._send)

    def _send(self, cmd: Cmd, body: Any, frames: list[Any] | None = None) -> None:
        if self._sock is None:
            return
        try:
            # SNDHWM is 0, so this never waits: the returned future is already done.
            self._sock.send_multipart(encode(cmd, body, frames or ()), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("send queue full; dropping %s", cmd.name)

    # --- shutdown ---------------------------------------------------------------------------------

    def _begin_drain(self) -> None:
        self._drain_deadline = min(self._drain_deadline, time.monotonic() + self.drain_timeout)
        self._send(Cmd.LEAVING, {})
        handed = self._give_back_unstarted()  # prefetched and not started: straight back to the dispatcher
        if handed:
            log.info("handed %d job(s) not yet started back to the dispatcher", handed)
        if self._running:
            log.info("draining %d running task(s), up to %.0f s", len(self._running), self.drain_timeout)

    async def _finish_drain(self) -> None:
        """Hand back what did not finish in time (stopping it), flush outcomes, say goodbye."""
        if self._running:
            handed = list(self._running)
            started = [key for key in handed if key in self._started]
            self._handed_back.update(started)  # first: what they report once stopped is dropped
            for key in handed:
                if key not in started:
                    del self._running[key]  # never started; started ones leave when they have stopped
            self._waiting.clear()  # first too: a cancel frees a slot, which must not start one of these
            for key in started:
                self.mode.cancel(key)
            if not self._running:
                self._idle.set()
            self._send(Cmd.GIVEBACK, [[job_id, attempt] for job_id, attempt in handed])
            log.info("handed back %d unfinished task(s)", len(handed))
            await self._until_idle(KILL_WAIT)
        self._flush()
        self._send(Cmd.GOODBYE, {})

    async def _finish_without_dispatcher(self) -> None:
        """Draining with no dispatcher to talk to: let running tasks end until the deadline, then stop."""
        remaining = self._drain_deadline - time.monotonic()
        if self._running and remaining > 0:
            await self._until_idle(remaining)
        self._waiting.clear()  # nothing new starts now; the dispatcher runs these elsewhere
        for key in list(self._running):
            self.mode.cancel(key)  # the dispatcher will count these as lost and run them elsewhere

    async def _until_idle(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass


def run_worker(worker: Worker) -> int:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # tasks in the working directory are importable, as with `python -m`
    try:
        asyncio.run(worker.run())
    except DispatcherRefused:
        return 1
    return 0

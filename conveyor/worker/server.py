"""The worker's socket loop: one DEALER socket to the dispatcher, one execution mode, heartbeats both ways.

This loop owns the socket and the mode and decides nothing itself. Messages from the dispatcher,
outcomes from the mode, connections made and lost, signals and timers become events for the state
machine (state.py), and its actions are carried out here: send, hand tasks to the mode, stop or
withdraw one there, arm a timer. Life of a worker (`Worker.run`):
1. start the mode (threads, child processes or an event loop);
2. connect: a new DEALER socket (TCP keepalive on, so the kernel tears down a half-open connection and
   libzmq connects again); the state sends READY and whatever it must send again;
3. serve: the loop reads the socket whenever its descriptor signals (a plain socket, not zmq.asyncio:
   one wake-up reads every message waiting, with no future per message) and turns each message into an
   event, and beats HEARTBEAT; a socket monitor notices when ZeroMQ re-established the TCP connection
   (a handshake after the first), which the state treats as a new connection. If the dispatcher goes
   silent for its patience (or says SHUTDOWN), the socket is closed and the worker connects again with
   backoff (Paranoid Pirate);
4. on SIGTERM/SIGINT the state drains; the loop ends when it says Finished.
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
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlparse

import zmq

from conveyor import task as task_api
from conveyor.errors import DispatcherRefused, KeysError
from conveyor.protocol import Cmd, Message, ProtocolError, encode, split_frames
from conveyor.protocol import commands as c
from conveyor.protocol.joined import pack_joined
from conveyor.protocol.limits import DEFAULT_MAX_MESSAGE_SIZE
from conveyor.protocol.payload import encode_call, pack_task
from conveyor.security.keys import load_peer_credentials
from conveyor.transport import shm
from conveyor.transport.failover import Failover
from conveyor.transport.handshake import HandshakeWatch, watch_handshakes
from conveyor.transport.sockets import (
    NOBLOCK,
    configure_socket,
    has_message,
    keep_links_alive,
    recv_waiting,
    send_parts,
)
from conveyor.worker.events import (
    Action,
    ArmTimer,
    Assigned,
    Beat,
    CancelRequested,
    Connected,
    Disconnected,
    Event,
    Finished,
    Log,
    ReconnectRequested,
    ResendRequested,
    Send,
    SendReports,
    SlotBack,
    SlotLent,
    Start,
    Stop,
    StopRequested,
    TasksEnded,
    Tick,
    Withdraw,
    Withdrawn,
)
from conveyor.worker.execution import Outcome, Task, failure
from conveyor.worker.modes import MODES, Mode, ModeSettings
from conveyor.worker.reports import DEFAULT_LIMIT_CHARS, TaskReports
from conveyor.worker.state import WorkerConfig, WorkerState

log = logging.getLogger("conveyor.worker")
_BEAT = {"role": "worker"}


MAX_BACKOFF = 5.0
AUTO_PREFETCH = 256  # most jobs held beyond the slots when the dispatcher sizes the window itself


def local_address_for(endpoint: str) -> str:
    """The local IP address this host uses to reach the dispatcher (what `status` shows as host)."""
    host = urlparse(endpoint).hostname if endpoint.startswith("tcp://") else None
    if not host or host == "*":
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


def _holds_client_keys(keys: str | os.PathLike[str]) -> bool:
    """Whether a worker's key directory holds a client key pair too, for its tasks' client."""
    try:
        load_peer_credentials(keys, "client")
    except KeysError:
        return False
    return True


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
        liveness_beats: int = 3,
        drain_timeout: float = 30.0,
        max_child_memory_mib: int | None = None,
        prefetch: int | None = None,
        capture_output: bool = True,
        output_limit_chars: int = DEFAULT_LIMIT_CHARS,
        context: zmq.Context[Any] | None = None,
        keys: str | os.PathLike[str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        health_file: str | os.PathLike[str] | None = None,
    ):
        """`heartbeat_interval` and `drain_timeout` are seconds; the dispatcher is lost after
        `liveness_beats` intervals of silence; `output_limit_chars` is the tail of each output stream kept
        per task; `max_message_size` is bytes."""
        mode_type = MODES.get(mode)
        if mode_type is None:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if concurrency is None:
            concurrency = mode_type.default_concurrency()
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch is not None and prefetch < 0:
            raise ValueError("prefetch must be 0 or more")
        if liveness_beats < 1:
            raise ValueError("liveness must be at least 1 heartbeat")
        self.failover = Failover(connect)  # several addresses: a standby pair (docs/standby.md)
        self.connect_address = self.failover.current
        # Tasks may submit children (conveyor.current_client()) through these (inherited by its children);
        # with keys, only as the client whose key pair is in the worker's key directory too (docs/workflows.md).
        os.environ.pop(task_api.TASK_KEYS_ENV, None)
        os.environ.pop(task_api.TASK_DISPATCHER_ENV, None)
        if keys is None or _holds_client_keys(keys):
            os.environ[task_api.TASK_DISPATCHER_ENV] = connect
            if keys is not None:
                os.environ[task_api.TASK_KEYS_ENV] = str(keys)
        self.mode_name = mode
        self.concurrency = concurrency
        # Jobs held beyond the slots: tiny tasks then never wait a dispatcher round trip, at the price of
        # a queue on this worker that other workers cannot take from. None (auto): the dispatcher holds
        # that queue to ~2 ms of work by the tasks' durations, and jobs stuck behind a slow task come back.
        self.prefetch_auto = prefetch is None
        self.prefetch = AUTO_PREFETCH if prefetch is None else prefetch
        self.tags = sorted(set(tags or []))
        self.host = local_address_for(self.connect_address)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat_interval = heartbeat_interval
        self.liveness_beats = liveness_beats
        # Beat as often as whichever side asks for more; wait for the dispatcher as long as the slower side.
        # The dispatcher's interval arrives with its heartbeats.
        self._beat_every = heartbeat_interval
        self._patience = heartbeat_interval * liveness_beats
        self.drain_timeout = drain_timeout
        self.identity = f"w-{uuid.uuid4().hex[:12]}".encode()
        self.credentials = load_peer_credentials(keys, "worker") if keys is not None else None  # CurveZMQ
        self.max_message_size = max_message_size
        # Tasks' output and progress, sent as OUTPUT and PROGRESS a few times a second.
        self.reports = TaskReports(output_limit_chars)
        settings = ModeSettings(
            concurrency=concurrency,
            prefetch=self.prefetch,
            capture_output=capture_output,
            max_child_memory_bytes=max_child_memory_mib << 20 if max_child_memory_mib else None,
        )
        self.mode: Mode = mode_type(settings, self.reports)
        self.mode.on_lend = self._on_lend
        self.state = WorkerState(
            WorkerConfig(
                name=self.name,
                host=self.host,
                pid=os.getpid(),
                mode=mode,
                concurrency=concurrency,
                prefetch=self.prefetch,
                prefetch_auto=self.prefetch_auto,
                tags=tuple(self.tags),
                mode_queue=self.mode.queue_limit,
                drain_timeout=drain_timeout,
                max_message_size=max_message_size,
                shm=shm.namespace_id(),
            )
        )
        self._own_context = context is None
        # A plain context even when given a zmq.asyncio one (its sockets would return futures): a shadow of it.
        self._ctx: zmq.Context[Any] = zmq.Context.shadow(context.underlying) if context is not None else zmq.Context()
        self._sock: zmq.Socket[Any] | None = None
        self._sock_fd = -1  # its ZMQ_FD, registered with the loop while connected
        self._read_soon = False  # a read of the socket is scheduled on the loop (see _send)
        self._served: asyncio.Future[None] | None = None  # this connection's end: SHUTDOWN, REDIRECT, refused
        self._handshakes: HandshakeWatch | None = None
        self._handshakes_seen = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._timer_at = 0.0
        self._finished = asyncio.Event()
        self._stop_wanted = asyncio.Event()  # a stop request: it ends a backoff wait (connect, then drain)
        self._started = False  # the mode runs: events may flow
        self._early_stops = 0  # stop requests before that
        self._heard = False
        self._heard_beat = False  # a dispatcher HEARTBEAT on this socket (logged once)
        self._last_heard = 0.0
        # Touched by the worker's own loop every heartbeat interval, connected or not: a liveness probe that
        # reads it checks this process, never the dispatcher (conveyor-healthcheck worker --local).
        self.health_file = None if health_file is None else os.fspath(health_file)

    # --- lifecycle --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain. A second call: hand back what still runs, now. Call it on the worker's loop."""
        self._stop_wanted.set()
        if self._started:
            self._feed(StopRequested())
        else:
            self._early_stops += 1

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests run workers in threads too)
        self.reports.bind(loop, self._send_reports)
        await self.mode.start(self._on_outcomes)
        self._started = True
        for _ in range(self._early_stops):
            self._feed(StopRequested())
        log.info(
            "worker %s: %s x%d, tags %s, connecting to %s",
            self.name, self.mode_name, self.concurrency, self.tags or "-", self.connect_address,
        )
        backoff = 0.1
        health = asyncio.create_task(self._touch_health_file()) if self.health_file else None
        try:
            while not self.state.finished:
                self._open()
                how = await self._serve()
                self._close_socket()
                if self.state.finished:
                    break
                if self.state.draining:  # lost the dispatcher while draining: finish what we can, then go
                    await self._finished.wait()
                    break
                if how == "served":
                    backoff = 0.1
                if self.failover.several:  # the next address, or the one a REDIRECT named
                    self.connect_address = self.failover.reconnect(time.monotonic())
                    backoff = min(backoff, 0.25)
                log.warning("dispatcher unreachable; reconnecting in %.1f s", backoff)
                try:
                    await asyncio.wait_for(self._stop_wanted.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            if health is not None:
                health.cancel()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await self.mode.shutdown()
            self._close_socket(tell_state=False)
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

    # --- the connection -----------------------------------------------------------------------------

    def _open(self) -> None:
        """A new socket, hence a new connection for the state (READY, and what it must send again)."""
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        # a dead connection (half-open after a cut, a NAT that forgot it) is torn down within our
        # patience and made again, which the monitor below notices
        keep_links_alive(sock, self._patience)
        configure_socket(sock, self.credentials, self.max_message_size)
        sock.connect(self.connect_address)
        self._handshakes = watch_handshakes(sock, self.connect_address, self.credentials, "worker")
        self._handshakes_seen = 0
        if self._handshakes is not None and self._loop is not None:
            self._loop.add_reader(self._handshakes.socket.fileno(), self._check_handshakes)
        self._sock = sock
        self._heard_beat = False
        self._feed(Connected(uuid.uuid4().hex[:12]))

    def _close_socket(self, tell_state: bool = True) -> None:
        if self._handshakes is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._handshakes.socket.fileno())
            self._handshakes.log_failure()  # why the dispatcher never answered: it refused our keys (or none)
            self._handshakes.close()
            self._handshakes = None
        if self._sock is not None:
            if self._sock_fd >= 0 and self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock_fd)
            self._sock_fd = -1
            self._sock.close(linger=200)
            self._sock = None
            if tell_state:
                self._feed(Disconnected())

    def _check_handshakes(self) -> None:
        """A handshake after the first: ZeroMQ connected again under the same socket (the TCP connection
        broke), and what was queued on the old one may be lost. A new session for the state."""
        watch = self._handshakes
        if watch is None:
            return
        watch.log_failure()  # reads every event: failures are logged, successes counted
        n = watch.handshakes
        if n >= 2 and n > self._handshakes_seen:
            log.info("the connection to the dispatcher was made again; registering again")
            self._handshakes_seen = n
            self._feed(Connected(uuid.uuid4().hex[:12]))
        self._handshakes_seen = n

    async def _serve(self) -> str:
        """Serve one connection. Returns "done" (the state finished), "served" (lost the dispatcher after
        it had answered, or it said SHUTDOWN) or "silent" (it never answered)."""
        sock = self._sock
        loop = self._loop
        assert sock is not None and loop is not None
        self._heard = False
        self._last_heard = loop.time()
        next_beat = self._last_heard + self._beat_every
        served = self._served = loop.create_future()
        self._sock_fd = cast(int, sock.getsockopt(zmq.FD))
        loop.add_reader(self._sock_fd, self._read)
        self._read()  # ZMQ_FD only signals new events: read what came before it was registered
        finished = asyncio.ensure_future(self._finished.wait())
        try:
            while True:
                now = loop.time()
                if now >= next_beat:
                    self._send(Cmd.HEARTBEAT, _BEAT)
                    next_beat = now + self._beat_every
                    self._check_handshakes()  # in case the monitor's wake-up was missed
                    self._read()  # likewise for the socket's
                if now - self._last_heard > self._patience:
                    return "served" if self._heard else "silent"
                await asyncio.wait({served, finished}, timeout=max(0.0, next_beat - now),
                                   return_when=asyncio.FIRST_COMPLETED)
                if finished.done():
                    return "done"
                if served.done():
                    served.result()  # re-raises DispatcherRefused
                    return "served"  # the dispatcher said it is shutting down, or redirected us
        finally:
            finished.cancel()
            self._served = None
            if self._sock_fd >= 0:
                loop.remove_reader(self._sock_fd)
                self._sock_fd = -1

    def _read(self) -> None:
        """Handle every message waiting on the socket (called when its descriptor signals, and after sends)."""
        self._read_soon = False
        sock, served, loop = self._sock, self._served, self._loop
        if sock is None or served is None or served.done() or loop is None:
            return
        try:
            while (parts := recv_waiting(sock)) is not None:
                self._heard = True
                self._last_heard = loop.time()
                if not self._on_message(parts):
                    served.set_result(None)
                    return
                if self._sock is not sock:
                    return  # the state closed this socket meanwhile
        except DispatcherRefused as exc:
            served.set_exception(exc)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EAGAIN:
                raise

    def _on_message(self, parts: list[Any]) -> bool:
        """One message from the dispatcher; False means: drop this connection and connect again."""
        try:
            if not self.failover.admit(parts[1]):  # a dispatcher of a lower epoch than one obeyed
                self._send(Cmd.STALE, self.failover.stale_reply())
                return True
            msg = c.decode_message(parts)
            if msg.cmd == Cmd.REDIRECT:  # a passive dispatcher: connect where it says (or again)
                self.failover.redirected(msg.body, time.monotonic())
                return False
            if msg.cmd == Cmd.SHUTDOWN:
                log.info("dispatcher is shutting down")
                return False
            event = self._event_for(msg)
        except ProtocolError as exc:  # validated at the edge: the message is dropped, nothing else changes
            log.warning("ignoring a malformed message from the dispatcher: %s", exc)
            return True
        if event is not None:
            self._feed(event)
        return True

    def _event_for(self, msg: Message) -> Event | None:
        cmd, b = msg.cmd, msg.body
        if cmd == Cmd.ASSIGN:
            entries: list[c.AssignEntry] = b.tasks
            per_entry = split_frames([e.total_frames for e in entries], msg.frames)  # the call, then parents'
            tasks = []
            for e, frames in zip(entries, per_entry, strict=True):
                n_call = e.n_frames
                if e.shm:  # call frames on our host's /dev/shm: mapped, not received
                    frames, n_call = _map_segments(e, frames)
                if e.joined is not None:  # every parent succeeded: their results came joined
                    frames = pack_joined(n_call, e.joined, frames)
                elif e.parents:  # one header frame says which frames are whose (execution.load reads it)
                    ps = e.parents
                    others = [(i, p.job_id, p.state, p.error) for i, p in enumerate(ps) if p.state != "succeeded"]
                    frames = pack_task(n_call, [p.n_frames for p in e.parents], others, frames)
                tasks.append(Task(e.job_id, e.attempt, e.timeout, e.retry_on, frames))
            return Assigned(tasks, b.ack)
        if cmd == Cmd.CANCEL:
            return CancelRequested((b.job, b.attempt))
        if cmd == Cmd.HEARTBEAT:
            if not self._heard_beat:
                self._heard_beat = True
                log.info("connected to dispatcher %s", b.instance)
            theirs = b.heartbeat_interval
            if theirs is not None and theirs > 0:
                self._beat_every = min(self.heartbeat_interval, float(theirs))
                self._patience = max(self.heartbeat_interval, float(theirs)) * self.liveness_beats
            return Beat(b.instance, b.ack)
        if cmd == Cmd.RESEND:
            return ResendRequested(b.seq)
        if cmd == Cmd.RECONNECT:
            return ReconnectRequested()
        if cmd == Cmd.ERROR:
            log.error("dispatcher refused this worker: %s", b.message)
            raise DispatcherRefused(b.message)
        return None  # a command a worker is never sent: ignored

    # --- events in, actions out ---------------------------------------------------------------------

    def _on_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """The mode's report callback, on this loop."""
        self._feed(TasksEnded(outcomes))

    def _on_lend(self, key: tuple[str, int], lent: bool) -> None:
        """The mode's on_lend callback, on this loop: a task blocks on a child, or its wait is over."""
        self._feed(SlotLent(key) if lent else SlotBack(key))

    def _feed(self, event: Event) -> None:
        assert self._loop is not None
        try:
            actions = self.state.handle(event, self._loop.time())
        except Exception:  # a bug of ours: loud, with its traceback; the worker carries on
            log.exception("the worker's state failed on %s", type(event).__name__)
            return
        self._apply(actions)

    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            kind = type(a)
            if kind is Send:
                assert isinstance(a, Send)
                self._send(a.cmd, a.body, a.frames)
            elif kind is Start:
                assert isinstance(a, Start)
                self._start(a.tasks)
            elif kind is SendReports:
                assert isinstance(a, SendReports)
                for key in a.finished:
                    self.reports.finish(key)
                self._send_reports()
            elif kind is ArmTimer:
                assert isinstance(a, ArmTimer)
                self._arm(a.at)
            elif kind is Stop:
                assert isinstance(a, Stop)
                try:
                    self.mode.stop(a.key, a.reason)
                except Exception:  # its slot is free already: the state decided the outcome
                    log.exception("mode %s failed to stop %s", self.mode_name, a.key[0])
            elif kind is Withdraw:
                assert isinstance(a, Withdraw)
                self._feed(Withdrawn([key for key in a.keys if self._withdraw(key)]))
            elif kind is Log:
                assert isinstance(a, Log)
                log.log(a.level, "%s", a.message)
            elif kind is Finished:
                self._finished.set()

    def _start(self, tasks: Sequence[Task]) -> None:
        try:
            self.mode.submit(tasks)
        except Exception as exc:  # a bug in the mode: the tasks fail, and their slots come back
            log.exception("mode %s failed to take %d task(s)", self.mode_name, len(tasks))
            for task in tasks:
                try:
                    self.mode.stop(task.key, exc)
                except Exception:
                    pass
            self._feed(TasksEnded([failure(task, exc) for task in tasks]))

    def _withdraw(self, key: tuple[str, int]) -> bool:
        try:
            return self.mode.withdraw(key)
        except Exception:
            log.exception("mode %s failed to withdraw %s", self.mode_name, key[0])
            return False

    def _arm(self, at: float) -> None:
        """Feed Tick at `at` or sooner: one timer, the earliest asked for since it last fired."""
        loop = self._loop
        assert loop is not None
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer) if at > loop.time() else loop.call_soon(self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._feed(Tick())

    def _send_reports(self) -> None:
        """Send the running tasks' output and progress (dropped while disconnected: only the tail matters)."""
        progress, output = self.reports.take()
        if self._sock is None:
            return
        for batch in output:
            self._send(Cmd.OUTPUT, batch)
        if progress:
            self._send(Cmd.PROGRESS, progress)

    def _send(self, cmd: Cmd, body: Any, frames: Sequence[Any] = ()) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            send_parts(sock, encode(cmd, body, frames, self.failover.seen), NOBLOCK)  # SNDHWM 0: never waits
        except zmq.Again:
            log.warning("send queue full; dropping %s", cmd.name)
        # A send may take in the descriptor's signal for a message that arrived meanwhile (ZMQ_FD is
        # edge-triggered): then the loop would not wake for it, so read on its next turn.
        if not self._read_soon and self._served is not None and has_message(sock):
            self._read_soon = True
            assert self._loop is not None
            self._loop.call_soon(self._read)


def _map_segments(e: c.AssignEntry, frames: list[Any]) -> tuple[list[Any], int]:
    """The task's frames with its shared-memory ones mapped (read later, by the thread or child that runs
    the task), and how many are its call's; if one cannot be (removed meanwhile: the job was cancelled or
    given to another worker), a call that fails with the reason instead."""
    frames = list(frames)
    try:
        for ref in e.shm:
            if ref.index >= e.n_frames or memoryview(frames[ref.index]).nbytes:
                raise OSError("a shared-memory reference names a frame that is not an empty call frame")
            frames[ref.index] = shm.open_segment(ref.name, ref.nbytes)
    except OSError as exc:
        log.warning("job %s: its shared-memory argument cannot be mapped: %s", e.job_id, exc)
        call = encode_call("conveyor.transport.shm:unreadable", None, (str(exc),), {})
        return call + frames[e.n_frames :], len(call)  # the parents' frames, if any, follow as before
    return frames, e.n_frames


def run_worker(worker: Worker) -> int:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # tasks in the working directory are importable, as with `python -m`
    try:
        asyncio.run(worker.run())
    except DispatcherRefused:
        return 1
    return 0

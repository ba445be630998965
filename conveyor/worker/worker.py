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
from typing import Any
from urllib.parse import urlparse

import zmq
import zmq.asyncio

from conveyor.protocol import Cmd, Message, ProtocolError, decode, encode, split_frames
from conveyor.worker.execution import Outcome, Task
from conveyor.worker.modes import MODES, Mode

log = logging.getLogger("conveyor.worker")

MAX_BACKOFF = 5.0


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


class DispatcherRefused(Exception):
    """The dispatcher rejected this worker (protocol version)."""


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
        context: zmq.asyncio.Context | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        self.connect_address = connect
        self.mode_name = mode
        self.concurrency = concurrency or default_concurrency(mode)
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.tags = sorted(set(tags or []))
        self.host = local_address_for(connect)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.drain_timeout = drain_timeout
        self.identity = f"w-{uuid.uuid4().hex[:12]}".encode()
        self.mode: Mode = MODES[mode](self.concurrency)
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._running: dict[str, tuple[int, asyncio.Task[None]]] = {}
        self._outbox: list[Outcome] = []
        self._flush_scheduled = False
        self._stop = asyncio.Event()
        self._dispatcher_instance: str | None = None
        self._connected = False

    # --- lifecycle --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests run workers in threads too)
        await self.mode.start()
        log.info(
            "worker %s: %s x%d, tags %s, connecting to %s",
            self.name, self.mode_name, self.concurrency, self.tags or "-", self.connect_address,
        )
        backoff = 0.1
        try:
            while not self._stop.is_set():
                self._open()
                served = await self._serve()
                if self._stop.is_set():
                    break
                self._close_socket()
                if served:
                    backoff = 0.1
                log.warning("dispatcher unreachable; reconnecting in %.1f s", backoff)
                try:
                    await asyncio.wait_for(self._stop.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, MAX_BACKOFF)
            await self._drain()
        finally:
            await self.mode.shutdown()
            self._close_socket()
            if self._own_context:
                self._ctx.term()

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.connect_address)
        self._sock = sock
        self._connected = False
        self._send(Cmd.READY, self._ready_body())
        if self._outbox:
            self._flush()

    def _close_socket(self) -> None:
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
            "credit": self.concurrency - len(self._running),
            "running": [[job_id, attempt] for job_id, (attempt, _) in self._running.items()],
        }

    # --- the session loop -------------------------------------------------------------------------

    async def _serve(self) -> bool:
        """Serve until the dispatcher is lost or a stop is requested. True if the dispatcher answered."""
        sock = self._sock
        assert sock is not None
        heard = False
        last_heard = time.monotonic()
        next_beat = last_heard + self.heartbeat_interval
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                timeout = max(0.0, next_beat - now)
                recv = asyncio.ensure_future(sock.poll(int(timeout * 1000) + 1))
                await asyncio.wait({recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not recv.done():
                    recv.cancel()
                    break
                if recv.result():
                    while True:
                        try:
                            parts = await sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        heard = True
                        last_heard = time.monotonic()
                        if not self._handle(parts):
                            return heard
                now = time.monotonic()
                if now >= next_beat:
                    self._send(Cmd.HEARTBEAT, {"role": "worker"})
                    next_beat = now + self.heartbeat_interval
                if now - last_heard > self.heartbeat_interval * self.liveness:
                    return heard
            return heard
        finally:
            stop_wait.cancel()

    def _handle(self, parts: list[Any]) -> bool:
        """Handle one message; False means: drop this connection and reconnect."""
        try:
            msg = decode(parts)
        except ProtocolError as exc:
            log.warning("ignoring a malformed message from the dispatcher: %s", exc)
            return True
        if msg.cmd == Cmd.ASSIGN:
            self._on_assign(msg)
        elif msg.cmd == Cmd.CANCEL:
            job_id = str(msg.body["job"])
            entry = self._running.get(job_id)
            if entry is not None and entry[0] == int(msg.body["attempt"]):
                self.mode.cancel(job_id)
        elif msg.cmd == Cmd.HEARTBEAT:
            instance = msg.body.get("instance")
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
            log.error("dispatcher refused this worker: %s", msg.body.get("message"))
            raise DispatcherRefused(str(msg.body.get("message")))
        return True

    def _on_assign(self, msg: Message) -> None:
        entries = msg.body
        per_entry = split_frames([int(e[4]) for e in entries], msg.frames)
        for (job_id, attempt, timeout, retry_on, _), frames in zip(entries, per_entry, strict=True):
            task = Task(str(job_id), int(attempt), timeout, tuple(retry_on), frames)
            runner = asyncio.create_task(self._run_task(task))
            self._running[task.job_id] = (task.attempt, runner)

    async def _run_task(self, task: Task) -> None:
        try:
            outcome = await self.mode.run(task)
        except asyncio.CancelledError:
            return  # handed back during drain
        except Exception as exc:  # a bug in a mode must not kill the worker; report it as the task's failure
            log.exception("mode %s failed running %s", self.mode_name, task.job_id)
            from conveyor.worker.execution import failure

            outcome = failure(task, exc)
        finally:
            entry = self._running.get(task.job_id)
            if entry is not None and entry[0] == task.attempt:
                del self._running[task.job_id]
        self._outbox.append(outcome)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send every finished outcome in one RESULTS message (batched per loop turn)."""
        self._flush_scheduled = False
        if not self._outbox or self._sock is None:
            return
        outcomes, self._outbox = self._outbox, []
        entries = []
        frames: list[Any] = []
        for o in outcomes:
            entries.append([o.job_id, o.attempt, o.ok, o.info, len(o.frames)])
            frames.extend(o.frames)
        self._send(Cmd.RESULTS, entries, frames)

    def _send(self, cmd: Cmd, body: Any, frames: list[Any] | None = None) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send_multipart(encode(cmd, body, frames or ()), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("send queue full; dropping %s", cmd.name)

    # --- shutdown ---------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Finish running tasks within drain_timeout, hand the rest back, say goodbye."""
        if self._sock is None:
            self._open()
        self._send(Cmd.LEAVING, {})
        if self._running:
            log.info("draining %d running task(s), up to %.0f s", len(self._running), self.drain_timeout)
            tasks = [t for _, t in self._running.values()]
            await asyncio.wait(tasks, timeout=self.drain_timeout)
        self._flush()
        if self._running:
            handed = [[job_id, attempt] for job_id, (attempt, _) in self._running.items()]
            for job_id, (_, t) in list(self._running.items()):
                self.mode.cancel(job_id)
                t.cancel()
            self._send(Cmd.GIVEBACK, handed)
            log.info("handed back %d unfinished task(s)", len(handed))
        self._send(Cmd.GOODBYE, {})
        self._close_socket()


def run_worker(worker: Worker) -> int:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # tasks in the working directory are importable, as with `python -m`
    try:
        asyncio.run(worker.run())
    except DispatcherRefused:
        return 1
    return 0

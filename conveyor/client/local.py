"""A local cluster: a dispatcher and workers as child processes of this one, owned and stopped by it.

Used by `Client()` / `Executor()` with no address and by `conveyor up`.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import IO, Any

from conveyor.errors import ConveyorError

STOP_TIMEOUT = 10.0


def conveyor_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", *args]


def spawn_command(role: str, options: dict[str, Any]) -> list[str]:
    """`conveyor dispatcher|worker` with these keyword options, run without the command-line parser (it
    costs each process ~13 MiB and 50 ms: conveyor/cli/spawn.py); the options are the command's own."""
    return [sys.executable, "-m", "conveyor.cli.spawn", role, json.dumps(options)]


class LocalCluster:
    def __init__(
        self,
        workers: int = 1,
        mode: str = "processes",
        concurrency: int | None = None,
        bind: str = "tcp://127.0.0.1:0",
        tags: list[str] | None = None,
        log_level: str = "warning",
        quiet: bool = True,
        journal: str | None = None,
        journal_sync: str = "normal",
        keys: str | None = None,
        insecure: bool = False,
        prefetch: int | None = None,
    ):
        self.prefetch = prefetch
        self.journal = journal  # None: a private cluster keeps its jobs in memory
        self.journal_sync = journal_sync
        self.keys = keys  # a key directory (`conveyor keys init`): CurveZMQ for the dispatcher and workers
        self.insecure = insecure
        self.n_workers = workers
        self.mode = mode
        self.concurrency = concurrency
        self.bind = bind
        self.tags = tags or []
        self.log_level = log_level
        self.quiet = quiet
        self.address: str | None = None
        self.dispatcher: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._stderr: list[IO[bytes] | None] = []  # per worker, when quiet: its stderr, for failure()

    def start(self, timeout: float = 30.0) -> str:
        """Start the dispatcher and the workers; returns the dispatcher's address once it listens.

        When the address is known before the dispatcher binds (a free port picked here for port 0, or a
        given port seen free), the workers start at the same time as the dispatcher and connect when it
        listens (ZeroMQ retries): start-up costs one interpreter's start, not two in a row."""
        for attempt in range(2):
            planned = _planned_address(self.bind)
            try:
                self.dispatcher = self._start_dispatcher(planned or self.bind)
                if planned is not None:
                    self._start_workers(planned)
                try:
                    self.address = self._read_endpoint(self.dispatcher, timeout)
                except ConveyorError:
                    if planned is None or attempt or not self.bind.endswith(":0"):
                        raise
                    self.stop()  # another process took the port picked for us in between: once more
                    continue
                if planned is None:
                    self._start_workers(self.address)
            except BaseException:
                self.stop()
                raise
            break
        assert self.address is not None
        return self.address

    def _start_dispatcher(self, bind: str) -> subprocess.Popen[bytes]:
        options = {"bind": bind, "log_level": self.log_level, "keys": self.keys, "insecure": self.insecure}
        if self.journal:
            options.update(journal=self.journal, journal_sync=self.journal_sync)
        else:
            options["no_journal"] = True
        return subprocess.Popen(
            spawn_command("dispatcher", options),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if self.quiet else None,
            start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
        )

    def _start_workers(self, address: str) -> None:
        out = subprocess.DEVNULL if self.quiet else None
        for i in range(self.n_workers):
            options = {
                "connect": address, "mode": self.mode, "log_level": self.log_level, "name": f"local-{i + 1}",
                "keys": self.keys, "concurrency": self.concurrency, "tag": self.tags,
                # None: the worker's default, auto
                "prefetch": "auto" if self.prefetch is None else str(self.prefetch),
            }
            # Quiet, a worker's stderr still goes to a file: if it exits at once (a mode this Python
            # cannot run, say), its last line is the reason the client gives (see failure()).
            err = tempfile.TemporaryFile() if self.quiet else None  # noqa: SIM115 (closed in stop())
            self._stderr.append(err)
            self.workers.append(subprocess.Popen(
                spawn_command("worker", options), stdout=out, stderr=err, start_new_session=True,
            ))

    def failure(self) -> str | None:
        """Why a worker of this cluster exited (its last line on stderr), or None while all run."""
        for proc, err in zip(self.workers, self._stderr, strict=True):
            code = proc.poll()
            if code is None:
                continue
            last = ""
            if err is not None:
                err.seek(0)
                lines = [ln.strip() for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
                last = lines[-1] if lines else ""
            return f"a local worker exited (code {code}){': ' + last if last else ''}"
        return None

    @staticmethod
    def _read_endpoint(proc: subprocess.Popen[bytes], timeout: float) -> str:
        """The dispatcher prints its endpoint as its first stdout line once bound."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(deadline - time.monotonic()):
                    line = proc.stdout.readline().decode().strip()
                    if line.startswith("tcp://") or line.startswith("ipc://"):
                        return line
                    if not line and proc.poll() is not None:
                        break
        raise ConveyorError(f"the local dispatcher did not start (exit code {proc.poll()})")

    def stop(self) -> None:
        """Stop workers first (they drain), then the dispatcher; kill whatever outlives the timeout."""
        for proc in self.workers:
            _signal(proc, signal.SIGTERM)
        for proc in self.workers:
            _wait_or_kill(proc)
        self.workers = []
        for err in self._stderr:
            if err is not None:
                err.close()
        self._stderr = []
        if self.dispatcher is not None:
            _signal(self.dispatcher, signal.SIGTERM)
            _wait_or_kill(self.dispatcher)
            if self.dispatcher.stdout is not None:
                self.dispatcher.stdout.close()
            self.dispatcher = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _wait_or_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _planned_address(bind: str) -> str | None:
    """The address the dispatcher will listen on, known before it starts: a tcp:// bind to a concrete host
    with port 0 gets a free port picked here, a given port is checked free. None: learn it from the
    dispatcher (a wildcard host, a port in use: the dispatcher reports the error, not our workers)."""
    if not bind.startswith("tcp://"):
        return None
    host, _, port = bind[len("tcp://"):].rpartition(":")
    if host in ("", "*", "0.0.0.0", "[::]", "::") or not port.isdigit():
        return None
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is free
            probe.bind((bare, int(port)))
            return f"tcp://{host}:{probe.getsockname()[1]}"
    except OSError:
        return None

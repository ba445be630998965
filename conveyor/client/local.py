"""A local cluster: a dispatcher and workers as child processes of this one, owned and stopped by it.

Used by `Client()` / `Executor()` with no address and by `conveyor up`.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import IO

from conveyor.errors import ConveyorError

STOP_TIMEOUT = 10.0


def conveyor_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", *args]


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
        out = subprocess.DEVNULL if self.quiet else None
        self.dispatcher = subprocess.Popen(
            conveyor_command(
                "dispatcher", "--bind", self.bind, "--log-level", self.log_level,
                *(
                    ["--journal", self.journal, "--journal-sync", self.journal_sync]
                    if self.journal
                    else ["--no-journal"]
                ),
                *(["--keys", self.keys] if self.keys else []), *(["--insecure"] if self.insecure else []),
            ),
            stdout=subprocess.PIPE,
            stderr=out,
            start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
        )
        try:
            self.address = self._read_endpoint(self.dispatcher, timeout)
            for i in range(self.n_workers):
                args = ["worker", "--connect", self.address, "--mode", self.mode, "--log-level", self.log_level]
                args += ["--name", f"local-{i + 1}"]
                if self.keys:
                    args += ["--keys", self.keys]
                if self.concurrency:
                    args += ["--concurrency", str(self.concurrency)]
                if self.prefetch is not None:  # None: the worker's default, auto
                    args += ["--prefetch", str(self.prefetch)]
                for tag in self.tags:
                    args += ["--tag", tag]
                # Quiet, a worker's stderr still goes to a file: if it exits at once (a mode this Python
                # cannot run, say), its last line is the reason the client gives (see failure()).
                err = tempfile.TemporaryFile() if self.quiet else None  # noqa: SIM115 (closed in stop())
                self._stderr.append(err)
                self.workers.append(
                    subprocess.Popen(conveyor_command(*args), stdout=out, stderr=err, start_new_session=True)
                )
        except BaseException:
            self.stop()
            raise
        return self.address

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

"""Fixtures: real dispatcher and worker processes on 127.0.0.1 with ephemeral ports.

Every test is checked for leaked processes: whatever it started must be gone when it ends.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conveyor import Client

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 0.2  # fast heartbeats keep loss-detection tests short


def conveyor_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", *args]


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll a condition until it holds or the deadline passes (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Cluster:
    """A dispatcher plus any number of workers, each a real process."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.dispatcher: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.bind = "tcp://127.0.0.1:0"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: list[Client] = []
        self._n = 0

    def start_dispatcher(self, *extra: str) -> str:
        log = open(self.tmp / "dispatcher.log", "ab")  # noqa: SIM115 - closed with the process
        self.dispatcher = subprocess.Popen(
            conveyor_cmd(
                "dispatcher", "--bind", self.bind, "--heartbeat-interval", str(HEARTBEAT),
                "--journal", str(self.tmp / "journal.db"), *extra,
            ),
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
        )
        assert self.dispatcher.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.dispatcher.stdout, selectors.EVENT_READ)
            assert sel.select(20), "dispatcher did not print its endpoint"
        self.address = self.dispatcher.stdout.readline().decode().strip()
        assert self.address.startswith("tcp://127.0.0.1:"), self.address
        self.bind = self.address  # a restart binds the same port, so clients and workers find it again
        return self.address

    def start_worker(
        self, mode: str = "threads", concurrency: int = 2, tags: list[str] | None = None, name: str | None = None,
        *extra: str,
    ) -> str:
        self._n += 1
        name = name or f"{mode}-{self._n}"
        args = ["worker", "--connect", self.address, "--mode", mode, "--concurrency", str(concurrency)]
        args += ["--name", name, "--heartbeat-interval", str(HEARTBEAT), *extra]
        for tag in tags or []:
            args += ["--tag", tag]
        log = open(self.tmp / f"worker-{name}.log", "ab")  # noqa: SIM115
        self.workers[name] = subprocess.Popen(conveyor_cmd(*args), stdout=log, stderr=log, cwd=ROOT)
        return name

    def client(self, **kwargs: Any) -> Client:
        c = Client(self.address, **kwargs)
        self.clients.append(c)
        return c

    def wait_for_workers(self, *names: str, timeout: float = 20.0) -> dict[str, Any]:
        c = self.clients[0] if self.clients else self.client()

        def ready() -> dict[str, Any] | None:
            status = c.status()
            present = {w["name"] for w in status["workers"]}
            return status if set(names) <= present else None

        return wait_until(ready, timeout, what=f"workers {names} to register")  # type: ignore[no-any-return]

    def worker_pid(self, name: str) -> int:
        return self.workers[name].pid

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        for proc in self.workers.values():
            stop_process(proc)
        if self.dispatcher is not None:
            stop_process(self.dispatcher)
            if self.dispatcher.stdout is not None:
                self.dispatcher.stdout.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_dispatcher()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves any process it started still running."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def leftovers() -> list[psutil.Process]:
        out = []
        for p in me.children(recursive=True):
            try:
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = leftovers()
    for p in leaked:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not leaked, f"leaked processes: {[(p.pid, p.cmdline()[:4]) for p in leaked]}"


@pytest.fixture(autouse=True)
def _no_dispatcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_DISPATCHER", raising=False)
    monkeypatch.delenv("CONVEYOR_KEYS", raising=False)  # keys are given explicitly where a test uses them
    monkeypatch.delenv("CONVEYOR_INSECURE", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
pytest_plugins = ["tests.conftest_netns"]

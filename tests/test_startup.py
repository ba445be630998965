"""Start-up (issue 19): each role loads only what it uses, a local cluster knows its address before its
dispatcher binds, its processes start without the command-line parser, and `conveyor up` says it is up
once a worker has registered. Figures are benchmarks/startup.py's; nothing here times anything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conveyor import Client
from conveyor.client.local import _planned_address
from tests.conftest import ROOT, conveyor_cmd, stop_process


def _loaded(code: str, roots: tuple[str, ...]) -> list[str]:
    """The modules under these roots that `code` leaves loaded, in a fresh interpreter."""
    probe = (f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules "
             f"if m.split('.')[0] in {roots!r} or '.'.join(m.split('.')[:2]) in {roots!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return list(json.loads(out.stdout))


UNUSED = ("rich", "matplotlib", "prometheus_client", "conveyor.client", "conveyor.demo", "conveyor.cluster")


def test_the_dispatcher_role_loads_no_client_rich_asyncio_pickler_or_other_commands() -> None:
    code = "from conveyor.cli import run, spawn; import conveyor.dispatcher.server, conveyor.dispatcher.journal"
    roots = (*UNUSED, "asyncio", "conveyor.worker", "typer._adapters", "cloudpickle")
    assert _loaded(code, roots) == []
    commands = _loaded(code, ("conveyor.cli",))
    assert commands == ["conveyor.cli", "conveyor.cli.common", "conveyor.cli.run", "conveyor.cli.spawn"]


def test_the_worker_role_loads_only_its_mode() -> None:
    code = "from conveyor.cli import run; import conveyor.worker.server as s; s.MODES['processes']"
    assert _loaded(code, (*UNUSED, "conveyor.dispatcher", "sqlite3", "cloudpickle")) == []  # (its children pickle)
    modes = [m for m in _loaded(code, ("conveyor.worker",)) if m.startswith("conveyor.worker.modes.")]
    assert modes == ["conveyor.worker.modes.base", "conveyor.worker.modes.processes",
                     "conveyor.worker.modes.processes.channel", "conveyor.worker.modes.processes.child",
                     "conveyor.worker.modes.processes.forkserver"]


def test_a_processes_child_loads_no_asyncio_psutil_or_sockets() -> None:
    # What the fork server preloads, hence what every child carries.
    code = "import conveyor.worker.modes.processes.child, conveyor.worker.modes.processes.forkserver"
    assert _loaded(code, ("asyncio", "psutil", "zmq", "typer", "multiprocessing")) == []


def test_a_local_cluster_plans_a_free_address_and_leaves_taken_or_wildcard_ones_to_the_dispatcher() -> None:
    planned = _planned_address("tcp://127.0.0.1:0")
    assert planned is not None and planned.startswith("tcp://127.0.0.1:")
    port = int(planned.rsplit(":", 1)[1])
    assert port > 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # it was free: the dispatcher can take it
        s.listen()
        assert _planned_address(f"tcp://127.0.0.1:{port}") is None  # in use: the dispatcher says so itself
    assert _planned_address("tcp://0.0.0.0:0") is None
    assert _planned_address("tcp://*:5555") is None
    assert _planned_address("ipc:///tmp/x") is None


def test_spawn_runs_the_command_with_its_checks_and_one_line_errors() -> None:
    bad = subprocess.run([sys.executable, "-m", "conveyor.cli.spawn", "worker",
                          json.dumps({"connect": "tcp://127.0.0.1:1", "mode": "nope"})],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: unknown mode 'nope': choose one of threads, processes, asyncio, interpreters"], bad.stderr
    usage = subprocess.run([sys.executable, "-m", "conveyor.cli.spawn", "client", "{}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1 and "Traceback" not in usage.stderr
    for options in ("{bad", '{"nope": 1}', "[1]"):  # malformed, an unknown name, not an object
        wrong = subprocess.run([sys.executable, "-m", "conveyor.cli.spawn", "worker", options],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1, wrong.stderr
        assert wrong.stderr.startswith("error: bad OPTIONS_JSON for worker: "), wrong.stderr


def test_up_says_it_is_up_once_a_worker_has_registered(tmp_path: Path) -> None:
    up = subprocess.Popen(
        conveyor_cmd("up", "--workers", "1", "--mode", "threads", "--bind", "tcp://127.0.0.1:0",
                     "--log-level", "warning"),
        cwd=ROOT, env={**os.environ, "XDG_STATE_HOME": str(tmp_path)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert up.stderr is not None
        line = up.stderr.readline()  # blocks until up prints: no sleep, no deadline of ours but the timeout
        assert line.startswith("conveyor is up: dispatcher at "), line
        address = line.split("dispatcher at ")[1].split(",")[0]
        with Client(address) as client:
            assert len(client.status()["workers"]) >= 1  # already there when it said so
    finally:
        assert stop_process(up, signal.SIGINT) == 0

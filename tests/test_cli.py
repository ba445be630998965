"""The `conveyor` command line, run as real subprocesses against a real dispatcher and workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, Cluster, conveyor_cmd, wait_until

CLI_TIMEOUT = 60.0


def run_cli(
    *args: str, address: str | None = None, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run `conveyor ARGS...` (as `python -m conveyor`) from the repository root and capture its output."""
    full_env = {**os.environ, **(env or {})}
    if address is not None:
        full_env["CONVEYOR_DISPATCHER"] = address
    return subprocess.run(
        conveyor_cmd(*args), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_many(commands: list[tuple[str, ...]], address: str | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Several CLI runs at once (each is a separate process), results in order."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda args: run_cli(*args, address=address), commands))


def show(proc: subprocess.CompletedProcess[str]) -> str:
    return f"args={proc.args[3:]} rc={proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"


def assert_ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, show(proc)
    return proc.stdout


def assert_one_error_line(proc: subprocess.CompletedProcess[str], code: int | None) -> str:
    """The CLI's error contract: exactly one `error: ...` line on stderr, a non-zero exit, no Python traceback."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    if code is None:
        assert proc.returncode != 0, show(proc)
    else:
        assert proc.returncode == code, show(proc)
    return lines[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- submitting -------------------------------------------------------------------------------------


def test_submit_wait_runs_in_each_mode(cluster: Cluster) -> None:
    names = {mode: cluster.start_worker(mode, 2, name=f"cli-{mode}") for mode in ("threads", "processes", "asyncio")}
    cluster.wait_for_workers(*names.values())
    threads, processes, asyncio_, *adds = run_many(
        [
            ("submit", "tests.tasks:whoami", "--mode", "threads", "--wait"),
            ("submit", "tests.tasks:whoami", "--mode", "processes", "--wait"),
            ("submit", "tests.tasks:async_whoami", "--mode", "asyncio", "--wait"),
            *[("submit", "tests.tasks:add", "2", "3", "--mode", mode, "--wait") for mode in names],
        ],
        address=cluster.address,
    )
    info = json.loads(assert_ok(threads))
    assert info["pid"] == cluster.worker_pid(names["threads"]) and info["thread"].startswith("conveyor-task")

    info = json.loads(assert_ok(processes))
    worker = psutil.Process(cluster.worker_pid(names["processes"]))
    assert info["pid"] in {p.pid for p in worker.children(recursive=True)}

    info = json.loads(assert_ok(asyncio_))
    assert info["pid"] == cluster.worker_pid(names["asyncio"]) and info["in_loop"]

    for proc in adds:
        assert assert_ok(proc) == "5\n"
        assert proc.stderr == ""


def test_arguments_are_json_else_strings(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    cases: list[tuple[tuple[str, ...], str]] = [
        (("tests.tasks:add", "2", "3"), "5"),
        (("tests.tasks:add", "-1", "5"), "4"),  # a negative number is an argument, not an option
        (("tests.tasks:add", "1.5", "1"), "2.5"),
        (("tests.tasks:add", "a", "b"), "ab"),  # not JSON: passed as strings
        (("tests.tasks:add", "[1]", "[2, 3]"), "[1, 2, 3]"),
        (("tests.tasks:noop", "hello world"), "hello world"),
        (("tests.tasks:noop", '"quoted"'), "quoted"),  # a JSON string
        (("tests.tasks:noop", "{not json"), "{not json"),
        (("tests.tasks:noop", '{"k": [1, null, true]}'), '{"k": [1, null, true]}'),
        (("tests.tasks:noop", "null"), "null"),
        (("tests.tasks:add", "2", "--kwargs", '{"b": 5}'), "7"),
        (("tests.tasks:add", "--kwargs", '{"a": "x", "b": "y"}'), "xy"),
    ]
    procs = run_many([("submit", *args, "--wait") for args, _ in cases], address=cluster.address)
    for (_, expected), proc in zip(cases, procs, strict=True):
        assert assert_ok(proc) == expected + "\n", show(proc)

    # the address can come from --dispatcher instead of the environment
    proc = run_cli("submit", "--dispatcher", cluster.address, "tests.tasks:add", "20", "22", "--wait")
    assert assert_ok(proc) == "42\n"


def test_submit_prints_an_id_then_result_fetches_it(cluster: Cluster) -> None:
    # no worker offers the tag yet, so the job stays queued: `submit` must return without waiting for it
    proc = run_cli("submit", "tests.tasks:add", "20", "22", "--tag", "later", address=cluster.address)
    job_id = assert_ok(proc).strip()
    assert job_id and len(proc.stdout.splitlines()) == 1 and " " not in job_id, show(proc)

    as_json = run_cli("submit", "tests.tasks:noop", "x", "--tag", "later", "--json", address=cluster.address)
    other_id = json.loads(assert_ok(as_json))["id"]
    assert other_id != job_id

    assert assert_ok(run_cli("result", job_id, address=cluster.address)) == "queued\n"
    queued = json.loads(assert_ok(run_cli("result", job_id, "--json", address=cluster.address)))
    assert queued["id"] == job_id and queued["state"] == "queued"

    name = cluster.start_worker("threads", 2, tags=["later"], name="late-worker")
    assert assert_ok(run_cli("result", job_id, "--wait", address=cluster.address)) == "42\n"
    record = json.loads(assert_ok(run_cli("result", job_id, "--json", address=cluster.address)))
    assert {"id", "state", "result", "worker", "attempts"} <= record.keys()
    assert record["id"] == job_id and record["state"] == "succeeded" and record["result"] == 42
    assert record["worker"] == name and record["attempts"] == 1
    assert assert_ok(run_cli("result", other_id, "--wait", "--timeout", "30", address=cluster.address)) == "x\n"

    missing = run_cli("result", "no-such-job", address=cluster.address)
    assert "no-such-job" in assert_one_error_line(missing, 1)


def test_status(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 1, tags=["cli"], name="sw")
    cluster.wait_for_workers(name)
    client = cluster.client()
    busy = client.submit("tests.tasks:spin", 60)
    queued = client.submit("tests.tasks:noop", 1)
    try:
        wait_until(lambda: client.status()["running"] == 1, what="the task to start")
        wait_until(lambda: client.status()["queued"] == 1, what="the job to be queued")
        as_json, table = run_many(
            [("status", "--json"), ("status", "--dispatcher", cluster.address)], cluster.address
        )
    finally:
        client.cancel(busy, queued)

    status = json.loads(assert_ok(as_json))
    assert status["queued"] == 1 and status["running"] == 1
    [worker] = status["workers"]
    assert worker["name"] == name and worker["pid"] == cluster.worker_pid(name)
    assert worker["host"] == "127.0.0.1" and worker["mode"] == "threads"
    assert worker["concurrency"] == 1 and worker["running"] == 1 and worker["tags"] == ["cli"]
    # auto prefetch (the default), and no task finished yet: no window beyond its slot
    assert worker["prefetch_auto"] is True and worker["window"] == 0
    assert status["dispatcher"]["endpoint"] == cluster.address

    text = assert_ok(table)
    assert "1 queued, 1 running" in text, text
    for header in ("worker", "host", "pid", "mode", "busy", "prefetch"):
        assert header in text, text
    row = next(line for line in text.splitlines() if name in line)
    assert str(cluster.worker_pid(name)) in row and "threads" in row and "1/1" in row, text
    assert "auto (0)" in row, text


def test_cancel_a_queued_job(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 1))
    client = cluster.client()
    blocker = assert_ok(run_cli("submit", "tests.tasks:spin", "60", address=cluster.address)).strip()
    wait_until(lambda: client.status()["running"] == 1, what="the long task to start")
    job_id = assert_ok(run_cli("submit", "tests.tasks:noop", "never", address=cluster.address)).strip()
    assert client.status()["queued"] == 1

    assert assert_ok(run_cli("cancel", job_id, address=cluster.address)) == f"{job_id} cancelled\n"
    record_proc, text_proc, again = run_many(
        [("result", job_id, "--json"), ("result", job_id), ("cancel", job_id)], cluster.address
    )
    assert record_proc.returncode == 1, show(record_proc)
    record = json.loads(record_proc.stdout)
    assert record["state"] == "cancelled" and record["attempts"] == 0 and record["worker"] is None
    assert record["error"]["type"] == "JobCancelled"
    assert "cancelled" in assert_one_error_line(text_proc, 1)
    assert again.returncode == 1 and "not cancelled" in again.stdout, show(again)

    # free the worker: a running job can be cancelled by id too
    assert assert_ok(run_cli("cancel", blocker, address=cluster.address)) == f"{blocker} cancelled\n"
    assert client.status()["totals"]["succeeded"] == 0  # the cancelled job never ran


# --- outcomes -------------------------------------------------------------------------------------


def test_shell_command(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 2))
    failing, ok = run_many(
        [
            ("submit", "--shell", "echo out; echo err >&2; exit 3", "--wait"),
            ("submit", "--shell", "printf 'a b\\n'", "--wait"),
        ],
        cluster.address,
    )
    assert failing.returncode == 3, show(failing)
    assert failing.stdout == "out\n" and failing.stderr == "err\n", show(failing)
    assert assert_ok(ok) == "a b\n" and ok.stderr == ""


def test_failures(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 4))
    as_json, raised, no_module, no_attr = run_many(
        [
            ("submit", "tests.tasks:fail", "--wait", "--json"),
            ("submit", "tests.tasks:fail", "bad input", "--wait"),
            ("submit", "nosuch_module_xyz:fn", "--wait"),
            ("submit", "tests.tasks:missing", "1", "--wait"),
        ],
        cluster.address,
    )

    assert as_json.returncode == 1, show(as_json)
    assert len(as_json.stdout.splitlines()) == 1, show(as_json)
    record = json.loads(as_json.stdout)
    assert record["state"] == "failed" and record["attempts"] == 1
    assert record["error"]["type"] == "ValueError" and record["error"]["message"] == "boom"
    assert "result" not in record

    # a task's exception: the remote traceback, then one `error:` line last
    assert raised.returncode == 1 and raised.stdout == "", show(raised)
    lines = raised.stderr.splitlines()
    assert lines[0].startswith("Remote traceback"), show(raised)
    assert "tests/tasks.py" in raised.stderr and "raise ValueError(message)" in raised.stderr
    assert lines[-1].startswith("error: ") and lines[-1].endswith("ValueError: bad input"), show(raised)
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "conveyor/cli.py" not in raised.stderr  # no local traceback, only the task's

    # an unknown function: one line, no traceback of any kind
    assert "nosuch_module_xyz" in assert_one_error_line(no_module, 1)
    assert "has no attribute" in assert_one_error_line(no_attr, 1)


def test_dispatcher_not_running_is_one_fast_error() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    commands: list[tuple[str, ...]] = [
        ("status",),
        ("submit", "tests.tasks:add", "1", "2", "--wait"),
        ("submit", "tests.tasks:add", "1", "2"),
        ("result", "some-id", "--wait"),
        ("cancel", "some-id"),
    ]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        procs = list(
            pool.map(lambda a: run_cli(*a, address=address, env={"CONVEYOR_CONNECT_TIMEOUT": "1"}), commands)
        )
    assert time.monotonic() - started < 10
    for proc in procs:
        line = assert_one_error_line(proc, None)
        assert "no Conveyor dispatcher answered" in line and address in line, show(proc)
        assert proc.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ("submit",),
        ("submit", "--wait"),
        ("submit", "add"),
        ("submit", ":add"),
        ("submit", "tests.tasks:"),
        ("submit", "tests.tasks:add", "--kwargs", "{bad json"),
        ("submit", "tests.tasks:add", "--kwargs", "[1, 2]"),
        ("submit", "tests.tasks:add", "1", "--mode", "bogus"),
        ("submit", "tests.tasks:add", "--retries", "many"),
        ("submit", "tests.tasks:add", "--timeout"),
        ("submit", "--shell", "true", "tests.tasks:add"),
        ("submit", "--no-such-option", "tests.tasks:add"),
        ("status", "--no-such-option"),
        ("result",),
        ("result", "id", "--timeout", "soon"),
        ("cancel",),
        ("frobnicate",),
        ("worker", "--mode", "bogus"),
        ("worker", "--mode", "threads", "--concurrency", "0"),
        ("worker", "--mode", "threads", "--concurrency", "-1"),
        ("up", "--mode", "bogus"),
        ("dispatcher", "--log-level", "loud"),
    ],
    ids=lambda a: " ".join(a),
)
def test_malformed_arguments_are_one_usage_error(args: tuple[str, ...]) -> None:
    # nothing listens here: a command that wrongly got as far as connecting fails with exit 1, not 2
    try:
        proc = run_cli(
            *args, address=f"tcp://127.0.0.1:{free_port()}", env={"CONVEYOR_CONNECT_TIMEOUT": "1"}, timeout=8
        )
    except subprocess.TimeoutExpired as exc:
        command = " ".join(args)
        raise AssertionError(f"`conveyor {command}` ran on instead of refusing its arguments: {exc.stderr!r}") from None
    assert_one_error_line(proc, 2)
    assert proc.stdout == "", show(proc)


def test_an_unknown_option_after_the_function_is_a_usage_error(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 1))
    proc = run_cli("submit", "tests.tasks:add", "1", "2", "--wiat", address=cluster.address)
    line = assert_one_error_line(proc, 2)  # a typo must not silently submit add(1, 2, "--wiat")
    assert "--wiat" in line
    assert proc.stdout == "", show(proc)
    assert cluster.client().status()["totals"].get("submitted", 0) == 0


# --- conveyor up ----------------------------------------------------------------------------------


def test_up_runs_a_cluster_and_sigint_stops_all_of_it(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    log_path = tmp_path / "up.log"
    state = tmp_path / "state"  # `up` keeps a journal under $XDG_STATE_HOME: not the user's own
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            conveyor_cmd("up", "--workers", "2", "--mode", "threads", "--bind", address),
            cwd=ROOT,
            env={**os.environ, "XDG_STATE_HOME": str(state)},
            stdout=log,
            stderr=log,
        )
    descendants: list[psutil.Process] = []
    try:
        env = {"CONVEYOR_CONNECT_TIMEOUT": "1"}

        def two_workers() -> dict[str, Any] | None:
            assert up.poll() is None, f"`conveyor up` exited with {up.returncode}:\n{log_path.read_text()}"
            proc = run_cli("status", "--json", address=address, env=env, timeout=20)
            if proc.returncode != 0:
                return None
            status: dict[str, Any] = json.loads(proc.stdout)
            return status if len(status["workers"]) == 2 else None

        status = wait_until(two_workers, 30, interval=0.1, what="`conveyor up` to have 2 workers")
        assert {w["mode"] for w in status["workers"]} == {"threads"}
        assert status["dispatcher"]["endpoint"] == address
        assert assert_ok(run_cli("submit", "tests.tasks:add", "2", "3", "--wait", address=address)) == "5\n"

        descendants = psutil.Process(up.pid).children(recursive=True)
        assert len(descendants) == 3, descendants  # the dispatcher and two workers
        assert {w["pid"] for w in status["workers"]} | {status["dispatcher"]["pid"]} == {p.pid for p in descendants}

        started = time.monotonic()
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`conveyor up` ignored SIGINT for 20 s:\n{log_path.read_text()}") from None
        assert code == 0, f"exit code {code}:\n{log_path.read_text()}"
        assert time.monotonic() - started < 20
        _gone, alive = psutil.wait_procs(descendants, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left running after `conveyor up` stopped: {alive}"
        assert "stopping..." in log_path.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for p in descendants:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

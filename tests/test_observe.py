"""Seeing what the cluster does: task output and progress, job listings, the CLI's live views, metrics.

Real dispatcher and worker processes (the `cluster` fixture); terminal behaviour through a
pseudo-terminal (pexpect), piped behaviour through plain pipes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pexpect
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.dispatcher.observe.outputs import OUTPUT_LIMIT, OutputStore, StreamTail
from conveyor.protocol.durations import parse_duration
from conveyor.worker.reports import TaskReports
from tests.conftest import ROOT, Cluster, conveyor_cmd, stop_process, wait_until
from tests.test_cli import assert_ok, free_port, run_cli, show

MODES = ("threads", "asyncio", "processes")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def spawn(*args: str, address: str, timeout: float = 60) -> pexpect.spawn:
    """`conveyor ARGS` on a pseudo-terminal (so stdout and stderr are a terminal), 120 columns wide."""
    env = {**os.environ, "CONVEYOR_DISPATCHER": address, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    cmd = conveyor_cmd(*args)
    return pexpect.spawn(cmd[0], cmd[1:], cwd=str(ROOT), env=env, timeout=timeout, encoding="utf-8",
                         dimensions=(40, 120))


def screen_text(child: pexpect.spawn) -> str:
    child.expect(pexpect.EOF)
    child.close()
    return ANSI.sub("", child.before or "")


# --- units: bounded buffers ------------------------------------------------------------------------


def test_a_stream_tail_keeps_the_last_characters_and_counts_all() -> None:
    tail = StreamTail()
    for i in range(10_000):
        tail.append(f"{i:05d}\n", 1000)
    assert tail.end == 60_000
    assert tail.size <= 2000
    text = tail.text(1000)
    assert len(text) == 1000 and text.endswith("09999\n")
    start, new = tail.since(59_994, 1000)
    assert (start, new) == (59_994, "09999\n")
    start, new = tail.since(0, 1000)  # the beginning is gone: the reader learns where the kept text starts
    assert start == 59_000 and new == text


def test_the_output_store_keeps_running_jobs_and_evicts_the_oldest_finished_first() -> None:
    store = OutputStore(limit=100, budget=250)
    for job in ("a", "b", "c"):
        store.write(job, 1, "stdout", job * 500)  # each stream keeps its last 100 characters
    assert store.chars == 300 and store.texts("a") == {"stdout": "a" * 100}
    store.evict()
    assert len(store) == 3  # over budget, but nothing has finished: running jobs' output stays
    store.finished("b")
    store.finished("a")
    store.evict()
    assert "b" not in store and "a" in store and store.chars == 200  # b finished first: b went first
    store.write("c", 2, "stdout", "retry")  # a new attempt starts empty, and readers' offsets go on
    assert store.texts("c") == {"stdout": "retry"} and store.chars == 105
    assert store.since("c", {"stdout": 100}) == {"stdout": {"start": 100, "end": 105, "text": "retry"}}
    store.drop("a")
    assert store.chars == 5 and len(store) == 1


def test_task_reports_bound_each_stream_between_sends() -> None:
    reports = TaskReports(limit_chars=1000)
    key = ("job", 1)
    for i in range(5000):
        reports.output(key, "stdout", f"line {i}\n")
    reports.progress(key, 0.5, "half")
    reports.finish(key)
    progress, output = reports.drain()
    assert progress == [["job", 1, 0.5, "half"]]
    [[job, attempt, stream, text]] = output
    assert (job, attempt, stream) == ("job", 1, "stdout")
    assert len(text) == 1000 and text.endswith("line 4999\n")
    assert reports.drain() == ([], [])  # finished and sent: forgotten


def test_task_reports_drop_what_a_finished_task_writes_later() -> None:
    reports = TaskReports()
    key = ("job", 1)
    reports.output(key, "stdout", "in time\n")
    reports.finish(key)
    reports.output(key, "stdout", "too late\n")  # a thread left running after a timeout, say
    reports.progress(key, 1.0, "too late")
    assert reports.drain() == ([], [["job", 1, "stdout", "in time\n"]])
    assert reports.drain() == ([], [])


def test_task_reports_split_big_sends() -> None:
    from conveyor.protocol import Cmd
    from conveyor.worker import reports as capture

    reports = TaskReports(limit_chars=capture.MESSAGE_CHARS // 2)
    for i in range(6):
        reports.output((f"job-{i}", 1), "stdout", "x" * (capture.MESSAGE_CHARS // 2))
    progress, batches = reports.take()  # what the worker's loop sends: one OUTPUT per batch, then PROGRESS
    sent: list[tuple[Cmd, Any]] = [(Cmd.OUTPUT, body) for body in batches]
    sent += [(Cmd.PROGRESS, progress)] if progress else []
    assert [cmd for cmd, _ in sent] == [Cmd.OUTPUT] * 3
    assert all(sum(len(e[3]) for e in body) <= capture.MESSAGE_CHARS for _, body in sent)
    assert sorted(e[0] for _, body in sent for e in body) == [f"job-{i}" for i in range(6)]


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("10m", 600), ("2h", 7200), ("1h30m", 5400)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_garbage() -> None:
    for bad in ("", "ten minutes", "5x", "-"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_progress_outside_a_task_is_a_no_op_and_checks_its_input() -> None:
    import conveyor

    conveyor.progress(0.5, "nothing listens")
    with pytest.raises(ValueError):
        conveyor.progress(1.5)
    with pytest.raises(ValueError):
        conveyor.progress(float("nan"))


# --- output capture --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_output_is_captured_per_job_without_mixing(cluster: Cluster, mode: str) -> None:
    name = cluster.start_worker(mode, 4, name=f"out-{mode}")
    cluster.wait_for_workers(name)
    client = cluster.client()
    fn = "tests.observe_tasks:async_chatty" if mode == "asyncio" else "tests.observe_tasks:chatty"
    futures = {tag: client.submit(fn, tag, 5, 0.02) for tag in ("alpha", "beta", "gamma", "delta")}
    for tag, fut in futures.items():
        assert fut.result(30) == tag
        output = fut.info["output"]
        assert output["stdout"] == "".join(f"{tag} out {i}\n" for i in range(5)), output
        assert output["stderr"] == "".join(f"{tag} err {i}\n" for i in range(5)), output
        logged = output["log"].splitlines()
        assert len(logged) == 5 and all(line.endswith(f"WARNING tests.observe_tasks: {tag} log {i}")
                                        for i, line in enumerate(logged)), output
    quiet = client.submit("tests.observe_tasks:add", 1, 2)
    assert quiet.result(10) == 3 and "output" not in quiet.info  # nothing printed: nothing sent


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_a_task_printing_megabytes_keeps_a_bounded_tail(cluster: Cluster, mode: str) -> None:
    name = cluster.start_worker(mode, 2, name=f"flood-{mode}")
    cluster.wait_for_workers(name)
    client = cluster.client()
    fut = client.submit("tests.observe_tasks:flood", 8)  # 8 MiB of lines
    assert fut.result(60) == 8 * 1024
    stdout = fut.info["output"]["stdout"]
    assert len(stdout) <= OUTPUT_LIMIT
    assert stdout.endswith("END of flood\n")
    assert stdout.splitlines()[-2].startswith(f"{8 * 1024 - 1:08d} ")  # the very last lines, in order
    assert client.status()["workers"][0]["running"] == 0


def test_a_crashed_task_keeps_its_last_output(cluster: Cluster) -> None:
    name = cluster.start_worker("processes", 1, name="crashy")
    cluster.wait_for_workers(name)
    client = cluster.client()
    job_id = assert_ok(run_cli("submit", "tests.observe_tasks:print_then_crash", "famous",
                               address=cluster.address)).strip()
    proc = run_cli("result", job_id, "--wait", "--json", address=cluster.address)
    assert proc.returncode == 1, show(proc)
    record = json.loads(proc.stdout)
    assert record["state"] == "failed" and record["error"]["type"] == "WorkerCrashed"
    assert record["output"]["stdout"] == "last words: famous\n"
    assert record["output"]["stderr"] == "stderr words\n"
    assert record["output"]["log"].rstrip().endswith("WARNING tests.observe_tasks: logged words")
    logs = run_cli("logs", job_id, "--stream", "stdout", address=cluster.address)
    assert assert_ok(logs) == "last words: famous\n"
    assert client.status()["workers"][0]["name"] == name  # the worker itself carried on


def test_without_capture_output_goes_to_the_worker(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 1, None, "plain", "--no-capture")
    cluster.wait_for_workers(name)
    fut = cluster.client().submit("tests.observe_tasks:chatty", "uncaptured", 1)
    assert fut.result(20) == "uncaptured" and "output" not in fut.info
    wait_until(lambda: "uncaptured out 0" in (cluster.tmp / "worker-plain.log").read_text(), what="the print")


# --- progress, result, logs ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_progress_and_output_of_a_running_job(cluster: Cluster, mode: str, tmp_path: Path) -> None:
    name = cluster.start_worker(mode, 2, name=f"prog-{mode}")
    cluster.wait_for_workers(name)
    marker = tmp_path / f"go-{mode}"
    job_id = assert_ok(run_cli("submit", "tests.observe_tasks:wait_for_file", str(marker),
                               address=cluster.address)).strip()
    client = cluster.client()
    view = wait_until(lambda: (v := client.job_info(job_id)[0]) and v.get("progress") and v, what="progress")
    assert view["state"] == "running" and view["progress"]["fraction"] == 0.5
    assert view["progress"]["message"] == "half way"

    text = assert_ok(run_cli("result", job_id, address=cluster.address))
    assert text.strip() == "running 50% half way"
    as_json = json.loads(assert_ok(run_cli("result", job_id, "--json", address=cluster.address)))
    assert as_json["state"] == "running" and as_json["progress"]["message"] == "half way"
    wait_until(lambda: "waiting for" in client.logs(job_id)["streams"].get("stdout", {}).get("text", ""),
               what="the first output")
    follow = subprocess.Popen(
        conveyor_cmd("logs", job_id, "--follow", "--dispatcher", cluster.address), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()  # the follower has caught up with the running task
        marker.write_text("go")
        rest, err = follow.communicate(timeout=30)
        out = first + rest
    finally:
        stop_process(follow)
    assert follow.returncode == 0, err
    assert out == f"waiting for {marker}\ndone waiting\n", (out, err)
    record = json.loads(assert_ok(run_cli("result", job_id, "--json", address=cluster.address)))
    assert record["state"] == "succeeded" and record["output"]["stdout"] == out
    assert "progress" not in record


def test_logs_of_an_unknown_job_is_one_error_line(cluster: Cluster) -> None:
    proc = run_cli("logs", "no-such-job", address=cluster.address)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no job no-such-job"), show(proc)


# --- job listings ------------------------------------------------------------------------------------


def test_jobs_lists_by_state_age_and_function(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 2, name="lister")
    cluster.wait_for_workers(name)
    client = cluster.client()
    oks = [client.submit("tests.observe_tasks:add", i, 1) for i in range(5)]
    bads = [client.submit("tests.observe_tasks:fail_loudly", str(i)) for i in range(3)]
    for f in oks:
        f.result(20)
    for f in bads:
        with pytest.raises(RuntimeError):
            f.result(20)

    def listed(*args: str) -> dict[str, Any]:
        return json.loads(assert_ok(run_cli("jobs", *args, "--json", address=cluster.address)))  # type: ignore[no-any-return]

    failed = wait_until(lambda: (r := listed("--state", "failed", "--since", "10m")) and len(r["jobs"]) == 3 and r,
                        what="the failures to be listed")
    assert {j["id"] for j in failed["jobs"]} == {f.job_id for f in bads}
    assert all(j["error"].startswith("RuntimeError: failed on purpose") and j["worker"] == name
               for j in failed["jobs"])
    everything = listed("--limit", "100")
    assert {f.job_id for f in oks + bads} <= {j["id"] for j in everything["jobs"]}
    by_fn = listed("--function", "tests.observe_tasks:add")
    assert {j["id"] for j in by_fn["jobs"]} == {f.job_id for f in oks}
    assert listed("--state", "succeeded", "--limit", "2")["truncated"] is True
    wait_until(lambda: listed("--since", "1s")["jobs"] == [], what="a second with no job finishing")

    table = assert_ok(run_cli("jobs", "--state", "failed", address=cluster.address))
    assert all(f.job_id in table for f in bads) and "RuntimeError" in table
    bad = run_cli("jobs", "--state", "exploded", address=cluster.address)
    assert bad.returncode == 2 and "unknown state" in bad.stderr


# --- map, progress bars and live views ---------------------------------------------------------------


def test_map_prints_json_lines_in_order_and_nothing_else_when_piped(cluster: Cluster, tmp_path: Path) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 4, name="mapper"))
    lines = [json.dumps([i, 10 * i]) for i in range(300)]
    lines.insert(7, "")  # blank lines are skipped
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("map", "tests.observe_tasks:add", "--input", str(tmp_path / "in.jsonl"), "--chunksize", "7",
                   address=cluster.address)
    out = assert_ok(proc)
    assert [json.loads(line) for line in out.splitlines()] == [11 * i for i in range(300)]
    assert proc.stderr == ""  # no bar, no noise: stderr is not a terminal

    single = subprocess.run(conveyor_cmd("map", "tests.observe_tasks:square", "--input", "-",
                                         "--dispatcher", cluster.address),
                            input="3\n[4]\n", capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert single.returncode == 0 and single.stdout == "9\n16\n", show(single)

    (tmp_path / "bad.jsonl").write_text("[1, 2]\n[3, \n")
    bad = run_cli("map", "tests.observe_tasks:add", "--input", str(tmp_path / "bad.jsonl"), address=cluster.address)
    assert bad.returncode == 2 and "bad.jsonl:2: not JSON" in bad.stderr, show(bad)

    (tmp_path / "fails.jsonl").write_text('["a"]\n["b"]\n')
    fails = run_cli("map", "tests.observe_tasks:fail_loudly", "--input", str(tmp_path / "fails.jsonl"),
                    address=cluster.address)
    assert fails.returncode == 1 and "error: item 1 failed: RuntimeError" in fails.stderr, show(fails)
    assert "Remote traceback" in fails.stderr


def test_map_shows_a_progress_bar_on_a_terminal(cluster: Cluster, tmp_path: Path) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 2, name="barred"))
    (tmp_path / "in.jsonl").write_text("".join(f"[{i}, 0.02]\n" for i in range(60)))
    child = spawn("map", "tests.tasks:square_after", "--input", str(tmp_path / "in.jsonl"), address=cluster.address)
    text = screen_text(child)
    assert child.exitstatus == 0, text
    assert "60/60" in text and "100%" in text, text
    assert re.search(r"\d[\d.,]*/s", text), text  # the rate
    assert "eta" in text, text
    results = [int(line) for line in text.splitlines() if line.strip().isdigit()]
    assert results == [i * i for i in range(60)], text


def test_submit_wait_shows_the_tasks_progress_on_a_terminal(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("processes", 1, name="stepper"))
    child = spawn("submit", "--wait", "tests.observe_tasks:steps", "8", "0.3", "part", address=cluster.address)
    child.expect(r"part \d/8", timeout=30)  # the task's own progress message, live
    text = screen_text(child)
    assert child.exitstatus == 0, text
    assert text.rstrip().endswith("8"), text
    assert "%" in text, text


def test_client_map_progress_in_python(cluster: Cluster) -> None:
    cluster.wait_for_workers(cluster.start_worker("threads", 2, name="pymap"))
    script = (
        "import sys\nfrom conveyor import Client\n"
        f"with Client({cluster.address!r}) as c:\n"
        "    out = list(c.map('tests.observe_tasks:square', range(500), chunksize=10, progress=True))\n"
        "print('sum', sum(out))\n"
    )
    child = pexpect.spawn(sys.executable, ["-c", script], cwd=str(ROOT), timeout=60, encoding="utf-8",
                          dimensions=(40, 120), env={**os.environ, "TERM": "xterm-256color"})
    text = screen_text(child)
    assert child.exitstatus == 0, text
    assert "500/500" in text and "100%" in text and f"sum {sum(i * i for i in range(500))}" in text, text
    piped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           check=False)
    assert piped.returncode == 0 and piped.stderr == "", show(piped)
    assert piped.stdout == f"sum {sum(i * i for i in range(500))}\n"


def test_status_and_top(cluster: Cluster) -> None:
    name = cluster.start_worker("asyncio", 20, ["io"], "topped")
    cluster.wait_for_workers(name)
    client = cluster.client()
    for f in [client.submit("tests.observe_tasks:add", i) for i in range(50)]:
        f.result(20)
    text = assert_ok(run_cli("status", address=cluster.address))
    assert "throughput" in text and "1 worker(s) (1 asyncio)" in text and "slots 0/20 busy" in text, text
    status = json.loads(assert_ok(run_cli("status", "--json", address=cluster.address)))
    assert status["slots"] == {"busy": 0, "total": 20}
    assert status["totals"]["succeeded"] == 50 and set(status["throughput"]) == {"last_10s", "last_60s"}

    child = spawn("top", "--interval", "0.3", "--iterations", "4", address=cluster.address)
    screen = screen_text(child)
    assert child.exitstatus == 0, screen
    assert name in screen and "asyncio" in screen and "io" in screen and "throughput" in screen, screen
    assert "Ctrl-C to quit" in screen


# --- metrics and logging ---------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} from the metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_move_as_jobs_run(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    port = free_port()
    cluster.start_dispatcher("--metrics-port", str(port), "--log-format", "json")
    try:
        fn_ok, fn_bad = "tests.observe_tasks:add", "tests.observe_tasks:fail_loudly"
        wait_until(lambda: "conveyor_jobs_queued" in scrape(port), what="the first snapshot")
        names = [cluster.start_worker("threads", 2, name="m1"), cluster.start_worker("processes", 1, name="m2")]
        cluster.wait_for_workers(*names)
        client = cluster.client()
        for f in [client.submit(fn_ok, i) for i in range(20)]:
            f.result(20)
        with pytest.raises(RuntimeError):
            client.submit(fn_bad, "x").result(20)
        # Jobs submitted and delivered within one group-commit window are never written: this one
        # outlives the window, so the journal commits at least once.
        assert client.submit("tests.tasks:sleep", 0.05).result(20) == 0.05

        def settled() -> dict[str, Any] | None:
            m = scrape(port)
            done = m.get("conveyor_jobs_total", {})
            ok = done.get((("function", fn_ok), ("state", "succeeded")))
            bad = done.get((("function", fn_bad), ("state", "failed")))
            commits = m.get("conveyor_journal_commit_seconds_count", {}).get((), 0)
            return m if ok == 20 and bad == 1 and commits >= 1 else None

        m = wait_until(settled, what="the finished jobs to be counted")
        assert m["conveyor_jobs_submitted_total"][(("function", fn_ok),)] == 20
        workers = m["conveyor_workers"]
        assert workers[(("host", "127.0.0.1"), ("mode", "threads"))] == 1
        assert workers[(("host", "127.0.0.1"), ("mode", "processes"))] == 1
        assert m["conveyor_worker_slots"][(("host", "127.0.0.1"), ("mode", "threads"))] == 2
        assert m["conveyor_task_duration_seconds_count"][(("function", fn_ok),)] == 20
        assert m["conveyor_task_duration_seconds_bucket"][(("function", fn_ok), ("le", "+Inf"))] == 20
        assert m["conveyor_queue_wait_seconds_count"][(("function", fn_ok),)] == 20
        assert m["conveyor_journal_commit_seconds_count"][()] >= 1
        assert m["conveyor_jobs_queued"][()] == 0 and m["conveyor_jobs_running"][()] == 0
        assert m["conveyor_heartbeat_misses_total"][()] == 0

        # a job in flight shows as running; a worker killed without a goodbye becomes a heartbeat miss
        client.submit("tests.tasks:sleep", 30)
        wait_until(lambda: scrape(port)["conveyor_jobs_running"][()] == 1, what="a running job")
        for name in names:
            os.kill(cluster.worker_pid(name), signal.SIGKILL)
        m = wait_until(lambda: (s := scrape(port))["conveyor_heartbeat_misses_total"][()] == 2 and s,
                       what="the lost workers to be counted")
        assert m["conveyor_jobs_queued"][()] == 1 and not m.get("conveyor_workers")
    finally:
        cluster.stop()
    records = [json.loads(line) for line in (tmp_path / "dispatcher.log").read_text().splitlines()
               if line.startswith("{")]
    assert any(r["level"] == "warning" and "missed its heartbeats" in r["message"] for r in records)
    assert all({"time", "level", "logger", "message", "pid"} <= set(r) for r in records)


def test_worker_json_logs(cluster: Cluster) -> None:
    name = cluster.start_worker("threads", 1, None, "jsonlog", "--log-format", "json")
    cluster.wait_for_workers(name)
    lines = (cluster.tmp / "worker-jsonlog.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and all(r["logger"].startswith("conveyor") for r in records)
    assert any("connecting to" in r["message"] for r in records)
    bad = run_cli("worker", "--log-format", "xml", "--connect", cluster.address)
    assert bad.returncode == 2 and "unknown log format" in bad.stderr

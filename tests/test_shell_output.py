"""`conveyor submit --shell`: the command's stdout and stderr are the job's captured output, live, in every
mode (`conveyor logs JOB_ID`, `--follow`), and still come back in its result. Real CLI processes, a real
dispatcher and real workers."""

from __future__ import annotations

import json
import select
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, Cluster, conveyor_cmd, stop_process
from tests.test_cli import assert_ok, run_cli

MODES = ("threads", "processes", "asyncio")


@pytest.mark.parametrize("mode", MODES)
def test_a_shell_jobs_output_is_its_log_live_and_after(cluster: Cluster, mode: str, tmp_path: Path) -> None:
    cluster.wait_for_workers(cluster.start_worker(mode, 1, name=f"sh-{mode}"))
    marker = tmp_path / "go"
    command = f"echo one; echo two >&2; while [ ! -e {marker} ]; do sleep 0.02; done; echo three"
    job_id = assert_ok(run_cli("submit", "--mode", mode, "--shell", command, address=cluster.address)).strip()
    follow = subprocess.Popen(
        conveyor_cmd("logs", job_id, "--follow", "--dispatcher", cluster.address), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert follow.stdout is not None
        readable, _, _ = select.select([follow.stdout], [], [], 20)  # (a shell job used to print nothing here)
        assert readable, "logs --follow printed nothing while the command ran"
        first = follow.stdout.readline()  # printed while the command still runs: it waits for the marker
        assert not marker.exists()
        marker.touch()
        rest, err = follow.communicate(timeout=30)
    finally:
        stop_process(follow)
    assert follow.returncode == 0, err
    assert (first + rest, err) == ("one\nthree\n", "two\n")

    logs = run_cli("logs", job_id, address=cluster.address)
    assert (assert_ok(logs), logs.stderr) == ("one\nthree\n", "two\n")
    record = json.loads(assert_ok(run_cli("result", job_id, "--json", address=cluster.address)))
    assert record["state"] == "succeeded"
    assert record["result"] == {"exit_code": 0, "stdout": "one\nthree\n", "stderr": "two\n"}

"""interpreters mode end to end: a real dispatcher and worker, on a Python >= 3.12 with the PEP 734 API."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from conveyor.worker.modes.interpreters import missing_reason
from tests.conftest import ROOT, conveyor_cmd

REASON = missing_reason()
# .ci/run runs this module a second time in a Python >= 3.12 venv with CONVEYOR_REQUIRE_INTERPRETERS=1:
# there a missing API fails; anywhere else (the 3.11 suite) it skips, naming what is missing.
needs_api = pytest.mark.skipif(
    REASON is not None and os.environ.get("CONVEYOR_REQUIRE_INTERPRETERS") != "1", reason=REASON or ""
)


def test_refused_without_the_api_in_one_line() -> None:
    if REASON is None:
        pytest.skip("this Python has the API: the refusal cannot be seen here")
    proc = subprocess.run(
        conveyor_cmd("worker", "--mode", "interpreters", "--connect", "tcp://127.0.0.1:1"),
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {REASON}"]


@needs_api
def test_tasks_run_in_subinterpreters_of_the_worker(cluster) -> None:  # type: ignore[no-untyped-def]
    assert REASON is None, REASON  # under CI=true a missing API fails here
    name = cluster.start_worker("interpreters", 2)
    cluster.wait_for_workers(name)
    c = cluster.client()
    futures = [c.options(mode="interpreters").submit("tests.interp_tasks:where", 0.5) for _ in range(4)]
    results = [f.result(timeout=60) for f in futures]
    pid = cluster.worker_pid(name)
    assert {p for p, _ in results} == {pid}
    assert len({i for _, i in results}) == 2 and 0 not in {i for _, i in results}
    assert psutil.Process(pid).children() == []

    with pytest.raises(KeyError):
        c.options(mode="interpreters").submit("tests.interp_tasks:fail").result(timeout=60)
    with pytest.raises(ImportError, match="_testsinglephase"):
        c.options(mode="interpreters").submit("tests.interp_tasks:single_phase").result(timeout=60)
    assert c.options(mode="interpreters").submit("tests.interp_tasks:chatty").result(timeout=60) == "ok"
    assert c.options(mode="interpreters").submit(lambda x: x * 2, 21).result(timeout=60) == 42  # by value
    assert psutil.Process(pid).is_running()
    assert sys.version_info >= (3, 12)

"""The benchmark suite runs end to end at smoke sizes and writes a complete result file.

No timing thresholds: this checks that every workload ran on Conveyor and on the process pool,
returned right results (the suite checks them and exits non-zero otherwise) and produced
positive numbers, not how fast anything was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("bulk_noop", "default_map", "one_by_one", "executor_map", "latency", "payload", "cpu_bound", "io_bound")
COMPARED = ("conveyor", "process_pool")
# Dask and Ray only in real runs: they cost CI ~40 s; the standby pair on two workloads, below (~20 s for all)
BACKENDS = ("conveyor", "conveyor_threads", "process_pool")


def _positive_numbers(values: dict[str, Any]) -> bool:
    return bool(values) and all(isinstance(v, int | float) and v > 0 for v in values.values())


@pytest.mark.timeout(240)
def test_smoke_run_writes_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--backends", *BACKENDS, "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    written = sorted(p.name for p in out.glob("*.json"))
    assert "latest.json" in written
    stamped = [name for name in written if name != "latest.json"]
    assert len(stamped) == 1, written
    doc = json.loads((out / stamped[0]).read_text())
    assert doc == json.loads((out / "latest.json").read_text())

    assert doc["ok"] is True and doc["problems"] == []
    assert doc["smoke"] is True and doc["runs"] == 1
    for key in ("cpu_count", "python", "platform", "pyzmq", "libzmq"):
        assert doc["machine"].get(key), key
    assert doc["timestamp"]

    assert set(doc["workloads"]) == set(WORKLOADS)
    for name in WORKLOADS:
        workload = doc["workloads"][name]
        assert workload["metrics"], name
        for backend in COMPARED:
            cell = workload["results"][backend]
            assert cell["status"] == "ok", (name, backend, cell["errors"])
            assert len(cell["samples"]) == 1, (name, backend)
            assert _positive_numbers(cell["median"]), (name, backend, cell["median"])
            assert _positive_numbers(cell["samples"][0]["values"]), (name, backend)
            for metric in workload["metrics"]:
                assert cell["median"][metric] > 0, (name, backend, metric)
        for metric, ratio in workload["ratios"].items():
            if workload["metrics"][metric]["comparable"]:
                assert ratio is not None and ratio > 0, (name, metric)

    assert set(doc["backends"]) == set(BACKENDS)  # the ones asked for, and only those


@pytest.mark.timeout(120)
def test_scale_smoke_run_writes_its_results(tmp_path: Path) -> None:
    """The dispatcher-at-scale benchmark (simulated workers, a long queue) runs end to end."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--smoke", "--quiet", "--no-plot", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    written = list(tmp_path.glob("scale-*.json"))
    assert len(written) == 1, written
    doc = json.loads(written[0].read_text())
    assert doc["smoke"] is True and set(doc["targets"]) == {"rss_below_1_GiB", "submit_below_30_s"}
    main = doc["main"]
    for key in ("submit_seconds", "rss_full", "drain_rate", "drain_cpu_us"):
        assert main[key]["median"] > 0, key
    assert main["tasks"] > 0 and main["workers"] > 0


@pytest.mark.timeout(120)
def test_smoke_run_of_the_standby_pair_backend(tmp_path: Path) -> None:
    """conveyor_pair (two dispatchers in sync, issue 17) runs the ACCEPTED-bound workloads end to end."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--backends", "conveyor_pair", "--only", "one_by_one",
         "latency", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=100, check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    doc = json.loads((out / "latest.json").read_text())
    assert doc["ok"] is True and set(doc["workloads"]) == {"one_by_one", "latency"}
    for workload in doc["workloads"].values():
        cell = workload["results"]["conveyor_pair"]
        assert cell["status"] == "ok" and _positive_numbers(cell["median"]), cell

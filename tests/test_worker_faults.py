"""A processes-mode worker when its machine misbehaves, for real: it runs out of file descriptors (prlimit on
the live worker), or its memory cgroup fills up. Real dispatcher, worker and children; real limits.

- No child can be started: waiting tasks fail at once as WorkerCrashed naming the cause, the worker says so
  in its log at ERROR, keeps retrying with backoff, and serves again once a child starts.
- Memory pressure: the kernel's OOM killer picks a child (children raise their oom_score_adj), so the job
  fails with WorkerCrashed and the worker lives on.

The cgroup test needs root and cgroup v1's memory controller: outside CI it skips with the reason, under
CI=true it fails (tests/conftest_netns.py `require`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conveyor import WorkerCrashed
from tests import tasks
from tests.conftest import ROOT, Cluster, conveyor_cmd, wait_until
from tests.conftest_netns import require
from tests.test_machine_faults import cgroup, join

HEARTBEAT = "0.2"


def hog(step_mib: int = 8, seconds: float = 30.0) -> int:
    """Grow by `step_mib` MiB at a time, touching every page, until killed (or `seconds` pass)."""
    hoard = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hoard.append(b"\x01" * (step_mib << 20))
        time.sleep(0.01)
    return len(hoard)


def _log(cluster: Cluster, name: str) -> str:
    return (cluster.tmp / f"worker-{name}.log").read_text(errors="replace")


def _children(pid: int) -> list[psutil.Process]:
    """The worker's task children: forked by its fork server, so grandchildren of the worker."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.ppid() != pid:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _lowest_free_fd(pid: int) -> int:
    """The lowest descriptor number not in use by the process: as a soft limit, its table is full."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def test_no_child_can_start_tasks_fail_clearly_and_the_slot_comes_back(cluster: Cluster) -> None:
    name = cluster.start_worker("processes", 1)
    client = cluster.client()
    cluster.wait_for_workers(name)
    worker = psutil.Process(cluster.worker_pid(name))
    child = client.submit(tasks.whoami).result(30)["pid"]  # the one child, as the task sees it

    soft, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
    worker.rlimit(psutil.RLIMIT_NOFILE, (_lowest_free_fd(worker.pid), hard))  # a full table: any new one, EMFILE
    try:
        os.kill(child, signal.SIGKILL)  # its replacement needs pipes, which it cannot get
        wait_until(lambda: "cannot start a child process" in _log(cluster, name), what="the worker to say so")
        assert "ERROR" in next(line for line in _log(cluster, name).splitlines() if "cannot start a child" in line)
        with pytest.raises(WorkerCrashed, match=r"no child process could be started.*Too many open files"):
            client.submit(tasks.add, 1, 2).result(30)
        assert worker.is_running()
    finally:
        worker.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    # it keeps trying (with backoff): the slot comes back and work runs again
    wait_until(lambda: "child processes start again" in _log(cluster, name), timeout=20, what="a child to start")
    assert client.submit(tasks.add, 2, 3).result(30) == 5


def test_children_are_the_oom_killers_first_choice(cluster: Cluster) -> None:
    name = cluster.start_worker("processes", 2)
    cluster.wait_for_workers(name)
    pid = cluster.worker_pid(name)
    children = wait_until(lambda: len(kids := _children(pid)) >= 2 and kids, what="the worker's children")
    worker_adj = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    wanted = min(1000, worker_adj + 500)

    def adjustments() -> dict[int, int]:
        return {c.pid: int(Path(f"/proc/{c.pid}/oom_score_adj").read_text()) for c in children}

    # a child raises its own score as its first step after the fork server forks it: wait for that step
    raised = f"oom_score_adj >= {wanted} in each child"
    wait_until(lambda: min(adjustments().values()) >= wanted, timeout=20, what=raised)


def _memory_cgroup_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a memory cgroup)"
    if not Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    return None


def test_under_memory_pressure_the_kernel_kills_a_child_not_the_worker(tmp_path: Path) -> None:
    """The worker and its children in a memory cgroup whose limit leaves a task a quarter of the worker's own
    size to grow: without the children's raised oom_score_adj the OOM killer picks the worker, the largest
    process (tried: with OOM_SCORE_BONUS = 0 this test fails). The task's child dies instead, the job fails
    with WorkerCrashed, and the worker serves on."""
    require(_memory_cgroup_missing())
    cluster = Cluster(tmp_path)
    cluster.start_dispatcher("--no-journal")
    try:
        with cgroup("memory", {}) as group:
            log = open(tmp_path / "worker-hogged.log", "ab")  # noqa: SIM115 - closed with the process
            args = ["worker", "--connect", cluster.address, "--mode", "processes", "--concurrency", "1",
                    "--name", "hogged", "--heartbeat-interval", HEARTBEAT]
            proc = subprocess.Popen(
                conveyor_cmd(*args), stdout=log, stderr=log, cwd=ROOT,
                preexec_fn=lambda: join(group, os.getpid()),  # the worker, its fork server and children
            )
            cluster.workers["hogged"] = proc
            client = cluster.client()
            cluster.wait_for_workers("hogged")
            assert client.submit(tasks.add, 1, 1).result(30) == 2  # every process is up and imported
            worker_rss = psutil.Process(proc.pid).memory_info().rss
            used = int((group / "memory.usage_in_bytes").read_text())
            limit = used + worker_rss // 4  # a task can grow by a quarter of the worker's size, no more
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.memsw.limit_in_bytes").exists():  # no escape into swap either
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
            with pytest.raises(WorkerCrashed, match="killed by signal 9"):
                client.submit(hog).result(30)  # 4 attempts (3 infrastructure retries), each killed
            assert proc.poll() is None, "the worker itself was killed"
            assert "oom_kill 0" not in (group / "memory.oom_control").read_text()  # it was the OOM killer
            assert client.submit(tasks.add, 2, 2).result(30) == 4  # and it still serves
    finally:
        cluster.stop()


def test_kill_9_of_the_worker_ends_its_fork_server_and_children_busy_ones_too(cluster: Cluster) -> None:
    """The fork server exits when its worker's end of the control socket closes, and the kernel kills its
    children with it (PR_SET_PDEATHSIG): no task runs on as an orphan of a dead worker."""
    name = cluster.start_worker("processes", 2)
    client = cluster.client()
    cluster.wait_for_workers(name)
    pid = cluster.worker_pid(name)
    marker = cluster.tmp / "busy"
    busy = client.submit(tasks.sleep_marked, str(marker), 60)  # a child busy for a minute
    idle = client.submit(tasks.whoami).result(30)["pid"]
    family = wait_until(lambda: len(kids := psutil.Process(pid).children(recursive=True)) >= 3 and kids,
                        what="the fork server and both children")
    assert idle in {p.pid for p in family}
    assert any("processes.forkserver" in " ".join(p.cmdline()) for p in family)
    wait_until(marker.exists, what="the busy child to start its task")

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in family), timeout=10,
               what="the fork server and every child, the busy one included, to exit")
    assert not busy.done()  # (the dispatcher re-queues it once it declares the worker lost)


def test_kill_9_of_the_fork_server_fails_the_running_task_clearly_and_a_new_one_serves(cluster: Cluster) -> None:
    name = cluster.start_worker("processes", 1)
    client = cluster.client()
    cluster.wait_for_workers(name)
    pid = cluster.worker_pid(name)
    child = client.submit(tasks.whoami).result(30)["pid"]
    server = psutil.Process(child).ppid()
    assert server != pid and "processes.forkserver" in " ".join(psutil.Process(server).cmdline())
    marker = cluster.tmp / "busy"
    busy = client.submit(tasks.sleep_marked, str(marker), 60)
    wait_until(marker.exists, what="the task to start")
    os.kill(server, signal.SIGKILL)

    def errors() -> list[str]:
        info = client.job_info(busy.job_id)[0] or {}
        return [str(a.get("error")) for a in info.get("history", []) if a.get("error")]

    crashed = wait_until(errors, interval=0.1, what="the attempt to fail")
    assert "WorkerCrashed" in crashed[0] and "the fork server that started it died" in crashed[0], crashed
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert client.cancel(busy) == [busy.job_id]  # (its retry runs on the new fork server's child, the one slot)
    again = client.submit(tasks.whoami).result(30)
    assert psutil.Process(again["pid"]).ppid() not in (server, pid)  # forked by a new fork server
    assert psutil.Process(pid).is_running()

"""Mode executors on their own, with real threads, processes and loops and no sockets: the Mode contract.

A draining worker (and a stalled one, with auto prefetch) hands back the jobs that wait for a slot.
A job that an idle thread is about to take is not waiting: it is finished like a running one. In every
mode, a stopped task is never reported, one stopped before it started never runs, and the slot of a
stopped task comes back.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from conveyor.errors import JobCancelled, TaskTimeout
from conveyor.protocol.payload import decode_value, encode_call
from conveyor.worker.execution import Outcome, Task
from conveyor.worker.modes import MODES, Mode, ModeSettings, ThreadsMode
from conveyor.worker.reports import TaskReports
from tests import tasks


def _task(n: int, fn: str, *args: object) -> Task:
    return Task(f"job-{n}", 1, None, (), encode_call(fn, None, args, {}))


def _into(outcomes: dict[str, Outcome]) -> Callable[[Sequence[Outcome]], None]:
    """A mode's report callback that files outcomes by job id (a second report of one job fails the test)."""

    def report(batch: Sequence[Outcome]) -> None:
        for o in batch:
            assert o.job_id not in outcomes, f"{o.job_id} reported twice"
            outcomes[o.job_id] = o

    return report


async def _until(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_threads_mode_gives_back_only_jobs_waiting_for_a_slot() -> None:
    mode = ThreadsMode(ModeSettings(concurrency=1, prefetch=2))
    outcomes: dict[str, Outcome] = {}
    await mode.start(_into(outcomes))
    gate = f"modes-{uuid.uuid4().hex}"
    try:
        blocker = _task(0, "tests.tasks:wait_gate", gate)
        mode.submit([blocker])
        await _until(lambda: mode._busy, "the blocker to take the only thread")
        behind = [_task(n, "tests.tasks:noop", n) for n in (1, 2)]
        mode.submit(behind)

        assert not mode.withdraw(blocker.key)  # running: it stays
        assert mode.withdraw(behind[1].key)  # waiting for the slot: back
        assert not mode.withdraw(behind[1].key)  # only once
        tasks.open_gate(gate)
        await _until(lambda: "job-1" in outcomes, "the job left queued to run")
        assert outcomes["job-0"].ok and outcomes["job-1"].ok
        await asyncio.sleep(0)  # let a wrongly started job-2 report, if it ran
        assert "job-2" not in outcomes  # withdrawn: it never runs and is never reported
    finally:
        tasks.open_gate(gate)
        tasks._gates.pop(gate, None)
        await mode.shutdown()


async def test_threads_mode_keeps_a_job_an_idle_thread_is_about_to_take() -> None:
    # The loop holds the GIL from submit to withdraw, so the threads have not taken anything yet:
    # exactly the window in which a SIGTERM used to send a just-assigned job back to the queue.
    mode = ThreadsMode(ModeSettings(concurrency=2, prefetch=1))
    outcomes: dict[str, Outcome] = {}
    await mode.start(_into(outcomes))
    try:
        jobs = [_task(n, "tests.tasks:noop", n) for n in range(3)]
        mode.submit(jobs)
        kept = [mode.withdraw(t.key) for t in jobs]
        assert kept[:2] == [False, False]  # two idle threads: the first two start now
        # the third waits for a slot, unless a thread already finished one of the first two meanwhile
        ran = {t.job_id for t, withdrawn in zip(jobs, kept, strict=True) if not withdrawn}
        await _until(lambda: ran <= outcomes.keys(), "the kept jobs to run")
        await asyncio.sleep(0)
        assert outcomes.keys() == ran and all(o.ok for o in outcomes.values())
    finally:
        await mode.shutdown()


async def test_threads_mode_lends_the_slot_of_a_blocked_task_and_takes_it_back() -> None:
    mode = ThreadsMode(ModeSettings(concurrency=1, prefetch=4))
    outcomes: dict[str, Outcome] = {}
    told: list[tuple[tuple[str, int], bool]] = []
    mode.on_lend = lambda key, lent: told.append((key, lent))
    await mode.start(_into(outcomes))
    gates = [f"lend-{n}-{uuid.uuid4().hex}" for n in range(4)]
    try:
        waiter = _task(0, "tests.tasks:wait_gate_lending", gates[0])
        mode.submit([waiter])
        await _until(lambda: told == [(waiter.key, True)], "the slot to be lent")
        mode.submit([_task(1, "tests.tasks:noop", 1)])
        await _until(lambda: "job-1" in outcomes, "a task to run on the lent slot")
        assert len(mode._threads) == 2
        tasks.open_gate(gates[0])  # the wait ends with every thread idle but the waiter's own
        await _until(lambda: "job-0" in outcomes and len(mode._threads) == 1, "the extra thread to exit")
        assert told == [(waiter.key, True), (waiter.key, False)]

        # Again, with both threads busy and a task queued when the slot comes back: the next to finish exits.
        waiter = _task(2, "tests.tasks:wait_gate_lending", gates[1])
        mode.submit([waiter])
        await _until(lambda: len(told) == 3, "the slot to be lent again")
        mode.submit([_task(3, "tests.tasks:wait_gate", gates[2]), _task(4, "tests.tasks:noop", 4)])
        await _until(lambda: len(mode._busy) == 2, "the child to take the lent thread")
        tasks.open_gate(gates[1])
        await _until(lambda: "job-2" in outcomes and len(mode._threads) == 1, "the waiter's thread to exit")
        await asyncio.sleep(0.05)
        assert "job-4" not in outcomes  # the one slot is job-3's now: job-4 waits for it
        tasks.open_gate(gates[2])
        await _until(lambda: {"job-3", "job-4"} <= outcomes.keys(), "the child, then the queued task")
        mode.submit([_task(5, "tests.tasks:noop", 5)])
        await _until(lambda: "job-5" in outcomes, "the one thread to go on")
        assert len(mode._threads) == 1 and all(o.ok for o in outcomes.values())
    finally:
        for gate in gates:
            tasks.open_gate(gate)
            tasks._gates.pop(gate, None)
        await mode.shutdown()


# --- the Mode contract, in every mode ----------------------------------------------------------------

MODE_NAMES = ("threads", "asyncio", "processes")  # (processes: its fork server ends with the mode's shutdown)


def _mode(name: str, concurrency: int = 1) -> Mode:
    return MODES[name](ModeSettings(concurrency=concurrency, prefetch=2), TaskReports())


async def hold(marker: str, release: str) -> str:
    """Create `marker`, then wait until `release` exists (an async task: asyncio mode awaits it on its loop)."""
    Path(marker).touch()
    while not Path(release).exists():
        await asyncio.sleep(0.005)
    return marker


def hold_sync(marker: str, release: str) -> str:
    """The same in a plain function, interruptible at any bytecode (threads, processes)."""
    Path(marker).touch()
    while not Path(release).exists():
        time.sleep(0.005)
    return marker


def _hold(mode: str, n: int, marker: Path, release: Path) -> Task:
    fn = "tests.test_modes:hold" if mode == "asyncio" else "tests.test_modes:hold_sync"
    return _task(n, fn, str(marker), str(release))


async def hold_the_loop(marker: str, release: str) -> str:
    """Create `marker`, then block the whole event loop it runs on until `release` exists."""
    return hold_sync(marker, release)


@pytest.mark.parametrize("mode_name", MODE_NAMES)
async def test_a_task_stopped_before_it_starts_never_runs_and_is_never_reported(
    mode_name: str, tmp_path: Path
) -> None:
    mode = _mode(mode_name)
    outcomes: dict[str, Outcome] = {}
    await mode.start(_into(outcomes))
    try:
        # The one thread (threads), or the task loop itself (asyncio), is busy until `go` exists.
        fn = "tests.test_modes:hold_the_loop" if mode_name == "asyncio" else "tests.test_modes:hold_sync"
        first = _task(0, fn, str(tmp_path / "first"), str(tmp_path / "go"))
        mode.submit([first])
        await _until(lambda: (tmp_path / "first").exists(), "the first task to start")
        never = _hold(mode_name, 1, tmp_path / "never", tmp_path / "go")
        mode.submit([never])  # it cannot start before `first` ends
        mode.stop(never.key, JobCancelled("the job was cancelled"))
        (tmp_path / "go").touch()
        after = _task(2, "tests.tasks:noop", 2)
        mode.submit([after])
        await _until(lambda: "job-2" in outcomes, "the task after it to be reported")
        assert outcomes["job-0"].ok and outcomes["job-2"].ok
        assert "job-1" not in outcomes and not (tmp_path / "never").exists()
    finally:
        (tmp_path / "go").touch()
        await mode.shutdown()


@pytest.mark.parametrize("mode_name", MODE_NAMES)
async def test_a_stopped_running_task_is_never_reported_and_its_slot_comes_back(
    mode_name: str, tmp_path: Path
) -> None:
    mode = _mode(mode_name)
    outcomes: dict[str, Outcome] = {}
    await mode.start(_into(outcomes))
    try:
        stuck = _hold(mode_name, 0, tmp_path / "started", tmp_path / "never-created")
        mode.submit([stuck])
        await _until(lambda: (tmp_path / "started").exists(), "the task to start")
        mode.stop(stuck.key, TaskTimeout("the task ran longer than its 1 s timeout"))
        nxt = _task(1, "tests.tasks:add", 2, 3)
        mode.submit([nxt])  # the one slot: freed (a thread replaced, a child replaced, a coroutine cancelled)
        await _until(lambda: "job-1" in outcomes, "a task to run in the slot that came back", timeout=20)
        assert outcomes["job-1"].ok and "job-0" not in outcomes
    finally:
        await mode.shutdown()


async def test_processes_mode_shutdown_ends_its_fork_server_and_children() -> None:
    import psutil

    mode = _mode("processes", 2)
    outcomes: dict[str, Outcome] = {}
    await mode.start(_into(outcomes))
    server = mode._forks.pid  # type: ignore[attr-defined]
    family = [server, *mode.child_pids()]
    assert server is not None and len(family) == 3 and all(psutil.pid_exists(p) for p in family)
    mode.submit([_task(0, "tests.tasks:add", 1, 2)])
    await _until(lambda: "job-0" in outcomes, "the task to be reported")
    await mode.shutdown()
    assert not [p for p in family if psutil.pid_exists(p)], "shutdown left a process of the mode running"


async def test_processes_mode_works_with_descriptors_past_1024() -> None:
    """A worker with many children (or connections) has descriptors above select()'s FD_SETSIZE: its
    children's status pipes are waited on with poll, which has no such limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # what the mode opens next is > 1024
    try:
        mode = _mode("processes", 1)
        outcomes: dict[str, Outcome] = {}
        await mode.start(_into(outcomes))
        mode.submit([_task(0, "tests.tasks:add", 1, 2)])
        await _until(lambda: "job-0" in outcomes, "the task to be reported")
        assert outcomes["job-0"].ok
        await mode.shutdown()  # waits on each child's status pipe
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def square_in_a_pool_of_its_own(x: int) -> int:
    """A task that starts processes itself (a daemonic multiprocessing child could not)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return int(pool.apply(pow, (x, 2)))


async def test_a_processes_mode_task_may_start_a_multiprocessing_pool_of_its_own() -> None:
    mode = _mode("processes", 1)
    outcomes: dict[str, Outcome] = {}
    await mode.start(_into(outcomes))
    try:
        mode.submit([_task(0, "tests.test_modes:square_in_a_pool_of_its_own", 7)])
        await _until(lambda: "job-0" in outcomes, "the task to be reported", 60)
        outcome = outcomes["job-0"]
        assert outcome.ok, outcome.info
        assert decode_value(outcome.frames) == 49
    finally:
        await mode.shutdown()

"""Mode executors on their own, with real threads and no sockets: which submitted tasks a mode gives back.

A draining worker (and a stalled one, with auto prefetch) hands back the jobs that wait for a slot.
A job that an idle thread is about to take is not waiting: it is finished like a running one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence

from conveyor.protocol.payload import encode_call
from conveyor.worker.execution import Outcome, Task
from conveyor.worker.modes import ModeSettings, ThreadsMode
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

"""JobFuture: the light Future (conveyor/client/future.py) is the one in use, and it behaves as a Future.

No cluster: futures without a connection, resolved by hand the way the connection resolves them.
"""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import weakref
from concurrent.futures import Future
from typing import Any

import pytest

from conveyor.client import future as job_future
from conveyor.client.future import JobFuture


def _job(n: int = 0) -> JobFuture:
    return JobFuture(f"job-{n}", None)


def test_the_light_init_is_taken_on_this_python() -> None:
    """If this fails, this Python's Future has other private fields: JobFuture silently fell back to the
    standard (slower) __init__. Update the field list in conveyor/client/future.py."""
    assert job_future.LIGHT_INIT, sorted(vars(Future()))
    f = _job()
    assert type(f._condition) is job_future._FutureCondition
    assert set(vars(Future())) <= set(vars(f))


def test_result_exception_and_callbacks() -> None:
    ok, bad = _job(1), _job(2)
    seen: list[Any] = []
    ok.add_done_callback(lambda f: seen.append(("ok", f.result())))
    bad.add_done_callback(lambda f: seen.append(("bad", type(f.exception()))))
    assert not ok.done() and not ok.running() and not ok.cancelled()
    assert ok._begin_settle()
    ok.set_result(42)
    assert bad._begin_settle()
    bad.set_exception(ValueError("no"))
    assert ok.result(0) == 42 and ok.done()
    with pytest.raises(ValueError, match="no"):
        bad.result(0)
    assert seen == [("ok", 42), ("bad", ValueError)]
    late: list[Any] = []
    ok.add_done_callback(late.append)  # already done: called at once
    assert late == [ok]
    assert "finished" in repr(ok)


def test_result_waits_across_threads_and_times_out() -> None:
    f = _job()
    with pytest.raises(concurrent.futures.TimeoutError):
        f.result(timeout=0.01)
    threading.Timer(0.05, lambda: (f._begin_settle(), f.set_result("late"))).start()
    assert f.result(timeout=10) == "late"


def test_wait_and_as_completed() -> None:
    futures = [_job(i) for i in range(20)]

    def resolve() -> None:
        for i, f in enumerate(reversed(futures)):
            f._begin_settle()
            f.set_result(i)

    done, not_done = concurrent.futures.wait(futures, timeout=0)
    assert not done and len(not_done) == 20
    threading.Thread(target=resolve).start()
    assert len(list(concurrent.futures.as_completed(futures, timeout=10))) == 20
    first = _job(99)
    threading.Timer(0.02, lambda: (first._begin_settle(), first.set_exception(KeyError("x")))).start()
    done, not_done = concurrent.futures.wait([first, _job(100)], timeout=10,
                                             return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == {first} and len(not_done) == 1


def test_cancel_before_and_after_the_outcome() -> None:
    f = _job()
    called: list[JobFuture] = []
    f.add_done_callback(called.append)
    assert f.cancel() and f.cancelled() and f.done()
    assert called == [f]
    with pytest.raises(concurrent.futures.CancelledError):
        f.result(0)
    assert not f._begin_settle()  # the outcome that arrives later is dropped ...
    assert f.cancelled()
    done, _ = concurrent.futures.wait([f], timeout=0)  # ... and wait() counts the future as done
    assert done == {f}
    g = _job()
    g._mark_running()  # a worker was assigned the job: too late to cancel
    assert g.running() and not g.cancel()
    assert g._begin_settle()
    g.set_result(1)
    assert not g.cancel() and g.result(0) == 1


def test_a_local_cancel_tells_waiters_at_once() -> None:
    """Cancelled here, no executor thread will ever pick the future up: wait() must not hang on it."""
    f = _job()
    threading.Timer(0.02, f._cancel_locally).start()
    done, not_done = concurrent.futures.wait([f], timeout=10)
    assert done == {f} and not not_done
    assert list(concurrent.futures.as_completed([f], timeout=1)) == [f]


def test_a_resolved_future_holds_no_reference_cycle() -> None:
    """Freed by reference counting alone, as a Future is: a million pending futures cost the collector nothing."""
    f = _job()
    f._begin_settle()
    f.set_result(object())
    ref = weakref.ref(f)
    gc.disable()
    try:
        del f
        assert ref() is None
    finally:
        gc.enable()

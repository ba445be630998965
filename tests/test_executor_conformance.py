"""conveyor.Executor against CPython's own tests of concurrent.futures, run as they are.

The generic test classes (ExecutorTest, WaitTests, AsCompletedTests, ExecutorShutdownTest) run with
conveyor.Executor as the executor type, on one dispatcher and one threads worker of 5 slots (the
suite's worker_count). Left out: the tests about interpreter shutdown, which start a fresh interpreter
with a pool of the standard library's own. The module ships with CPython; on Debian it is in
libpython3.11-testsuite (`apt-get install libpython3.11-testsuite`). Without it these tests skip, except
under CI=true, where they fail.
"""

from __future__ import annotations

import os
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from conveyor import Executor
from tests import cpython_futures as cf
from tests.conftest import Cluster

WORKER_SLOTS = 5  # the suite's ExecutorMixin.worker_count
INTERPRETER_SHUTDOWN = "about interpreter shutdown: starts a new interpreter with a standard-library pool"


@pytest.fixture(scope="module")
def conformance_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("conformance")))
    c.start_dispatcher()
    try:
        c.wait_for_workers(c.start_worker("threads", WORKER_SLOTS))
        yield c
    finally:
        c.stop()


class ConveyorExecutor(Executor):
    """Executor(max_workers=N) as the suite calls it, on the test cluster."""

    address: ClassVar[str] = ""

    def __init__(self, max_workers: int | None = None, **kwargs: Any):
        super().__init__(self.address, max_workers=max_workers, **kwargs)


if cf.AVAILABLE:

    @pytest.fixture(autouse=True)
    def _executor_address(conformance_cluster: Cluster) -> None:
        ConveyorExecutor.address = conformance_cluster.address

    class ConveyorMixin(cf.ExecutorMixin):  # type: ignore[misc]
        """The suite's ExecutorMixin (an executor per test, shut down after it) with conveyor.Executor."""

        executor_type = ConveyorExecutor
        worker_count = WORKER_SLOTS

    class ConveyorExecutorTest(ConveyorMixin, cf.ExecutorTest, cf.BaseTestCase):  # type: ignore[misc]
        pass

    class ConveyorWaitTest(ConveyorMixin, cf.WaitTests, cf.BaseTestCase):  # type: ignore[misc]
        pass

    class ConveyorAsCompletedTest(ConveyorMixin, cf.AsCompletedTests, cf.BaseTestCase):  # type: ignore[misc]
        pass

    class ConveyorShutdownTest(ConveyorMixin, cf.ExecutorShutdownTest, cf.BaseTestCase):  # type: ignore[misc]
        @unittest.skip(INTERPRETER_SHUTDOWN)
        def test_interpreter_shutdown(self) -> None: ...

        @unittest.skip(INTERPRETER_SHUTDOWN)
        def test_submit_after_interpreter_shutdown(self) -> None: ...

        @unittest.skip(INTERPRETER_SHUTDOWN + " (gh-83386: shutdown(wait=False), then exit)")
        def test_hang_gh83386(self) -> None: ...

else:

    def test_cpython_concurrent_futures_suite_is_installed() -> None:
        message = (f"CPython's test_concurrent_futures is not installed ({cf.PATH}): "
                   "apt-get install libpython3.11-testsuite")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

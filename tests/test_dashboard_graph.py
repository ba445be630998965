"""The dashboard's job view shows a job's parents and dependants, and the root a failure blames
(a real dispatcher, a real browser: skipped without Chromium, as the other dashboard tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conveyor import DependencyFailed
from tests import graph_tasks as g
from tests.conftest import Cluster
from tests.test_cli import free_port
from tests.test_dashboard import browser  # noqa: F401 - the fixture


def test_the_job_view_shows_the_graph(tmp_path: Path, browser: Any) -> None:  # noqa: F811
    cluster = Cluster(tmp_path)
    port = free_port()
    cluster.start_dispatcher("--dashboard-port", str(port))
    try:
        cluster.wait_for_workers(cluster.start_worker("threads", 2, name="w"))
        client = cluster.clients[0]
        parent = client.options(tags=["nobody"]).submit(g.inc, 1)  # no worker has the tag: it stays queued
        child = client.submit(g.inc, parent)
        root = client.submit(g.fail, "for the graph")
        blamed = client.options(keep=True).submit(g.inc, root)
        with pytest.raises(DependencyFailed):
            blamed.result(20)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.evaluate(f"window.conveyorDashboard.openJob('{child.job_id}')")
        parent_link = f'#drawer:not([hidden]) .graph-parents button[data-job="{parent.job_id}"]'
        page.wait_for_selector(parent_link, timeout=10_000)
        assert "1 parent" in page.locator("#job-body").inner_text()  # waiting for it
        page.locator(f'.graph-parents button[data-job="{parent.job_id}"]').click()  # to the parent
        page.wait_for_selector(f'.graph-children button[data-job="{child.job_id}"]', timeout=10_000)
        assert page.locator("#job-title").inner_text() == parent.job_id
        page.evaluate(f"window.conveyorDashboard.openJob('{blamed.job_id}')")
        page.wait_for_selector(f'.graph-root button[data-job="{root.job_id}"]', timeout=10_000)
        assert "tests.graph_tasks:fail" in page.locator(".graph-root").inner_text()
        client.cancel(parent)
    finally:
        cluster.stop()

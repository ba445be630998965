"""The dispatcher's web dashboard, in a real browser (Debian's chromium through Playwright), its access
rules over plain HTTP, and its cost on a large cluster.

Without chromium these tests skip, except under CI=true, where a missing browser is a failure.
`CONVEYOR_REFRESH_SCREENSHOT=1 python -m pytest tests/test_dashboard.py -k live_charts` also refreshes
docs/dashboard.png, the README's picture; otherwise the tests leave the tree alone.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.dispatcher import Dispatcher
from conveyor.dispatcher.observe.dashboard import DashboardServer, start_dashboard
from conveyor.dispatcher.scheduler import TaskOptions
from tests.conftest import ROOT, Cluster, wait_until
from tests.test_cli import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]


def _browser_or_skip() -> None:
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[dev]')")
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI needs {' and '.join(missing)} for the dashboard tests")
        pytest.skip(f"no browser for the dashboard tests: missing {' and '.join(missing)}")


@pytest.fixture
def browser() -> Iterator[Any]:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --- the page against a live cluster -----------------------------------------------------------------


def test_dashboard_shows_workers_failures_and_live_charts(tmp_path: Path, browser: Any) -> None:
    cluster = Cluster(tmp_path)
    port = free_port()
    cluster.start_dispatcher("--dashboard-port", str(port))
    stop = threading.Event()
    errors: list[str] = []
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#live[data-state=live]", timeout=20_000)
        page.wait_for_selector("#workers tbody tr.empty", timeout=20_000)  # nobody yet

        # workers appear as they register
        names = [cluster.start_worker("threads", 4, name="web-threads"),
                 cluster.start_worker("processes", 2, ["cpu"], "web-procs"),
                 cluster.start_worker("asyncio", 100, name="web-async")]
        for name in names:
            page.wait_for_selector(f'#workers tr[data-worker="{name}"]', timeout=20_000)
        assert page.locator('#workers tr[data-worker="web-procs"] .tag').inner_text() == "cpu"

        client = cluster.client()

        def load() -> None:  # a steady mix, so the charts have something to draw
            i = 0
            while not stop.is_set():
                i += 1
                futures = [client.submit("tests.observe_tasks:add", i, k) for k in range(40)]
                if i % 5 == 0:
                    client.options(mode="processes").submit("tests.observe_tasks:steps", 12, 0.5, "chunk")
                try:
                    for f in futures:
                        f.result(30)
                except RuntimeError:
                    if stop.is_set():
                        return  # the test is over and closed the client under this loop
                    raise
                stop.wait(0.15)

        feeder = threading.Thread(target=load, daemon=True)
        feeder.start()

        # a failure shows with its traceback
        failing = client.submit("tests.observe_tasks:fail_loudly", "for the dashboard")
        with pytest.raises(RuntimeError):
            failing.result(30)
        failure = page.locator(f'#failures details[data-job="{failing.job_id}"]')
        failure.wait_for(timeout=20_000)
        assert "RuntimeError: failed on purpose: for the dashboard" in failure.locator("summary").inner_text()
        failure.locator("summary").click()
        tb = failure.locator("pre.tb").inner_text()
        assert "Traceback (most recent call last)" in tb and "fail_loudly" in tb

        # the charts keep drawing new points
        chart = page.locator("#chart-throughput")
        wait_until(lambda: int(chart.get_attribute("data-points") or 0) >= 3, 20, what="chart points")
        before = int(chart.get_attribute("data-points") or 0)
        wait_until(lambda: int(chart.get_attribute("data-points") or 0) > before + 2, 20, what="the chart to grow")
        wait_until(lambda: float(chart.get_attribute("data-last") or 0) > 0, 20, what="a non-zero throughput")
        assert int(page.locator("#chart-load").get_attribute("data-points") or 0) > before

        # a job's details: its error and its output
        failure.locator(".actions button").click()
        page.wait_for_selector("#drawer:not([hidden]) .errbox", timeout=10_000)
        assert page.locator("#job-title").inner_text() == failing.job_id
        assert "about to fail: for the dashboard" in page.locator("#job-body pre.out").inner_text()
        page.keyboard.press("Escape")

        # a running job's progress
        page.wait_for_selector("#running .prog", timeout=20_000)
        refresh = os.environ.get("CONVEYOR_REFRESH_SCREENSHOT") == "1"  # docs/dashboard.png, on purpose only
        if refresh:
            time.sleep(12)  # not a wait for a condition: a picture looks better with fuller charts
        page.locator("#failures details").first.evaluate("el => el.open = true")
        page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
        if refresh:
            shutil.copy(shot, ROOT / "docs" / "dashboard.png")
        assert not errors, errors
    finally:
        stop.set()
        cluster.stop()


# --- access rules ---------------------------------------------------------------------------------------


@pytest.fixture
def idle_dispatcher() -> Iterator[Dispatcher]:
    """A dispatcher whose loop is not running: enough for the snapshot-only routes."""
    d = Dispatcher("tcp://127.0.0.1:0")
    d.observer.publish = True
    d.observer.tick(time.monotonic())
    yield d


def _serve(d: Dispatcher, host: str, token: str | None) -> tuple[DashboardServer, str | None]:
    return start_dashboard(d.observer, 0, host, token)


def test_loopback_dashboard_answers_only_to_a_loopback_host_header(idle_dispatcher: Dispatcher) -> None:
    server, token = _serve(idle_dispatcher, "127.0.0.1", None)
    try:
        assert token is None
        base = f"http://127.0.0.1:{server.port}"
        status, headers, body = _get(base + "/")
        assert status == 200 and b"<title>Conveyor</title>" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        for path in ("/static/app.js", "/static/style.css", "/static/favicon.svg", "/api/snapshot", "/api/status",
                     "/api/workers?limit=5"):
            assert _get(base + path)[0] == 200, path
        assert _get(base + "/static/../__init__.py")[0] == 404
        status, _, body = _get(base + "/api/snapshot", {"Host": "attacker.example:80"})  # DNS rebinding
        assert status == 403
    finally:
        server.close()


def test_dashboard_off_loopback_requires_its_token(idle_dispatcher: Dispatcher) -> None:
    server, token = _serve(idle_dispatcher, "0.0.0.0", None)
    try:
        assert token and len(token) >= 24  # generated
        base = f"http://127.0.0.1:{server.port}"
        assert _get(base + "/")[0] == 401
        assert _get(base + "/api/snapshot")[0] == 401
        assert _get(base + "/api/snapshot?token=wrong")[0] == 401
        status, headers, _ = _get(base + f"/?token={token}")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert _get(base + "/", {"Cookie": cookie})[0] == 200
        assert _get(base + "/api/snapshot", {"Authorization": f"Bearer {token}"})[0] == 200
        assert _get(base + "/api/snapshot", {"Host": "attacker.example", "Cookie": cookie})[0] == 200
    finally:
        server.close()
    given, token = _serve(idle_dispatcher, "127.0.0.1", "s3cret-token")
    try:
        assert token == "s3cret-token"
        assert _get(f"http://127.0.0.1:{given.port}/api/snapshot")[0] == 401
        assert _get(f"http://127.0.0.1:{given.port}/api/snapshot?token=s3cret-token")[0] == 200
    finally:
        given.close()


# --- a big cluster: 1,000 workers and 100,000 queued jobs ---------------------------------------------------


def _big_dispatcher(workers: int, jobs: int) -> Dispatcher:
    """A dispatcher holding `workers` registered workers with no free slot and `jobs` queued jobs."""
    d = Dispatcher("tcp://127.0.0.1:0", heartbeat_interval=60.0)
    s = d.scheduler
    now = time.monotonic()
    modes = ("threads", "processes", "asyncio")
    for i in range(workers):
        s.worker_ready(
            f"w-{i:012x}".encode(), name=f"node-{i:04d}", host=f"10.0.{i // 250}.{i % 250}", pid=1000 + i,
            mode=modes[i % 3], concurrency=8, tags=["gpu"] if i % 10 == 0 else [], credit=0, running=[], now=now,
        )
    opts = [TaskOptions(fn="app.tasks:resize", mode="processes"), TaskOptions(fn="app.tasks:fetch"),
            TaskOptions(fn="app.tasks:train", tags=frozenset({"gpu"}))]
    for i in range(jobs):
        s.submit(f"job-{i}", opts[i % 3], [b"call"], None, now)
    return d


def test_snapshot_and_queries_stay_cheap_on_a_big_cluster() -> None:
    d = _big_dispatcher(1000, 100_000)
    obs = d.observer
    obs.publish = True
    started = time.perf_counter()
    obs.tick(time.monotonic())
    publish = time.perf_counter() - started
    assert publish < 0.25, f"a snapshot took {publish:.3f} s"
    snap = obs.snapshot
    assert snap is not None and snap["status"]["queued"] == 100_000 and len(snap["status"]["workers"]) == 1000
    server = DashboardServer(("127.0.0.1", 0), obs, None)
    try:
        started = time.perf_counter()
        _, body = server.snapshot_json()
        assert time.perf_counter() - started < 0.25
        trimmed = json.loads(body)
        assert len(body) < 300_000, len(body)  # what a browser gets every second, whatever the cluster size
        assert trimmed["workers_total"] == 1000 and len(trimmed["workers"]) == 100
    finally:
        server.server_close()
    started = time.perf_counter()
    jobs, truncated = obs.list_jobs(["queued"], None, None, 100, time.monotonic())
    assert len(jobs) == 100 and truncated and time.perf_counter() - started < 0.1
    started = time.perf_counter()
    jobs, _ = obs.list_jobs(None, 60, "app.tasks:nothing", 100, time.monotonic())  # a full scan that finds nothing
    assert jobs == [] and time.perf_counter() - started < 0.5


def test_dashboard_stays_responsive_on_a_big_cluster(browser: Any) -> None:
    d = _big_dispatcher(1000, 100_000)
    d.bind()
    loop = threading.Thread(target=d.run, name="big-dispatcher", daemon=True)
    loop.start()
    server, _ = start_dashboard(d.observer, 0, "127.0.0.1", None)
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        started = time.monotonic()
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("#workers-pager", timeout=20_000)
        rows = page.locator("#workers tbody tr")
        wait_until(lambda: rows.count() == 50, 20, what="a page of workers")  # (the page's CSP forbids eval)
        assert time.monotonic() - started < 10
        pager = page.locator("#workers-pager")
        assert "1\u201350 of 1,000" in pager.inner_text()
        assert page.locator('[data-kpi="queued"] .value').inner_text() == "100k"
        page.locator("#workers-pager button", has_text="next").click()
        wait_until(lambda: "51\u2013100" in pager.inner_text(), 10, what="the second page")
        page.fill("#worker-filter", "node-0999")
        page.wait_for_selector('#workers tr[data-worker="node-0999"]', timeout=10_000)
        wait_until(lambda: rows.count() == 1, 10, what="the filter")
        body = page.locator("body")
        version = int(body.get_attribute("data-version") or 0)
        wait_until(lambda: int(body.get_attribute("data-version") or 0) > version + 1, 10, what="live updates")
        t0 = time.monotonic()
        page.evaluate("window.conveyorDashboard.openJob('job-99997')")
        page.wait_for_selector("#drawer:not([hidden]) .fact", timeout=10_000)
        assert time.monotonic() - t0 < 5
        assert "app.tasks:fetch" in page.locator("#job-sub").inner_text()
    finally:
        server.close()
        d.stop()
        loop.join(10)

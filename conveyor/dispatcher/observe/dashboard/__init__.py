"""The dispatcher's web dashboard (`conveyor dispatcher --dashboard-port N`): static files and a JSON API.

It runs in its own threads (http.server) and never touches scheduler state: it reads the snapshot
the loop publishes once a second (observe.py), and asks the loop (`Observer.ask`) for what needs live
state, a job's details or a job listing. Live updates are Server-Sent Events: one event per snapshot.

Routes:

    GET /                       the page (static/index.html, app.js, style.css; no CDN, no build step)
    GET /api/snapshot           the latest snapshot, trimmed for a browser (workers: the 100 busiest)
    GET /api/status             what `conveyor status --json` prints (all workers)
    GET /api/workers?offset=&limit=&q=    a page of workers, busiest first, filtered by name/host/mode/tag
    GET /api/jobs?state=&since=&fn=&limit=   recent jobs (as `conveyor jobs`)
    GET /api/jobs/ID            one job: state, history, error, progress and output
    GET /api/events             text/event-stream of trimmed snapshots

Access: bound to loopback (the default), anyone on this host may look, and the Host header must name
a loopback address (a DNS-rebinding page cannot read it). Bound elsewhere, every request needs the token:
`?token=...` once (it is then kept in a cookie), or an `Authorization: Bearer ...` header.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from conveyor.dispatcher.observe.observer import Observer

log = logging.getLogger("conveyor.dashboard")

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
COOKIE = "conveyor_dashboard"
MAX_STREAMS = 64  # concurrent event streams (each holds a thread)
WORKERS_IN_SNAPSHOT = 100
QUEUES_IN_SNAPSHOT = 50
ASK_TIMEOUT = 5.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _trim_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    """What a browser gets every second: bounded whatever the size of the cluster."""
    status = snap["status"]
    workers = status["workers"]
    modes: dict[str, dict[str, int]] = {}
    for w in workers:
        m = modes.setdefault(w["mode"], {"workers": 0, "slots": 0, "busy": 0, "draining": 0})
        m["workers"] += 1
        m["slots"] += w["concurrency"]
        m["busy"] += w["running"]
        m["draining"] += 1 if w["draining"] else 0
    queues = sorted(status["queues"], key=lambda q: -q["queued"])
    failures = []
    for f in snap["failures"][:20]:
        error = dict(f["error"])
        error["traceback"] = error.get("traceback", "")[-4000:]
        failures.append({k: v for k, v in f.items() if k != "output"} | {"error": error})
    top_functions = sorted(
        snap["functions"].items(), key=lambda kv: -(kv[1]["succeeded"] + kv[1]["failed"] + kv[1]["submitted"])
    )[:20]
    return {
        "version": snap["version"],
        "time": snap["time"],
        "dispatcher": status["dispatcher"],
        "uptime": status["uptime"],
        "journal": status.get("journal", {"state": "off"}),
        "totals": status["totals"],
        "queued": status["queued"],
        "running": status["running"],
        "delayed": status["delayed"],
        "scheduled": status.get("scheduled", 0),
        "limited": status.get("limited", 0),
        "limits": snap.get("limits", [])[:QUEUES_IN_SNAPSHOT],
        "slots": status["slots"],
        "throughput": status["throughput"],
        "queues": queues[:QUEUES_IN_SNAPSHOT],
        "queues_total": len(queues),
        "workers": workers[:WORKERS_IN_SNAPSHOT],
        "workers_total": len(workers),
        "modes": modes,
        "series": snap["series"],
        "failures": failures,
        "recent": snap["recent"],
        "running_jobs": snap["running_jobs"],
        "functions": [
            {"fn": fn, **{k: v for k, v in f.items() if k not in ("duration", "wait")},
             "mean_duration": f["duration"]["sum"] / f["duration"]["count"] if f["duration"]["count"] else None}
            for fn, f in top_functions
        ],
        "heartbeat_misses": snap["heartbeat_misses"],
    }


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], observer: Observer, token: str | None):
        super().__init__(address, _Handler)
        self.observer = observer
        self.token = token
        self.closing = False
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._cache_lock = threading.Lock()
        self._cache: tuple[int, bytes] = (-1, b"null")
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def snapshot_json(self) -> tuple[int, bytes]:
        """The trimmed snapshot as JSON, made once per snapshot version whatever the number of readers."""
        snap = self.observer.snapshot
        if snap is None:
            return -1, b"null"
        with self._cache_lock:
            if self._cache[0] != snap["version"]:
                self._cache = (snap["version"], json.dumps(_trim_snapshot(snap), default=str).encode())
            return self._cache

    def close(self) -> None:
        self.closing = True
        with self.observer.changed:
            self.observer.changed.notify_all()
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"
    server_version = "conveyor-dashboard"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- access ----------------------------------------------------------------------------------------

    def _authorized(self, query: dict[str, list[str]]) -> tuple[bool, bool]:
        """(allowed, token came in the query string)."""
        token = self.server.token
        if token is None:
            host = urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
            return is_loopback(host), False
        given = query.get("token", [None])[0]
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            return True, True
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            return True, False
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(unquote(value).encode(), token.encode()):
                return True, False
        return False, False

    # --- responses ---------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path
        allowed, via_query = self._authorized(query)
        if not allowed:
            if self.server.token is None:
                self._error(HTTPStatus.FORBIDDEN, "the dashboard answers only to a loopback Host header")
            else:
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    b"<!doctype html><title>Conveyor</title><p>This dashboard needs its token: open the URL the "
                    b"dispatcher printed (it ends in <code>?token=...</code>).</p>",
                    "text/html; charset=utf-8",
                    {"WWW-Authenticate": "Bearer"},
                )
            return
        if via_query and self.server.token is not None:  # keep the token in a cookie, take it out of the URL
            cookie = f"{COOKIE}={quote(self.server.token)}; Path=/; HttpOnly; SameSite=Strict"
            if path == "/":
                self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})
                return
        if path in STATIC:
            name, content_type = STATIC[path]
            body = resources.files(__package__).joinpath("static", name).read_bytes()
            self._send(200, body, content_type)
        elif path == "/api/snapshot":
            _, body = self.server.snapshot_json()
            self._send(200, body, "application/json")
        elif path == "/api/status":
            snap = self.server.observer.snapshot
            self._json(snap["status"] if snap else None)
        elif path == "/api/workers":
            self._workers(query)
        elif path == "/api/jobs":
            self._jobs(query)
        elif path.startswith("/api/jobs/"):
            self._job(unquote(path[len("/api/jobs/") :]))
        elif path == "/api/events":
            self._events()
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._error(HTTPStatus.NOT_FOUND, "no such page")

    def _int(self, query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
        try:
            value = int(query.get(name, [default])[0])
        except ValueError:
            value = default
        return max(low, min(value, high))

    def _workers(self, query: dict[str, list[str]]) -> None:
        snap = self.server.observer.snapshot
        workers = snap["status"]["workers"] if snap else []
        q = (query.get("q", [""])[0] or "").lower()
        if q:
            workers = [
                w for w in workers
                if q in w["name"].lower() or q in w["host"].lower() or q == w["mode"] or q in w["tags"]
            ]
        offset = self._int(query, "offset", 0, 0, 10**9)
        limit = self._int(query, "limit", 50, 1, 500)
        self._json({"total": len(workers), "offset": offset, "workers": workers[offset : offset + limit]})

    def _ask(self, kind: str, **args: Any) -> Any:
        return self.server.observer.ask(kind, **args).result(ASK_TIMEOUT)

    def _jobs(self, query: dict[str, list[str]]) -> None:
        states = [s for v in query.get("state", []) for s in v.split(",") if s] or None
        since = None
        if query.get("since"):
            from conveyor.protocol.durations import parse_duration

            try:
                since = parse_duration(query["since"][0])
            except ValueError as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
                return
        fn = query.get("fn", [None])[0] or None
        limit = self._int(query, "limit", 100, 1, 1000)
        try:
            jobs, truncated = self._ask("jobs", states=states, since=since, fn=fn, limit=limit)
        except FutureTimeout:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the dispatcher did not answer in time")
            return
        self._json({"jobs": jobs, "truncated": truncated})

    def _job(self, job_id: str) -> None:
        try:
            job = self._ask("job", id=job_id)
        except FutureTimeout:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the dispatcher did not answer in time")
            return
        if job is None:
            self._error(HTTPStatus.NOT_FOUND, f"no job {job_id} (never submitted, or forgotten)")
            return
        self._json(job)

    def _events(self) -> None:
        if not self.server.streams.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "too many open event streams")
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.close_connection = True
            observer = self.server.observer
            sent = [-1]  # the version last sent (a cell: the wait predicate reads it)
            self.wfile.write(b"retry: 2000\n\n")
            while not self.server.closing:
                version, body = self.server.snapshot_json()
                if version != sent[0] and version >= 0:
                    self.wfile.write(b"event: snapshot\nid: %d\ndata: " % version + body + b"\n\n")
                    self.wfile.flush()
                    sent[0] = version
                with observer.changed:
                    woke = observer.changed.wait_for(
                        lambda: observer.version != sent[0] or self.server.closing, timeout=15.0
                    )
                if not woke:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
        finally:
            self.server.streams.release()


def start_dashboard(
    observer: Observer, port: int, host: str = "127.0.0.1", token: str | None = None
) -> tuple[DashboardServer, str | None]:
    """Serve the dashboard from a thread. Returns (server, token): off loopback a token is required,
    generated when none is given. Port 0 picks a free port (`server.port`)."""
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    observer.publish = True
    server = DashboardServer((host, port), observer, token)
    thread = threading.Thread(target=server.serve_forever, name="conveyor-dashboard", daemon=True)
    server.thread = thread
    thread.start()
    return server, token

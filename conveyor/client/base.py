"""What Client and AsyncClient share: configuration, task options, encoding, the connection, its lifecycle.

Both classes have the same public methods (tests/test_async_client.py checks it); only how they wait
differs: Client blocks on the connection's futures, AsyncClient awaits them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Self

import msgspec

from conveyor.client import deps
from conveyor.client.connection import Connection
from conveyor.client.future import JobFuture
from conveyor.client.limitkeys import filled_limits
from conveyor.client.local import LocalCluster
from conveyor.client.mapping import SLOTS_REFRESH_S, Args, MapRun, slots_for
from conveyor.protocol import Cmd
from conveyor.protocol import commands as c
from conveyor.protocol import failures as perr
from conveyor.protocol.commands import MODE_NAMES
from conveyor.protocol.limitkeys import KEY_RE, is_template, template_fields
from conveyor.protocol.limits import check_frames
from conveyor.protocol.payload import encode_call, encode_function
from conveyor.security.keys import ENV_KEYS, PeerCredentials, load_peer_credentials

ENV_DISPATCHER = "CONVEYOR_DISPATCHER"
OPTION_NAMES = (
    "mode", "tags", "retries", "retry_backoff", "timeout", "retry_on", "keep",
    "priority", "countdown", "eta", "expires", "limits", "rate_limit",
)
# The dispatcher parses rates fully (conveyor/dispatcher/limits.py); the client only refuses malformed ones early.
_RATE_RE = re.compile(r"^\s*\d+(\.\d+)?\s*/\s*\d*\s*[smhd]\s*(,\s*burst\s*=\s*[1-9]\d*\s*)?$", re.IGNORECASE)
_TEN_YEARS_S = 10.0 * 365 * 86400
REQUEST_TIMEOUT_S = 10.0  # default wait for the dispatcher's answer to status, job_info, jobs, logs, cancel


class ClientState(enum.Enum):
    """Where a client is in its life. Calls other than close() are refused unless it is OPEN."""

    UNOPENED = "unopened"  # an AsyncClient before `async with` (a Client opens in its constructor)
    OPEN = "open"
    BROKEN = "broken"  # the dispatcher was lost or refused this client: every call raises that error
    CLOSED = "closed"  # close() was called


def wire_options(options: dict[str, Any]) -> dict[str, Any]:
    """Task options as SUBMIT carries them, checked: TypeError for an unknown name, ValueError for a bad value."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in OPTION_NAMES:
            raise TypeError(f"unknown task option {key!r}; known: {', '.join(OPTION_NAMES)}")
        if value is None:
            continue
        if key == "tags":
            value = [value] if isinstance(value, str) else list(value)
        elif key == "retry_on":
            names = value if isinstance(value, list | tuple) else [value]
            value = [v if isinstance(v, str) else perr.type_name(v) for v in names]
        elif key == "mode" and value not in MODE_NAMES:
            raise ValueError(f"unknown mode {value!r}: choose one of {', '.join(MODE_NAMES)}")
        elif key in ("priority", "countdown", "eta", "expires", "limits", "rate_limit"):
            out.update(_wait_option(key, value))
            continue
        out[key] = value
    if options.get("eta") is not None and options.get("countdown") is not None:
        raise ValueError("give eta or countdown, not both")
    _check_eta_before_expiry(out)
    return out  # None values (from eta, countdown, expires) clear an inherited option; see ClientBase._view


def _wait_option(key: str, value: Any) -> dict[str, Any]:
    """One option of work that waits (priority, countdown, eta, expires, limits, rate_limit) in wire names."""
    if key == "priority":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"priority must be an integer (higher runs first), not {value!r}")
        if not -(2**31) <= value <= 2**31:  # the protocol's range (TaskOptions)
            raise ValueError(f"priority must be within ±2**31, not {value!r}")
        return {"priority": value}
    if key == "countdown":
        return {"countdown": _seconds("countdown", value, allow_zero=True), "eta": None}
    if key == "eta":
        return {"eta": _unix_time("eta", value), "countdown": None}
    if key == "expires":
        if isinstance(value, dt.datetime):
            return {"expires_at": _unix_time("expires", value), "expires_in": None}
        return {"expires_in": _seconds("expires", value, allow_zero=False), "expires_at": None}
    if key == "limits":
        keys = [value] if isinstance(value, str) else list(value)
        if not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"limits must be a list of limit key names, not {value!r}")
        bad = next((k for k in keys if not KEY_RE.match(k)), None)
        if bad is not None or len(keys) > 16:
            raise ValueError(f"bad limit key {bad!r}: letters, digits and _ . : - / {{ }}, at most 200" if bad
                             else f"at most 16 limit keys per task, not {len(keys)}")
        for k in keys:
            if is_template(k):
                template_fields(k)  # ValueError if its braces are not {name} fields
        return {"limits": keys}
    if not isinstance(value, str) or not _RATE_RE.match(value):
        raise ValueError(f"bad rate_limit {value!r}: use e.g. '10/s', '100/m' or '5/10s,burst=3'")
    return {"rate_limit": value.strip()}


def _seconds(name: str, value: Any, *, allow_zero: bool) -> float:
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'zero or more' if allow_zero else 'more than zero'} seconds, not {value!r}")
    if value > _TEN_YEARS_S:  # the protocol's range (TaskOptions)
        raise ValueError(f"{name} must be at most ten years, not {value!r} seconds")
    return float(value)


def _unix_time(name: str, value: Any) -> float:
    """A time zone aware datetime as Unix time; a naive one is refused (whose clock would it be?)."""
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{name} must be a datetime with a time zone, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} {value.isoformat()} has no time zone: use e.g. datetime.now(timezone.utc)")
    return value.timestamp()


def _has_template(options: dict[str, Any]) -> bool:
    return any(is_template(k) for k in options.get("limits", ()))


def _check_eta_before_expiry(out: dict[str, Any]) -> None:
    eta, countdown = out.get("eta"), out.get("countdown")
    expires_at, expires_in = out.get("expires_at"), out.get("expires_in")
    if eta is not None and expires_at is not None and eta >= expires_at:
        raise ValueError("eta is not before expires: the job would expire before it is due")
    if countdown is not None and expires_in is not None and countdown >= expires_in:
        raise ValueError("countdown is not shorter than expires: the job would expire before it is due")


class ClientBase:
    """Configuration and the connection; subclasses add the methods, blocking or async."""

    _conn: Connection | None
    # Made by conveyor.current_client(): a task blocked on one of its futures lends its worker slot.
    lends_slot = False

    def __init__(
        self,
        address: str | Sequence[str] | None,
        *,
        connect_timeout: float,
        max_pending: int,
        reconnect_timeout: float,
        local_workers: int,
        local_mode: str,
        local_concurrency: int | None,
        context: Any,
        keys: str | os.PathLike[str] | None,
        max_message_size: int,
        options: dict[str, Any],
    ):
        if address is not None and not isinstance(address, str):  # several: a standby pair
            address = ",".join(address)
        self.address: str | None = address or os.environ.get(ENV_DISPATCHER) or None
        keys = keys or os.environ.get(ENV_KEYS) or None  # a key directory (docs/security.md)
        self._keys = None if keys is None else str(keys)
        self._credentials: PeerCredentials | None = load_peer_credentials(keys, "client") if keys is not None else None
        self._connect_timeout_s = connect_timeout
        self._max_pending = max_pending
        self._reconnect_timeout_s = reconnect_timeout
        self._local = (local_workers, local_mode, local_concurrency)
        self._context = context
        self._max_message_size = max_message_size  # bytes
        self._options = {k: v for k, v in wire_options(options).items() if v is not None}
        self._templated_keys = _has_template(self._options)  # then options are encoded per call, not cached
        self._after: tuple[Any, ...] = ()  # options(after=..., allow_failure=...): edges, not TaskOptions
        self._allow: Any = None
        self._task_opts: dict[str, msgspec.Raw] = {}  # per function name: its options, checked and encoded once
        self._slots: dict[tuple[str | None, frozenset[str]], tuple[float, Future[int]]] = {}  # shared by views
        self._owner = True
        self._cluster: LocalCluster | None = None
        self._conn = None

    # --- lifecycle ----------------------------------------------------------------------------------

    def _start_cluster(self) -> str:
        """With no address: start a private local cluster (blocking; AsyncClient runs it in a thread)."""
        workers, mode, concurrency = self._local
        self._cluster = LocalCluster(workers=workers, mode=mode, concurrency=concurrency, keys=self._keys)
        self.address = self._cluster.start()
        return self.address

    def _new_connection(self) -> Connection:
        assert self.address is not None
        self._conn = Connection(
            self.address, max_pending=self._max_pending, reconnect_timeout_s=self._reconnect_timeout_s,
            context=self._context, credentials=self._credentials, max_message_size=self._max_message_size,
        )
        self._conn.submitter = self
        return self._conn

    @property
    def state(self) -> ClientState:
        conn = self._conn
        if conn is None:
            return ClientState.UNOPENED
        if conn.closing:
            return ClientState.CLOSED
        if conn.fatal is not None:
            return ClientState.BROKEN
        return ClientState.OPEN

    def _open_conn(self) -> Connection:
        """The connection, if the client may be used; otherwise a clear error, raised here at the API."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"{type(self).__name__} is not open yet: use `async with {type(self).__name__}(...)`")
        if conn.closing:
            raise RuntimeError(f"this {type(self).__name__} of {self.address} is closed")
        if conn.fatal is not None:
            raise conn.fatal.with_traceback(None)
        return conn

    def _view(self, options: dict[str, Any]) -> Self:
        """A view of this client whose tasks carry these options; it shares the connection."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        if "after" in options or "allow_failure" in options:
            options = dict(options)
            after = options.pop("after", None)
            view._after = (after,) if deps.as_job(after) is not None else tuple(after or ())
            view._allow = options.pop("allow_failure", None)
        merged = {**self._options, **wire_options(options)}
        view._options = {k: v for k, v in merged.items() if v is not None}
        view._templated_keys = _has_template(view._options)
        _check_eta_before_expiry(view._options)
        view._task_opts = {}
        view._owner = False
        return view

    @property
    def duplicate_results(self) -> int:
        """Outcomes that arrived for jobs already resolved (after a re-send) and were dropped."""
        return self._conn.duplicate_results if self._conn is not None else 0

    # --- submitting ---------------------------------------------------------------------------------

    def batch(self) -> contextlib.AbstractContextManager[deps.Batch]:
        """`with client.batch() as b:` sends every job submitted inside (by this thread) as one SUBMIT,
        accepted all or none in one journal commit; `b.futures` are their futures."""
        return deps.batch(self._open_conn())

    def _submit_frames(
        self, name: str, frames: list[Any], dep: deps.Deps | None = None, opts: msgspec.Raw | None = None
    ) -> JobFuture:
        conn = self._open_conn()
        check_frames(frames, self._max_message_size)  # a larger frame would cut the connection
        # One options map per function, shared by its tasks (nothing changes it once built), unless its
        # limit keys are templates: then the caller filled them in for this call (_call_options).
        if opts is None:
            opts = self._task_opts.get(name)
        if opts is None:
            if len(self._task_opts) >= 1024:
                self._task_opts.clear()
            opts = self._task_opts[name] = c.raw_options(c.options(**self._options, fn=name))
        future = conn.submit(conn.new_job_id(), opts, frames, dep)
        if not self._owner:  # a view: then() submits with its options too
            future._submitter = self
        return future

    def _submit_call(self, fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> JobFuture:
        name, blob = encode_function(fn)
        opts = self._call_options(fn, name, args, kwargs) if self._templated() else None
        if self._after or deps.has_futures(args, kwargs):  # a job with parents (deps.py)
            frames, dep, blocked = deps.find(name, blob, args, kwargs, self._after, self._allow)
            if blocked is not None:
                return deps.failed_future(self._open_conn(), blocked)
            return self._submit_frames(name, frames, dep, opts)
        return self._submit_frames(name, encode_call(name, blob, args, kwargs), None, opts)

    def _templated(self) -> bool:
        """Whether a limit key of these options is a template (`tenant:{tenant_id}`): filled in per call."""
        return self._templated_keys

    def _call_options(
        self, fn: Callable[..., Any] | str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> msgspec.Raw:
        """This call's options, its template limit keys filled in from its arguments; ValueError if one is
        missing (a parameter's default counts: it is the value the call runs with)."""
        return c.raw_options(c.options(**filled_limits(self._options, fn, args, kwargs), fn=name))

    def _map_run(
        self, fn: Callable[..., Any] | str, calls: Iterable[Iterable[Any]], chunksize: int | None, window: int | None
    ) -> tuple[str, MapRun]:
        self._open_conn()
        name, blob = encode_function(fn)
        args: Iterator[Args] = (tuple(a) for a in calls)

        # An item with parents goes alone (deps.py); so does every item under a template limit key, since
        # items with different filled-in keys cannot share a chunk (one job, one set of keys).
        alone = bool(self._after) or self._templated()

        def submit_dependant(item: Args) -> JobFuture | None:
            if alone or deps.has_futures(item, {}):
                return self._submit_call(fn, item, {})
            return None

        run = MapRun(lambda frames: self._submit_frames(name, frames), name, blob, args, chunksize, window,
                     self._ask_slots, submit_dependant, every_item_dependant=alone)
        return name, run

    def _ask_slots(self) -> Future[int] | None:
        """A future of how many worker slots can run this client's tasks (STATUS, shared for a while)."""
        tags = self._options.get("tags") or ()
        key = (self._options.get("mode"), frozenset(tags))
        now = time.monotonic()
        cached = self._slots.get(key)
        if cached is not None and now - cached[0] < SLOTS_REFRESH_S:
            return cached[1]
        conn = self._conn
        if conn is None:
            return None
        try:
            req, reply = conn.start_request(Cmd.STATUS, {})
        except Exception:
            return None
        slots: Future[int] = Future()

        def answered(f: Future[Any]) -> None:
            conn.end_request(req)
            try:
                slots.set_result(slots_for(f.result(), key[0], key[1]))
            except BaseException as exc:
                slots.set_exception(exc)

        reply.add_done_callback(answered)
        self._slots[key] = (now, slots)
        return slots

    # --- request bodies -----------------------------------------------------------------------------

    def _cancel_ids(self, jobs: tuple[JobFuture | str, ...]) -> list[str]:
        """Ids to cancel; futures among them are cancelled locally at once (no second CANCEL_JOBS)."""
        ids = []
        for job in jobs:
            if isinstance(job, JobFuture):
                job._cancel_locally()
                ids.append(job.job_id)
            else:
                ids.append(str(getattr(job, "job_id", job)))
        return ids

    @staticmethod
    def _jobs_body(states: Iterable[str] | None, since: float | None, fn: str | None, limit: int) -> dict[str, Any]:
        body: dict[str, Any] = {"limit": limit}
        if states is not None:
            body["states"] = list(states)
        if since is not None:
            body["since"] = since
        if fn is not None:
            body["fn"] = fn
        return body


def limits_body(rules: dict[str, str | None]) -> dict[str, Any]:
    """A LIMITS request body; the key is checked here so a bad one is a ValueError, not a dropped message."""
    for key, rule in rules.items():
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise ValueError(f"bad limit key {key!r}: letters, digits and _ . : - / {{ }}, at most 200")
        if rule is not None and (not isinstance(rule, str) or len(rule) > 64):
            raise ValueError(f"bad limit rule {rule!r}: use e.g. '100/s,burst=20' or 'concurrency:4'")
    return {"set": rules}


def limit_list(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """The keys of a LIMITS_REPLY; the dispatcher's refusal of a rule as a ValueError."""
    if reply.get("error"):
        raise ValueError(reply["error"])
    return list(reply.get("limits") or [])


def limit_of(reply: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((k for k in limit_list(reply) if k.get("key") == key), None)


def common_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls zip(*iterables) makes, if every iterable knows its length."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None

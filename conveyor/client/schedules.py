"""Schedules from the client: the SCHEDULE request bodies and what their replies mean (docs/schedules.md).

Client and AsyncClient share this module; each adds thin methods that send a body built here and read
the reply with `one`, `many`, `slots` or `job_ids`. The dispatcher checks everything again (it is the
one scheduler); what is checked here is what a caller gets wrong most, so that it is a ValueError with
one clear line before anything leaves the process.

    client.schedule("nightly", reports.nightly, "eu", cron="0 2 * * *", tz="Europe/Berlin")
    client.options(retries=2, timeout=600).schedule("ping", ops.ping, every="15m", offset="5m")
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from conveyor.client.limitkeys import filled_limits
from conveyor.protocol import commands as c
from conveyor.protocol.durations import parse_duration
from conveyor.protocol.payload import encode_call, encode_function

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")  # as the dispatcher's (conveyor/dispatcher/schedules.py)
MISFIRE = ("skip", "once", "all")
OVERLAP = ("skip", "queue_one", "allow", "cancel_previous")
DEFAULT_CATCHUP_WINDOW_S = 86400.0
DEFAULT_MAX_CATCHUP = 100

Duration = float | int | str | dt.timedelta  # seconds, '15m' / '1h30m', or a timedelta


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"bad schedule name {name!r}: letters, digits, '.', '_', '-' (at most 100)")
    return name


def seconds(what: str, value: Duration) -> float:
    """A duration as seconds: a number, a timedelta or text such as '15m'; ValueError naming `what`."""
    if isinstance(value, dt.timedelta):
        out = value.total_seconds()
    elif isinstance(value, str):
        try:
            out = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out = float(value)
    else:
        raise ValueError(f"{what} must be seconds, a timedelta or a duration such as '15m', not {value!r}")
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{what} must be zero or more seconds, not {value!r}")
    return out


def spec(
    *,
    cron: str | None = None,
    every: Duration | None = None,
    offset: Duration | None = None,
    tz: str = "UTC",
    misfire: str = "once",
    overlap: str = "skip",
    jitter: Duration | None = None,
    catchup_window: Duration | None = None,
    max_catchup: int = DEFAULT_MAX_CATCHUP,
    pause_on_failure: bool = False,
) -> dict[str, Any]:
    """A ScheduleSpec body (docs/protocol.md), checked: ValueError with one line for a bad value."""
    if (cron is None) == (every is None):
        raise ValueError("give exactly one of cron='0 3 * * *' or every='15m' (seconds or a timedelta)")
    if cron is not None and (not isinstance(cron, str) or not cron.strip()):
        raise ValueError(f"cron must be a cron expression such as '0 3 * * *' or '@hourly', not {cron!r}")
    every_s = None if every is None else seconds("every", every)
    if every_s is not None and every_s < 1.0:
        raise ValueError(f"every must be at least 1 second, not {every!r}")
    if offset is not None and every is None:
        raise ValueError("offset applies to every=, not to cron=")
    if not isinstance(tz, str):
        raise ValueError(f"tz must be an IANA zone name such as 'Europe/Berlin', not {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r} (an IANA name such as Europe/Berlin)") from None
    if misfire not in MISFIRE:
        raise ValueError(f"misfire must be one of {', '.join(MISFIRE)}, not {misfire!r}")
    if overlap not in OVERLAP:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAP)}, not {overlap!r}")
    jitter_s = 0.0 if jitter is None else seconds("jitter", jitter)
    if jitter_s >= 86400:
        raise ValueError(f"jitter must be less than a day, not {jitter!r}")
    window_s = DEFAULT_CATCHUP_WINDOW_S if catchup_window is None else seconds("catchup_window", catchup_window)
    if window_s <= 0:
        raise ValueError("catchup_window must be more than zero seconds")
    if isinstance(max_catchup, bool) or not isinstance(max_catchup, int) or not 0 < max_catchup <= 100_000:
        raise ValueError(f"max_catchup must be an integer from 1 to 100000, not {max_catchup!r}")
    if not isinstance(pause_on_failure, bool):
        raise ValueError(f"pause_on_failure must be True or False, not {pause_on_failure!r}")
    out: dict[str, Any] = {
        "tz": tz, "misfire": misfire, "overlap": overlap, "jitter_s": jitter_s, "catchup_window_s": window_s,
        "max_catchup": max_catchup, "pause_on_failure": pause_on_failure,
    }
    if cron is not None:
        out["cron"] = cron.strip()
    else:
        out["every_s"] = every_s
        out["offset_s"] = 0.0 if offset is None else seconds("offset", offset)
    return out


def upsert(
    name: str, fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any],
    options: Mapping[str, Any], when: dict[str, Any],
) -> tuple[dict[str, Any], list[Any]]:
    """The SCHEDULE upsert: its body (spec and the task options of the client or view) and the call's frames."""
    check_name(name)
    if options.get("eta") is not None or options.get("countdown") is not None:
        raise ValueError("a scheduled task cannot have its own eta or countdown: its slot is its time")
    fn_name, blob = encode_function(fn)
    # A template limit key is filled in once, from the schedule's own arguments (every run has the same).
    opts = c.raw_options(c.options(**filled_limits(options, fn, args, kwargs), fn=fn_name))
    return {"op": "upsert", "name": name, "spec": when, "options": opts}, encode_call(fn_name, blob, args, kwargs)


def request(op: str, name: str, **fields: Any) -> dict[str, Any]:
    """The body of any other operation on schedule `name`."""
    return {"op": op, "name": check_name(name), **{k: v for k, v in fields.items() if v is not None}}


def preview_request(name_or_spec: str | Mapping[str, Any], count: int) -> dict[str, Any]:
    """preview: a stored schedule's next slots, or those of a spec (the keyword arguments of spec())."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
        raise ValueError(f"count must be an integer from 1 to 1000, not {count!r}")
    if isinstance(name_or_spec, str):
        return request("preview", name_or_spec, count=count)
    if not isinstance(name_or_spec, Mapping):
        raise ValueError(f"preview needs a schedule name or a spec such as {{'cron': '0 3 * * *'}}, "
                         f"not {name_or_spec!r}")
    try:
        body = spec(**name_or_spec)
    except TypeError as exc:  # an unknown key
        raise ValueError(f"bad spec for preview: {exc}") from None
    return {"op": "preview", "spec": body, "count": count}


def pause_until(until: dt.datetime | dt.timedelta | float | int | str | None) -> float | None:
    """When a pause ends, as Unix time: an aware datetime, or a duration from now (seconds, '2h', timedelta)."""
    if until is None:
        return None
    if isinstance(until, dt.datetime):
        return unix_time("until", until)
    duration_s = seconds("until", until)
    if duration_s > 10 * 365 * 86400:  # time.time() + 3600 passed as a duration: surely meant as a time
        raise ValueError(f"until={until!r} is a duration from now (over ten years?): for a time, pass a datetime")
    return time.time() + duration_s


def unix_time(what: str, value: Any) -> float:
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{what} must be a datetime with a time zone, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} {value.isoformat()} has no time zone: use e.g. datetime(..., tzinfo=timezone.utc)")
    return value.timestamp()


def backfill_request(name: str, start: dt.datetime, end: dt.datetime) -> dict[str, Any]:
    start_s, end_s = unix_time("start", start), unix_time("end", end)
    if end_s < start_s:
        raise ValueError(f"backfill: end {end.isoformat()} is before start {start.isoformat()}")
    return request("backfill", name, start=start_s, end=end_s)


# --- replies ----------------------------------------------------------------------------------------------


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("error"):
        raise ValueError(str(reply["error"]))
    return reply


def many(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """The schedules of a reply (list): each as the dispatcher shows it, times as Unix seconds."""
    return list(_checked(reply).get("schedules") or [])


def one(reply: dict[str, Any]) -> dict[str, Any]:
    found = many(reply)
    if not found:
        raise ValueError("the dispatcher answered without the schedule")
    return found[0]


def slots(reply: dict[str, Any], name_or_spec: str | Mapping[str, Any]) -> list[dt.datetime]:
    """A preview's slots as aware datetimes in the schedule's zone."""
    _checked(reply)
    found = reply.get("schedules") or []
    tz = found[0]["tz"] if found else (name_or_spec.get("tz") if isinstance(name_or_spec, Mapping) else None)
    zone = ZoneInfo(tz or "UTC")
    return [dt.datetime.fromtimestamp(t, zone) for t in reply.get("preview") or []]


def job_ids(reply: dict[str, Any]) -> list[str]:
    """The ids of the jobs a trigger or backfill created (sched:NAME:...)."""
    return list(_checked(reply).get("jobs") or [])


def deleted(reply: dict[str, Any]) -> None:
    _checked(reply)

"""The dispatcher's schedules file (`conveyor dispatcher --schedules FILE`): schedules declared as code.

    [schedules.nightly-report]
    cron = "0 2 * * *"            # or: every = "15m" (and offset = "5m")
    tz = "Europe/Berlin"
    task = "reports:nightly"       # module:function, importable on the workers
    args = ["eu"]
    kwargs = { full = true }
    misfire = "once"               # skip | once | all; catchup_window = "1d"; max_catchup = 100
    overlap = "skip"               # skip | queue_one | allow | cancel_previous
    jitter = "30s"
    pause_on_failure = false
    [schedules.nightly-report.options]   # task options, as for submit
    timeout = 600
    retries = 2

The file owns the schedules it declares: at start each is created or changed (keeping its last slot, so
an edit never fires at once), and a schedule the file declared before but no longer does is deleted.
Schedules made at run time (`conveyor schedule add`) are left alone. Pure apart from reading the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from conveyor.dispatcher.schedules import Spec
from conveyor.protocol import commands as c
from conveyor.protocol.durations import parse_duration
from conveyor.protocol.payload import encode_call

_SPEC_KEYS = {
    "cron", "every", "offset", "tz", "misfire", "catchup_window", "max_catchup", "overlap", "jitter",
    "pause_on_failure", "task", "args", "kwargs", "options",
}


@dataclass(frozen=True, slots=True)
class Declared:
    """One schedule of the file: its spec, the call it makes (encoded frames) and its task options."""

    spec: Spec
    call: list[bytes]
    options: c.TaskOptions


def load(path: str) -> list[Declared]:
    """Every schedule of the file, checked; ValueError naming the file and schedule if one is wrong."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the schedules file {path}: {exc}") from None
    table = doc.get("schedules", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [schedules] must be a table of [schedules.NAME] tables")
    out = []
    for name, raw in table.items():
        try:
            out.append(declared(str(name), raw))
        except ValueError as exc:
            raise ValueError(f"{path}: schedule {name!r}: {exc}") from None
    return out


def declared(name: str, raw: Any) -> Declared:
    if not isinstance(raw, dict):
        raise ValueError("must be a table")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    task = raw.get("task")
    if not isinstance(task, str) or ":" not in task:
        raise ValueError("task must be 'module:function'")
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("args must be a list and kwargs a table")
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise ValueError("options must be a table of task options")
    opts = c.options(**{**options, "fn": task})
    spec = Spec(
        name,
        cron=_text(raw, "cron"),
        every_s=_seconds(raw, "every"),
        offset_s=_seconds(raw, "offset") or 0.0,
        tz=_text(raw, "tz") or "UTC",
        misfire=_text(raw, "misfire") or "once",
        catchup_window_s=_seconds(raw, "catchup_window") or 86400.0,
        max_catchup=int(raw.get("max_catchup", 100)),
        overlap=_text(raw, "overlap") or "skip",
        jitter_s=_seconds(raw, "jitter") or 0.0,
        pause_on_failure=bool(raw.get("pause_on_failure", False)),
    )
    spec.check()
    call = [bytes(f) for f in encode_call(task, None, tuple(args), dict(kwargs))]
    return Declared(spec, call, opts)


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _seconds(raw: dict[str, Any], key: str) -> float | None:
    """A duration: a number of seconds or text such as '15m'."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{key} must be seconds or a duration such as '15m'")
    return float(value) if not isinstance(value, str) else parse_duration(value)

"""The `conveyor schedule` sub-app: add, list, show, preview, pause, resume, trigger, backfill, delete.

    conveyor schedule add nightly reports:nightly eu --cron "0 2 * * *" --tz Europe/Berlin --retries 2
    conveyor schedule add ping ops:ping --every 15m --offset 5m
    conveyor schedule preview nightly --count 5      # in the schedule's zone and in UTC
    conveyor schedule list --json

Bad input (a value, a cron expression, a zone the dispatcher refuses) is one line and exit status 2; an
unknown schedule is one line and exit status 1. Times are printed in the schedule's zone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer

from conveyor.cli.calls import parse_args, parse_function, parse_kwargs
from conveyor.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    CliError,
    DispatcherOpt,
    JsonOpt,
    KeysOpt,
    check_mode,
    connect,
    dump,
    new_app,
)

app = new_app("schedule", "Cron and interval schedules, run by the dispatcher (docs/schedules.md).")

NameArg = Annotated[str, typer.Argument(help="The schedule's name.")]


def _refused(exc: ValueError) -> CliError:
    """A ValueError from the client (or the dispatcher's refusal) as one line: 1 for an unknown schedule."""
    message = str(exc)
    return CliError(message, EXIT_FAILED if message.startswith("no schedule") else EXIT_USAGE)


def _when(t: float | None, tz: str) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _time_arg(option: str, text: str) -> datetime:
    """An ISO-8601 time with a zone (or Z); a time without one is read as UTC, and said so in --help."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{option}: {text!r} is not an ISO-8601 time such as 2026-12-01T03:00Z", EXIT_USAGE) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@app.command(context_settings={"ignore_unknown_options": True})  # -1 is an argument, as for submit
def add(
    name: NameArg,
    function: Annotated[str, typer.Argument(help="module:function to run, importable on the workers.")],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments; each parsed as JSON, else a string.")] = None,
    cron: Annotated[str | None, typer.Option(help="Cron: 5 fields, 6 with seconds first, @hourly...")] = None,
    every: Annotated[str | None, typer.Option(help="An interval from the Unix epoch: 30s, 15m, 1h.")] = None,
    offset: Annotated[str | None, typer.Option(help="With --every: shift the slots by this much (5m).")] = None,
    tz: Annotated[str, typer.Option(help="IANA zone of the cron expression.")] = "UTC",
    misfire: Annotated[str, typer.Option(help="Missed slots: skip, once (the latest) or all.")] = "once",
    overlap: Annotated[
        str, typer.Option(help="Previous run unfinished: skip, queue_one, allow or cancel_previous.")
    ] = "skip",
    jitter: Annotated[str | None, typer.Option(help="Delay each run by a stable [0, JITTER) offset: 30s.")] = None,
    catchup_window: Annotated[
        str | None, typer.Option("--catchup-window", help="Missed slots older than this never run [1d].")
    ] = None,
    max_catchup: Annotated[int, typer.Option("--max-catchup", help="misfire=all: at most this many.")] = 100,
    pause_on_failure: Annotated[
        bool, typer.Option("--pause-on-failure", help="Pause the schedule when a run fails for good.")
    ] = False,
    kwargs: Annotated[str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")] = None,
    mode: Annotated[str | None, typer.Option(help="Only run on a worker in this mode.")] = None,
    retries: Annotated[int | None, typer.Option(help="Retries of each run.")] = None,
    retry_on: Annotated[
        list[str] | None, typer.Option("--retry-on", help="Exception type name to retry (repeatable).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Fail a run after this many seconds.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Only run on workers with this tag.")] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or change a schedule (an edit keeps its last slot: it never fires at once)."""
    function = parse_function(function)
    call_kwargs, call_args = parse_kwargs(kwargs), parse_args(args)
    if mode is not None:
        check_mode(mode)
    from conveyor.client import schedules as sched

    when: dict[str, Any] = dict(
        cron=cron, every=every, offset=offset, tz=tz, misfire=misfire, overlap=overlap, jitter=jitter,
        catchup_window=catchup_window, max_catchup=max_catchup, pause_on_failure=pause_on_failure,
    )
    try:  # checked before connecting: a typo is one line even with no dispatcher running
        sched.spec(**when)
        sched.check_name(name)
    except ValueError as exc:
        raise _refused(exc) from None
    clash = sorted(set(call_kwargs) & set(when))
    if clash:
        raise CliError(f"--kwargs cannot name {', '.join(clash)}: they are the schedule's own settings", EXIT_USAGE)
    with connect(dispatcher, keys) as client:
        try:
            view = client.options(mode=mode, retries=retries, retry_on=retry_on or None, timeout=timeout,
                                  tags=tag or None, priority=priority)
            shown = view.schedule(name, function, *call_args, **when, **call_kwargs)
        except ValueError as exc:
            raise _refused(exc) from None
    if as_json:
        print(dump(shown))
        return
    print(f"{shown['name']}: {shown['explain']}; next run {_when(shown['next_run'], shown['tz'])}")


@app.command("list")
def list_command(dispatcher: DispatcherOpt = None, keys: KeysOpt = None, as_json: JsonOpt = False) -> None:
    """Every schedule: next run, last run and its outcome, runs fired and slots skipped."""
    with connect(dispatcher, keys) as client:
        found = client.schedules()
    if as_json:
        print(dump({"schedules": found}))
        return
    if not found:
        print("no schedules")
        return
    rows = [("name", "next run", "last job", "outcome", "fired", "skipped", "when")]
    for s in found:
        nxt = "paused" if s["paused"] and s["paused_until"] is None else _when(s["next_run"], s["tz"])
        last = (s["last_job"] or "-").split(":", 2)[-1]
        rows.append((s["name"], nxt, last, s["last_outcome"] or "-", str(s["fired"]), str(s["skipped"]),
                     s["explain"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1])


@app.command()
def show(name: NameArg, dispatcher: DispatcherOpt = None, keys: KeysOpt = None, as_json: JsonOpt = False) -> None:
    """One schedule in full."""
    with connect(dispatcher, keys) as client:
        try:
            s = client.schedule_info(name)
        except ValueError as exc:
            raise _refused(exc) from None
    _print_one(s, as_json)


def _print_one(s: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(dump(s))
        return
    tz = s["tz"]
    lines = {
        "name": s["name"], "when": s["explain"], "zone": tz, "misfire": s["misfire"], "overlap": s["overlap"],
        "paused": ("until " + _when(s["paused_until"], tz)) if s["paused_until"] else ("yes" if s["paused"] else "no"),
        "next run": _when(s["next_run"], tz), "last slot": _when(s["last_slot"], tz),
        "last job": s["last_job"] or "-", "last outcome": s["last_outcome"] or "-",
        "fired": s["fired"], "skipped": s["skipped"], "origin": s.get("origin", "api"),
    }
    for key, value in lines.items():
        print(f"{key + ':':14}{value}")


@app.command()
def preview(
    name: Annotated[str | None, typer.Argument(help="A schedule's name (or give --cron / --every).")] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="How many slots.")] = 10,
    cron: Annotated[str | None, typer.Option(help="Preview this cron expression instead.")] = None,
    every: Annotated[str | None, typer.Option(help="Preview this interval instead.")] = None,
    tz: Annotated[str, typer.Option(help="With --cron: the zone.")] = "UTC",
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The next fire times, in the schedule's zone and in UTC."""
    if (name is None) == (cron is None and every is None):
        raise CliError("give a schedule's name, or --cron / --every (not both)", EXIT_USAGE)
    target: str | dict[str, Any] = name if name is not None else {"cron": cron, "every": every, "tz": tz}
    from conveyor.client import schedules as sched

    try:
        sched.preview_request(target, count)  # a bad value is one line before connecting
    except ValueError as exc:
        raise _refused(exc) from None
    with connect(dispatcher, keys) as client:
        try:
            slots = client.preview(target, count)
        except ValueError as exc:
            raise _refused(exc) from None
    if as_json:
        print(dump({"preview": [{"local": s.isoformat(), "utc": s.astimezone(UTC).isoformat(),
                                 "unix": s.timestamp()} for s in slots]}))
        return
    for s in slots:
        print(f"{s.strftime('%Y-%m-%d %H:%M:%S %Z'):28}{s.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")


@app.command()
def pause(
    name: NameArg,
    until: Annotated[
        str | None, typer.Option(help="Resume by itself: after a duration (2h) or at an ISO time (UTC if no zone).")
    ] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pause a schedule (for good, or --until)."""
    end: Any = None
    if until is not None:
        from conveyor.protocol.durations import parse_duration

        try:
            end = parse_duration(until)
        except ValueError:
            end = _time_arg("--until", until)
    with connect(dispatcher, keys) as client:
        try:
            s = client.pause(name, end)
        except ValueError as exc:
            raise _refused(exc) from None
    _print_one(s, as_json)


@app.command()
def resume(name: NameArg, dispatcher: DispatcherOpt = None, keys: KeysOpt = None, as_json: JsonOpt = False) -> None:
    """Resume a schedule; the slots missed meanwhile follow its misfire policy."""
    with connect(dispatcher, keys) as client:
        try:
            s = client.resume(name)
        except ValueError as exc:
            raise _refused(exc) from None
    _print_one(s, as_json)


@app.command()
def trigger(
    name: NameArg,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run and print its result.")] = False,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a schedule once now (its own id, sched:NAME:manual:N); its slots are untouched."""
    with connect(dispatcher, keys) as client:
        try:
            job_id = client.trigger(name)
        except ValueError as exc:
            raise _refused(exc) from None
        if not wait:
            print(dump({"id": job_id}) if as_json else job_id)
            return
        value = client.result(job_id)
    print(dump({"id": job_id, "result": value}) if as_json else (value if isinstance(value, str) else dump(value)))


@app.command()
def backfill(
    name: NameArg,
    start: Annotated[str, typer.Option("--from", help="First slot time, ISO-8601 (UTC if no zone).")],
    end: Annotated[str, typer.Option("--to", help="Last slot time, ISO-8601 (UTC if no zone).")],
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the slots between --from and --to (at most max_catchup, oldest first, through the overlap policy)."""
    first, last = _time_arg("--from", start), _time_arg("--to", end)
    with connect(dispatcher, keys) as client:
        try:
            ids = client.backfill(name, first, last)
        except ValueError as exc:
            raise _refused(exc) from None
    if as_json:
        print(dump({"jobs": ids}))
        return
    for job_id in ids:
        print(job_id)
    if not ids:
        print("no slots to run (none in the range, or each has its job already)")


@app.command()
def delete(name: NameArg, dispatcher: DispatcherOpt = None, keys: KeysOpt = None) -> None:
    """Delete a schedule (the jobs it created stay)."""
    with connect(dispatcher, keys) as client:
        try:
            client.unschedule(name)
        except ValueError as exc:
            raise _refused(exc) from None
    print(f"{name} deleted")

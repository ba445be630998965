"""`conveyor submit`, `result`, `status` and `cancel`: jobs by id, from the command line."""

from __future__ import annotations

import math
import re
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

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
)
from conveyor.errors import JobRejected
from conveyor.protocol import failures as perr
from conveyor.protocol.payload import decode_value


def _record_json(record: dict[str, Any], data: list[Any]) -> dict[str, Any]:
    out = {k: record.get(k) for k in ("id", "state", "worker", "attempts")}
    out["history"] = record.get("history", [])
    if record.get("output"):
        out["output"] = record["output"]  # the task's captured stdout, stderr and log records (their tails)
    if record.get("state") == "succeeded":
        out["result"] = decode_value(data)
    elif record.get("error"):
        out["error"] = record["error"]
    return out


def submit(
    function: Annotated[str | None, typer.Argument(help="module:function to run.")] = None,
    args: Annotated[list[str] | None, typer.Argument(help="Arguments; each parsed as JSON, else a string.")] = None,
    shell: Annotated[str | None, typer.Option("--shell", help="Run this shell command on a worker instead.")] = None,
    kwargs: Annotated[str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print the result.")] = False,
    mode: Annotated[str | None, typer.Option(help="Only run on a worker in this mode.")] = None,
    retries: Annotated[
        int | None, typer.Option(help="Retries: of crashes and lost workers, and of --retry-on exceptions.")
    ] = None,
    retry_on: Annotated[
        list[str] | None, typer.Option("--retry-on", help="Exception type name to retry (repeatable).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Fail the task after this many seconds.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Only run on workers with this tag.")] = None,
    priority: Annotated[int | None, typer.Option(help="Priority: an integer, higher runs first (default 0).")] = None,
    in_: Annotated[str | None, typer.Option("--in", help="Run no sooner than this from now: 90s, 10m, 2h.")] = None,
    at: Annotated[
        str | None, typer.Option("--at", help="Run no sooner than this time, with a zone: 2026-12-24T18:00+01:00.")
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(help="Expire the job if it has not started within this (1h) or by this time (ISO, with a zone)."),
    ] = None,
    limit: Annotated[
        list[str] | None, typer.Option("--limit", help="A limit key the dispatcher declares (repeatable).")
    ] = None,
    rate_limit: Annotated[
        str | None, typer.Option("--rate-limit", help="Starts of this function at most: 10/s, 100/m, 5/10s,burst=3.")
    ] = None,
    after: Annotated[list[str] | None, typer.Option("--after", help="Run only after this job (repeatable).")] = None,
    arg_from: Annotated[
        list[str] | None, typer.Option("--arg-from", help="Pass this job's result as the next argument (repeatable).")
    ] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job; print its id, or with --wait its result."""
    waits = _wait_options(priority, in_, at, expires, limit, rate_limit)
    if (function is None) == (shell is None):
        raise CliError("give either module:function [ARGS...] or --shell 'COMMAND'", EXIT_USAGE)
    call_kwargs = parse_kwargs(kwargs)
    if shell is not None:
        target, call_args = "conveyor.builtins:shell", [shell]
    else:
        assert function is not None
        target, call_args = parse_function(function), parse_args(args)
    if mode is not None:
        check_mode(mode)
    with connect(dispatcher, keys) as client:
        job = client.options(
            mode=mode, retries=retries, retry_on=retry_on or None, timeout=timeout, tags=tag or None, keep=True,
            **waits,
        )
        if after or arg_from:  # dependencies (docs/workflows.md): by id, the dispatcher checks them
            from conveyor.client import ref

            results: list[Any] = [ref(j) for j in arg_from or []]  # each the next positional argument
            call_args = [*call_args, *results]
            job = job.options(after=[ref(j) for j in after or []])
        try:
            fut = job.submit(target, *call_args, **call_kwargs)
        except ValueError as exc:  # a template limit key the call does not fill in (--kwargs does)
            raise CliError(str(exc), EXIT_USAGE) from None
        if not wait:
            fut.add_done_callback(lambda _: None)
            # the id is ours from the start; make sure the dispatcher accepted it before we exit
            info = client.job_info(fut.job_id)  # answered after the SUBMIT: a barrier
            if info[0] is None:  # rejected, or refused (its journal's disk is full): the future says why
                try:
                    refused = fut.exception(timeout=5)
                except TimeoutError:
                    refused = None
                # Rejected for what it asked (an unknown limit key, say) is bad input: exit 2, as for a bad option.
                code = EXIT_USAGE if isinstance(refused, JobRejected) else EXIT_FAILED
                raise CliError(f"the dispatcher did not accept the job{f': {refused}' if refused else ''}", code)
            print(dump({"id": fut.job_id}) if as_json else fut.job_id)
            return
        from conveyor.client.progress import wait_with_progress

        record, data = (
            client.wait_record(fut.job_id) if as_json else wait_with_progress(client, fut.job_id, target)
        )
        _print_outcome(record, data, as_json, shell=shell is not None)


def _wait_options(
    priority: int | None, in_: str | None, at: str | None, expires: str | None, limits: list[str] | None,
    rate_limit: str | None,
) -> dict[str, Any]:
    """--priority, --in, --at, --expires, --limit, --rate-limit as client options, checked as the client checks
    them (conveyor/client/base.py): a bad value is one line and exit 2, before anything is sent."""
    from conveyor.client.base import wire_options

    out: dict[str, Any] = {}
    if priority is not None:
        out["priority"] = priority
    if in_ is not None and at is not None:
        raise CliError("give --in or --at, not both", EXIT_USAGE)
    if in_ is not None:
        out["countdown"] = _duration("--in", in_)
    if at is not None:
        out["eta"] = _datetime("--at", at)
    if expires is not None:
        out["expires"] = _datetime("--expires", expires) if _looks_like_a_date(expires) else _duration(
            "--expires", expires)
    if limits:
        out["limits"] = limits
    if rate_limit is not None:
        out["rate_limit"] = rate_limit
    try:
        wire_options(out)
    except ValueError as exc:
        raise CliError(_cli_words(str(exc)), EXIT_USAGE) from None
    return out


def _duration(option: str, text: str) -> float:
    from conveyor.protocol.durations import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError:
        raise CliError(f"bad {option} {text!r}: use a duration, e.g. 90s, 10m, 2h, 1d", EXIT_USAGE) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise CliError(f"bad {option} {text!r}: use a duration of zero or more, e.g. 90s, 10m, 2h", EXIT_USAGE)
    return seconds


def _looks_like_a_date(text: str) -> bool:
    return len(text) >= 10 and text[4:5] == "-" and text[:4].isdigit()


def _datetime(option: str, text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"bad {option} {text!r}: use an ISO time with a zone, e.g. 2026-12-24T18:00+01:00",
                       EXIT_USAGE) from None
    if when.tzinfo is None:
        raise CliError(f"{option} {text} has no time zone: add one, e.g. {text}+01:00 or {text}Z", EXIT_USAGE)
    return when


def _cli_words(message: str) -> str:
    """The client's words for an option, in the CLI's (countdown is --in, eta is --at)."""
    for word, option in (("eta", "--at"), ("countdown", "--in"), ("expires", "--expires"),
                         ("rate_limit", "--rate-limit"), ("priority", "--priority"), ("limits", "--limit")):
        message = re.sub(rf"\b{word}\b", option, message)
    return message.replace("----", "--")


def _print_outcome(record: dict[str, Any], data: list[Any], as_json: bool, shell: bool = False) -> None:
    state = record.get("state")
    if as_json:
        print(dump(_record_json(record, data)))
        if state != "succeeded":
            raise typer.Exit(1)
        return
    if state == "succeeded":
        value = decode_value(data)
        if shell and isinstance(value, dict) and "exit_code" in value:
            sys.stdout.write(value.get("stdout", ""))
            sys.stderr.write(value.get("stderr", ""))
            raise typer.Exit(int(value["exit_code"]))
        print(value if isinstance(value, str) else dump(value))
        return
    error = record.get("error") or {}
    if state == "unknown":
        raise CliError(str(error.get("message", "unknown job")))
    if error.get("traceback"):
        sys.stderr.write(f"Remote traceback (job {record.get('id')}):\n{error['traceback']}")
    raise CliError(f"job {record.get('id')} {state}: {perr.describe(error)}")


def result(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job finishes.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a job's result, error or state."""
    with connect(dispatcher, keys) as client:
        if not wait:
            view = client.job_info(job_id)[0]
            if view is None:
                raise CliError(f"no job {job_id} (never submitted, or expired)")
            if view["state"] in ("waiting", "scheduled", "limited", "queued", "running"):  # not finished
                if as_json:
                    keys_ = ("id", "state", "worker", "attempts", "history", "progress", "output", "priority",
                             "due_at", "expires_at", "limits")
                    print(dump({k: view[k] for k in keys_ if k in view}))
                else:
                    from conveyor.client.progress import format_progress

                    print(" ".join(filter(None, [view["state"], _when(view), format_progress(view.get("progress"))])))
                return
        try:
            record, data = client.wait_record(job_id, timeout)
        except TimeoutError:
            raise CliError(f"job {job_id} did not finish within {timeout:g} s") from None
        _print_outcome(record, data, as_json)


def _when(view: dict[str, Any]) -> str:
    """What a waiting job waits for, briefly: 'due 2026-12-24T17:00:00Z', 'for db, stripe'."""
    if view["state"] == "scheduled" and view.get("due_at"):
        return f"due {_iso(view['due_at'])}"
    if view["state"] == "limited" and view.get("limits"):
        return f"for {', '.join(view['limits'])}"
    return ""


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def status(dispatcher: DispatcherOpt = None, as_json: JsonOpt = False, keys: KeysOpt = None) -> None:
    """Show workers and queue depth."""
    with connect(dispatcher, keys) as client:
        st = client.status()
    from conveyor.cli.observe import print_status

    print_status(st, as_json)  # workers (host, mode, busy slots, prefetch, done, heartbeat), queues, throughput


def cancel(
    job_ids: Annotated[list[str], typer.Argument(help="Job ids to cancel.")],
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
) -> None:
    """Cancel queued or running jobs."""
    with connect(dispatcher, keys) as client:
        done = set(client.cancel(*job_ids))
    for job_id in job_ids:
        print(f"{job_id} {'cancelled' if job_id in done else 'not cancelled (unknown or already finished)'}")
    if len(done) < len(job_ids):
        raise typer.Exit(1)

"""`conveyor limits`: the dispatcher's rate and concurrency keys, and changing them at run time.

    conveyor limits                              a table: key, rule, tokens or running, waiting, oldest wait
    conveyor limits --set 'stripe=100/s,burst=20' --set 'db=concurrency:4'
    conveyor limits --remove stripe
    conveyor limits --json

A rule is checked here before anything is sent (one line, exit 2 if it is wrong); the dispatcher applies
it at once (docs/scheduling.md). Removing a key leaves the jobs that name it waiting until it comes back.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from conveyor.cli.common import EXIT_USAGE, CliError, DispatcherOpt, JsonOpt, KeysOpt, connect, dump


def limits_command(
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=RULE: 'stripe=100/s,burst=20', 'db=concurrency:4' (repeatable)."),
    ] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="A key to remove (repeatable).")] = None,
    dispatcher: DispatcherOpt = None,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the dispatcher's limit keys; --set or --remove them at run time."""
    changes = _changes(set_ or [], remove or [])
    with connect(dispatcher, keys) as client:
        try:
            for key, rule in changes.items():
                client.set_limit(key, rule)
        except ValueError as exc:  # the dispatcher refused a rule (a newer grammar than ours, say)
            raise CliError(str(exc), EXIT_USAGE) from None
        rows = client.limits()
    if as_json:
        print(dump({"limits": rows}))
        return
    print_limits(rows)


def _changes(sets: list[str], removes: list[str]) -> dict[str, str | None]:
    from conveyor.dispatcher.limits import check_key, parse_declaration

    out: dict[str, str | None] = {}
    for text in sets:
        try:
            key, rule = parse_declaration(text)
        except ValueError as exc:
            raise CliError(f"--set: {exc}", EXIT_USAGE) from None
        out[key] = str(rule)
    for key in removes:
        try:
            check_key(key)
        except ValueError as exc:
            raise CliError(f"--remove: {exc}", EXIT_USAGE) from None
        if key in out:
            raise CliError(f"--set and --remove both name {key!r}", EXIT_USAGE)
        out[key] = None
    return out


def print_limits(rows: list[dict[str, Any]]) -> None:
    console = Console() if Console().is_terminal else Console(width=200)
    if not rows:
        console.print("no limit keys (declare them with `conveyor dispatcher --limit KEY=RULE` or "
                      "`conveyor limits --set KEY=RULE`)", style="dim")
        return
    table = Table(header_style="bold dim", box=None, pad_edge=False, padding=(0, 2, 0, 0))
    for col, justify in (("key", "left"), ("rule", "left"), ("tokens", "right"), ("running", "right"),
                         ("waiting", "right"), ("oldest wait", "right"), ("started", "right")):
        table.add_column(col, justify=justify, no_wrap=col == "key")  # type: ignore[arg-type]
    for r in rows:
        tokens = r.get("tokens")
        if r.get("template") is True:  # a template: its rule applies to each filled-in key below it
            tokens, rule = None, f"{r['rule']} each ({r.get('keys', 0):,} live)"
        else:
            rule = r["rule"]
        key = f"  {r['key']}" if isinstance(r.get("template"), str) else r["key"]  # a filled-in key: indented
        table.add_row(
            key, rule, "-" if tokens is None else f"{tokens:g}", str(r.get("running", 0)),
            f"{r.get('waiting', 0):,}", _wait(r.get("oldest_wait_s")), f"{r.get('starts', 0):,}",
        )
    console.print(table)


def _wait(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"

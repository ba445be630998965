"""The `conveyor` command line: run a dispatcher or workers, submit jobs, and look at them.

Every failure ends in one line on stderr (`error: ...`) and a non-zero exit (2 for usage); never a
traceback. This module only assembles the app, from the COMMANDS table below; each command lives in its
own module:

    run.py      dispatcher, worker, up
    witness.py  witness (the standby pair's third vote)
    jobs.py     submit, result, status, cancel
    limits.py   limits (rate and concurrency keys)
    observe.py  map, logs, jobs, top (and the status view)
    graph.py    graph (the jobs connected by dependencies)
    keys.py     keys init|add-worker|add-client|list|revoke
    cluster.py  cluster up|status|down
    schedule.py schedule add|list|show|preview|pause|resume|trigger|backfill|delete
    demo.py     demo
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 vendors click
    from typer._click import Command
    from typer._click import exceptions as click_exceptions
    from typer._click.globals import get_current_context as click_get_current_context
except ImportError:  # pragma: no cover
    from click import Command  # type: ignore[assignment]
    from click import exceptions as click_exceptions  # type: ignore[no-redef]
    from click import get_current_context as click_get_current_context  # type: ignore[no-redef]

from conveyor.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CliError, new_app
from conveyor.errors import ConveyorError

# The commands, in the order `conveyor --help` lists them: name -> "module:attribute" in conveyor/cli/.
# The attribute is a command function or a typer app (a group of subcommands). A module is imported only
# when its command runs (or for --help of the whole app), so `conveyor worker` loads no rich, no client
# and no dispatcher. A new command is one line here: "name": "module:attribute" (groups, typer apps, go
# last, as typer lists them after plain commands). A command registered the ordinary way on `app`
# (app.command()(fn)) still works; it is listed after these.
COMMANDS: dict[str, str] = {
    "dispatcher": "run:dispatcher",
    "worker": "run:worker",
    "up": "run:up",
    "witness": "witness:witness",
    "submit": "jobs:submit",
    "result": "jobs:result",
    "status": "jobs:status",
    "cancel": "jobs:cancel",
    "map": "observe:map_command",
    "logs": "observe:logs_command",
    "jobs": "observe:jobs_command",
    "top": "observe:top_command",
    "graph": "graph:graph_command",
    "limits": "limits:limits_command",
    "demo": "demo:demo",
    "cluster": "cluster:app",
    "keys": "keys:app",
    "schedule": "schedule:app",
}
CONTEXT_SETTINGS: dict[str, dict[str, Any]] = {"submit": {"ignore_unknown_options": True}}
# A command that also has subcommands: `conveyor dispatcher [OPTIONS]` runs it, `conveyor dispatcher
# promote ...` runs the subcommand (the command's own options, if any, come before the subcommand's name).
SUBCOMMANDS: dict[str, dict[str, str]] = {"dispatcher": {"promote": "promote:promote"}}


class _LazyCommands(MutableMapping[str, Command]):
    """The group's commands: names from COMMANDS at once, each click command built on first use."""

    def __init__(self, group: TyperGroup, eager: MutableMapping[str, Command], table: dict[str, str] | None = None):
        self._group = group
        self._table = COMMANDS if table is None else table
        self._built = dict(eager)  # commands registered the ordinary way (app.command()) are kept too

    def __getitem__(self, name: str) -> Command:
        if name not in self._built:
            if name not in self._table:
                raise KeyError(name)
            self._built[name] = self._build(name)
        return self._built[name]

    def _build(self, name: str) -> Command:
        module, _, attribute = self._table[name].partition(":")
        target = getattr(importlib.import_module(f"conveyor.cli.{module}"), attribute)
        # Registered on a scratch app exactly as app.command()/add_typer() would, then converted with the
        # settings of this group: the help and errors are those of eager registration.
        scratch = typer.Typer()
        mode = self._group.rich_markup_mode
        if isinstance(target, typer.Typer):
            scratch.add_typer(target, name=name)
            return typer.main.get_group_from_info(
                scratch.registered_groups[0], pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=mode, suggest_commands=self._group.suggest_commands,
            )
        scratch.command(name, context_settings=CONTEXT_SETTINGS.get(name))(target)
        command = typer.main.get_command_from_info(
            scratch.registered_commands[0], pretty_exceptions_short=app.pretty_exceptions_short,
            rich_markup_mode=mode,
        )
        if name not in SUBCOMMANDS:
            return command
        run = command.callback
        assert run is not None

        def run_unless_a_subcommand(**options: Any) -> Any:
            ctx = click_get_current_context()
            return None if ctx.invoked_subcommand is not None else run(**options)

        group = TyperGroup(name=name, params=command.params, help=command.help, callback=run_unless_a_subcommand,
                           invoke_without_command=True, rich_markup_mode=mode,
                           subcommand_metavar="[COMMAND [ARGS]...]")
        group.commands = _LazyCommands(group, {}, SUBCOMMANDS[name])
        return group

    def __setitem__(self, name: str, command: Command) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._built[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._table
        yield from (name for name in self._built if name not in self._table)

    def __len__(self) -> int:
        return len(self._table) + sum(name not in self._table for name in self._built)


class _LazyGroup(TyperGroup):
    def __init__(self, **attrs: Any):
        super().__init__(**attrs)
        self.commands = _LazyCommands(self, self.commands)


app = new_app("conveyor", "Conveyor: a distributed task runner for Python on ZeroMQ.", cls=_LazyGroup)


@app.callback()
def _root() -> None:
    # A callback makes typer build a group however few commands are registered eagerly (none here).
    pass


def main() -> None:
    guarded(lambda: app(standalone_mode=False))  # without standalone mode, typer.Exit(n) comes back as n


def guarded(run: Callable[[], Any]) -> None:
    """Run a command and exit: every failure as one line on stderr and its exit code, never a traceback."""
    try:
        code = run()
    except click_exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "usage: conveyor COMMAND --help", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except click_exceptions.UsageError as exc:
        command = exc.ctx.info_name if exc.ctx else None
        hint = f" (see `conveyor {command} --help`)" if command and "conveyor" not in command else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except ConveyorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    sys.exit(code if isinstance(code, int) else 0)

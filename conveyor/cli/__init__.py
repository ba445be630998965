"""The `conveyor` command line: run a dispatcher or workers, submit jobs, and look at them.

Every failure ends in one line on stderr (`error: ...`) and a non-zero exit (2 for usage); never a
traceback. This module only assembles the app; each command lives in its own module:

    run.py      dispatcher, worker, up
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

import sys

import typer

try:  # typer >= 0.29 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from conveyor.cli import demo, graph, jobs, observe, run
from conveyor.cli.cluster import app as cluster_app
from conveyor.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CliError, new_app
from conveyor.cli.keys import app as keys_app
from conveyor.cli.limits import limits_command
from conveyor.cli.schedule import app as schedule_app
from conveyor.errors import ConveyorError

app = new_app("conveyor", "Conveyor: a distributed task runner for Python on ZeroMQ.")

app.command()(run.dispatcher)
app.command()(run.worker)
app.command()(run.up)
app.command(context_settings={"ignore_unknown_options": True})(jobs.submit)
app.command()(jobs.result)
app.command()(jobs.status)
app.command()(jobs.cancel)
app.command("map")(observe.map_command)
app.command("logs")(observe.logs_command)
app.command("jobs")(observe.jobs_command)
app.command("top")(observe.top_command)
app.command("graph")(graph.graph_command)
app.command("limits")(limits_command)
app.add_typer(cluster_app, name="cluster")
app.add_typer(keys_app, name="keys")
app.add_typer(schedule_app, name="schedule")
app.command()(demo.demo)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # without standalone mode, typer.Exit(n) comes back as n
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

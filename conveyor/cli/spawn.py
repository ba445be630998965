"""`python -m conveyor.cli.spawn ROLE OPTIONS_JSON`: `conveyor dispatcher` or `conveyor worker`, without the parser.

A local cluster (`Client()` with no address, `conveyor up`) starts its dispatcher and workers so. The
options come from code, not a person, so they need no parsing, and parsing is what costs: typer converts
every option through pydantic, which adds about 13 MiB of RSS and 50 ms of CPU to each long-running
process. The functions run are the commands themselves (run.dispatcher, run.worker), with their defaults,
checks and one-line errors; OPTIONS_JSON holds their keyword arguments, e.g. {"bind": "tcp://...:0"}.
"""

from __future__ import annotations

import inspect
import json
import sys

from conveyor.cli import guarded
from conveyor.cli.common import EXIT_USAGE

ROLES = ("dispatcher", "worker")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ROLES:
        print(f"usage: python -m conveyor.cli.spawn {{{','.join(ROLES)}}} OPTIONS_JSON", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    from conveyor.cli import run

    command = getattr(run, argv[0])
    try:
        options = json.loads(argv[1])
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
        inspect.signature(command).bind(**options)  # unknown names: a usage error, not a TypeError
    except (ValueError, TypeError) as exc:
        print(f"error: bad OPTIONS_JSON for {argv[0]}: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    guarded(lambda: command(**options))


if __name__ == "__main__":
    main(sys.argv[1:])

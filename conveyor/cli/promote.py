"""`conveyor dispatcher promote`: make one dispatcher of a standby pair the active one (docs/standby.md)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from conveyor.cli.common import DispatcherOpt, JsonOpt, KeysOpt, address


def promote(
    dispatcher: DispatcherOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Even if its journal is behind the active's (those jobs may run again).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait until it is active.")] = 15.0,
    keys: KeysOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make this dispatcher of a standby pair the active one: the active yields once this one holds its journal.

    Fail-back is never automatic: this is how an operator moves the active role (after a failover, before upkeep)."""
    from conveyor.client.promote import promote as promote_dispatcher

    target = address(dispatcher)
    pair = promote_dispatcher(target, force=force, keys=keys, timeout_s=timeout)
    if json_out:
        print(json.dumps(pair))
    else:
        print(f"{target}: active ({pair.get('role')}) in epoch {pair.get('epoch')}")

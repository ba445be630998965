"""A call given on the command line (`module:function ARGS... --kwargs JSON`), read the same way by
`conveyor submit` and `conveyor schedule add`: each argument is JSON if it parses, else a string."""

from __future__ import annotations

import json
from typing import Any

from conveyor.cli.common import EXIT_USAGE, CliError


def parse_function(function: str) -> str:
    if ":" not in function or function.startswith(":") or function.endswith(":"):
        raise CliError(f"bad function {function!r}: expected module:function", EXIT_USAGE)
    return function


def parse_args(args: list[str] | None) -> list[Any]:
    values: list[Any] = []
    for raw in args or []:
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if raw.startswith("-") and isinstance(value, str):  # -1 is an argument; --wiat is a typo
            raise CliError(f"no such option: {raw} (pass a string starting with '-' as JSON: '\"{raw}\"')", EXIT_USAGE)
        values.append(value)
    return values


def parse_kwargs(kwargs: str | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    try:
        values = json.loads(kwargs)
    except ValueError as exc:
        raise CliError(f"--kwargs is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(values, dict):
        raise CliError("--kwargs must be a JSON object", EXIT_USAGE)
    return values

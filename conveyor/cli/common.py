"""What every `conveyor` command shares: the typer app set-up, the common options, one-line errors
with their exit codes, and the connection to the dispatcher.

Every command module (run, jobs, observe, keys, cluster, demo) imports from here and nothing from
its siblings; `conveyor/cli/__init__.py` assembles the app from them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from conveyor.security.keys import ENV_KEYS

if TYPE_CHECKING:
    from conveyor.client import Client

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ENV_DISPATCHER = "CONVEYOR_DISPATCHER"

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and the thing asked for did not happen (a job failed, a host is down)
EXIT_USAGE = 2  # bad input: an option, an argument, a file
EXIT_INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    """An error to print as one line (`error: ...`), with this exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def new_app(name: str, help_text: str, cls: type[TyperGroup] | None = None) -> typer.Typer:
    """A typer app set up as every `conveyor` app is: help when run without a command, no shell-completion
    options, and no rich tracebacks (cli.main prints every error as one line)."""
    return typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        cls=cls,
    )


def keys_option(help_text: str) -> Any:
    """`--keys DIR`, also read from CONVEYOR_KEYS; each help text names the variable itself."""
    return typer.Option("--keys", envvar=ENV_KEYS, show_envvar=False, help=help_text)


DispatcherOpt = Annotated[
    str | None,
    typer.Option("--dispatcher", "-d", help=f"Dispatcher address [env {ENV_DISPATCHER}; default {DEFAULT_ADDRESS}]"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
KeysOpt = Annotated[
    str | None,
    keys_option("Key directory from `conveyor keys init`: CurveZMQ (docs/security.md) [env CONVEYOR_KEYS]"),
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", envvar="CONVEYOR_INSECURE", show_envvar=False,
                 help="Allow a non-loopback address without keys: no authentication, no encryption."),
]
MaxMessageOpt = Annotated[
    int, typer.Option("--max-message-mib", min=1, help="Largest frame a socket accepts (ZMQ_MAXMSGSIZE), in MiB.")
]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
LogFormatOpt = Annotated[str, typer.Option("--log-format", help="text, or json (one object per line).")]


def address(option: str | None) -> str:
    """The dispatcher's address: the option, else CONVEYOR_DISPATCHER, else the default."""
    return option or os.environ.get(ENV_DISPATCHER) or DEFAULT_ADDRESS


def connect(dispatcher: str | None, keys: str | None = None) -> Client:
    """A client of the dispatcher, failing fast (CONVEYOR_CONNECT_TIMEOUT seconds, default 5)."""
    from conveyor.client import Client

    timeout = float(os.environ.get("CONVEYOR_CONNECT_TIMEOUT", "5"))
    # Once connected, a dispatcher restarting on its journal (a loaded machine: many seconds) is waited for.
    return Client(address(dispatcher), connect_timeout=timeout, reconnect_timeout=max(timeout, 30.0), keys=keys)


def setup_logging(level: str, fmt: str = "text") -> None:
    from conveyor.cli.logfmt import setup_logging as setup

    try:
        setup(level, fmt)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def check_bind(bind: str, keys: str | None, insecure: bool, warn: bool = True) -> None:
    """Refuse a non-loopback address without keys (one line); with --insecure, warn at every start."""
    from conveyor.errors import InsecureBindError
    from conveyor.security.bind import check_bind as check
    from conveyor.security.bind import insecure_warning

    try:
        check(bind, keys is not None, insecure)
    except InsecureBindError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if insecure and warn:
        print(insecure_warning(bind) if keys is None else "warning: --insecure has no effect: keys are in use",
              file=sys.stderr, flush=True)


def check_mode(mode: str) -> None:
    from conveyor.protocol.commands import MODE_NAMES

    if mode not in MODE_NAMES:
        raise CliError(f"unknown mode {mode!r}: choose one of {', '.join(MODE_NAMES)}", EXIT_USAGE)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def dump(obj: Any) -> str:
    """One line of JSON; bytes as text, sets as lists, anything else as its repr."""
    return json.dumps(obj, default=_jsonable)

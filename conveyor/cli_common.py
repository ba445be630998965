"""What the `conveyor` command-line apps share: how each typer app is set up, and the `--keys` option.

The main app (cli.py) and its sub-apps (`conveyor keys`: keys_cli.py, `conveyor cluster`:
cluster/commands.py) import these from here rather than from cli.py, which imports the sub-apps
itself (a cycle).
"""

from __future__ import annotations

from typing import Any

import typer

from conveyor.keys import ENV_KEYS


def new_app(name: str, help_text: str) -> typer.Typer:
    """A typer app set up as every `conveyor` app is: help when run without a command, no shell-completion
    options, and no rich tracebacks (cli.main prints every error as one line)."""
    return typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )


def keys_option(help_text: str) -> Any:
    """`--keys DIR`, also read from CONVEYOR_KEYS; each help text names the variable itself."""
    return typer.Option("--keys", envvar=ENV_KEYS, show_envvar=False, help=help_text)

"""Tasks that ship with Conveyor, callable by reference from any client."""

from __future__ import annotations

import subprocess
from typing import Any


def shell(command: str, timeout: float | None = None) -> dict[str, Any]:
    """Run a shell command on the worker; return its exit code, stdout and stderr."""
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout, check=False)
    return {"exit_code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

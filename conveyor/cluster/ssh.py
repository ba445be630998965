"""Where a command runs, and running a script there: this machine, or a host reached with `ssh`.

Everything goes through the system `ssh` client, so the user's keys, agent and ~/.ssh/config apply
(with BatchMode=yes: never a password prompt, and a ConnectTimeout). A script is sent to `sh -s` on
the host and ends by printing one line that starts with MARK: what it did, and its details.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

MARK = "@@conveyor"  # prefix of the one line a remote script reports its outcome with


@dataclass
class Target:
    """Where a command runs: this machine (address None) or a host reached with `ssh`."""

    address: str | None = None
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    ssh_options: list[str] = field(default_factory=list)
    connect_timeout: float = 10.0

    @property
    def is_local(self) -> bool:
        return self.address is None

    def label(self) -> str:
        if self.address is None:
            return "local"
        text = f"{self.user}@{self.address}" if self.user else self.address
        return f"{text}:{self.port}" if self.port else text

    def command(self) -> list[str]:
        """The command line that runs a script read from stdin on this target."""
        if self.address is None:
            return ["sh", "-s"]
        cmd = [
            "ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR",
        ]
        if self.port:
            cmd += ["-p", str(self.port)]
        if self.user:
            cmd += ["-l", self.user]
        if self.identity_file:
            cmd += ["-i", os.path.expanduser(self.identity_file)]
        return [*cmd, *self.ssh_options, "--", self.address, "sh -s"]

    def run(self, script: str, timeout: float) -> tuple[str, str]:
        """Run `script` here: (state, details) from the line it reports with, or why there is no such line.

        Without a report the state is "unreachable" (no answer in time, or ssh could not connect) or
        "failed", and the details are the last line of stderr.
        """
        cmd = self.command()
        try:
            proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return "unreachable", f"no answer within {timeout:g} s"
        except FileNotFoundError:
            return "failed", f"{cmd[0]} not found"
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(MARK + " "):
                state, _, rest = line[len(MARK) + 1:].partition(" ")
                return state, rest
        err = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        reason = err[-1] if err else f"exit code {proc.returncode}"
        if not self.is_local and proc.returncode == 255:  # ssh's own failure: it never got to run the script
            return "unreachable", reason
        return "failed", reason

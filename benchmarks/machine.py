"""What machine and software a result was measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def describe_machine() -> dict[str, Any]:
    import msgpack
    import zmq

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_usable": _usable_cpus(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "python_build": " ".join(platform.python_build()),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(str(p) for p in msgpack.version),
    }
    try:
        import psutil

        info["cpu_physical"] = psutil.cpu_count(logical=False)
        info["memory_bytes"] = psutil.virtual_memory().total
    except Exception:  # psutil is a Conveyor dependency, but the description must never fail
        pass
    info["load_average"] = load_average()
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_source(repo_root: str) -> dict[str, Any]:
    """Which Conveyor was measured: the git commit, and whether conveyor/ had uncommitted changes."""
    import conveyor

    info: dict[str, Any] = {
        "conveyor_version": conveyor.__version__,
        "conveyor_path": os.path.dirname(conveyor.__file__),
    }

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    info["git_commit"] = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--", "conveyor")
    info["conveyor_dirty"] = None if changed is None else bool(changed)
    if changed:
        info["conveyor_changes"] = changed.splitlines()[:50]
    return info

"""The worker: a pure state machine (state.py), the socket loop around it (server.py), and one executor
per kind of concurrency (modes/). `Worker` and `run_worker` load on first use, so that what runs in a
processes-mode child (modes/processes/child.py) imports no sockets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.worker.server import Worker, run_worker

__all__ = ["Worker", "run_worker"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from conveyor.worker import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

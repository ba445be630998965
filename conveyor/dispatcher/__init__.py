"""The dispatcher, by role:

    scheduler.py, model.py   the scheduling state machine and its records: no I/O (start here)
    server.py                the socket loop around it: one ROUTER, one routing table of every command
    journal.py               the durable journal (SQLite), written by its own thread
    access.py                who may connect and send what (CurveZMQ ZAP, roles, quarantine)
    observe/                 output, progress, statistics, the dashboard and the metrics

`Dispatcher` is imported on first use, so that `from conveyor.dispatcher.scheduler import Scheduler`
(tests, benchmarks) loads no sockets and no SQLite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.dispatcher.server import Dispatcher

__all__ = ["Dispatcher"]


def __getattr__(name: str) -> Any:
    if name == "Dispatcher":
        from conveyor.dispatcher.server import Dispatcher

        return Dispatcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

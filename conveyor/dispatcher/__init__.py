"""The dispatcher: scheduling state (scheduler.py, no I/O) and its socket loop (server.py)."""

from conveyor.dispatcher.scheduler import Scheduler, TaskOptions
from conveyor.dispatcher.server import Dispatcher

__all__ = ["Dispatcher", "Scheduler", "TaskOptions"]

"""Execution modes, by name. A new mode is a Mode subclass added to MODES; nothing else changes."""

from conveyor.worker.modes.asyncio_mode import AsyncioMode
from conveyor.worker.modes.base import Mode
from conveyor.worker.modes.processes import ProcessesMode
from conveyor.worker.modes.threads import ThreadsMode

MODES: dict[str, type[Mode]] = {m.name: m for m in (ThreadsMode, ProcessesMode, AsyncioMode)}

__all__ = ["MODES", "AsyncioMode", "Mode", "ProcessesMode", "ThreadsMode"]

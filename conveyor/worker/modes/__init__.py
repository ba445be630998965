"""Execution modes, by name. A new mode is one module with a Mode subclass (base.py) and one line here."""

from conveyor.worker.modes.asyncio_mode import AsyncioMode
from conveyor.worker.modes.base import Mode, ModeSettings, Report
from conveyor.worker.modes.interpreters import InterpretersMode
from conveyor.worker.modes.processes import ProcessesMode
from conveyor.worker.modes.threads import ThreadsMode

MODES: dict[str, type[Mode]] = {m.name: m for m in (ThreadsMode, ProcessesMode, AsyncioMode, InterpretersMode)}

__all__ = ["MODES", "AsyncioMode", "InterpretersMode", "Mode", "ModeSettings", "ProcessesMode", "Report", "ThreadsMode"]

"""Execution modes, by name. A new mode is one module with a Mode subclass (base.py) and one line in _WHERE.

A mode's module is imported when the mode is first looked up (MODES["processes"]) or its class named
(from conveyor.worker.modes import ThreadsMode): a worker loads only the mode it runs, and a processes-mode
child (whose module lives under this package) loads none of the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from conveyor.worker.modes.base import Mode, ModeSettings, Report

if TYPE_CHECKING:
    from conveyor.worker.modes.asyncio_mode import AsyncioMode
    from conveyor.worker.modes.interpreters import InterpretersMode
    from conveyor.worker.modes.processes import ProcessesMode
    from conveyor.worker.modes.threads import ThreadsMode

# mode name -> (module under this package, class); the order is the one error messages list.
_WHERE: dict[str, tuple[str, str]] = {
    "threads": ("threads", "ThreadsMode"),
    "processes": ("processes", "ProcessesMode"),
    "asyncio": ("asyncio_mode", "AsyncioMode"),
    "interpreters": ("interpreters", "InterpretersMode"),
}
_CLASSES = {cls: (name, module) for name, (module, cls) in _WHERE.items()}


def _load(module: str, cls: str) -> type[Mode]:
    mode: type[Mode] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    return mode


class _Modes(Mapping[str, type[Mode]]):
    """The mode classes by name, each imported on first lookup."""

    def __getitem__(self, name: str) -> type[Mode]:
        if name not in _WHERE:
            raise KeyError(name)
        return _load(*_WHERE[name])

    def __iter__(self) -> Iterator[str]:
        return iter(_WHERE)

    def __len__(self) -> int:
        return len(_WHERE)


MODES: Mapping[str, type[Mode]] = _Modes()


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        _, module = _CLASSES[name]
        return _load(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODES", "AsyncioMode", "InterpretersMode", "Mode", "ModeSettings", "ProcessesMode", "Report", "ThreadsMode"]

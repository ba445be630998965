"""The body of every command, typed: one definition used by the dispatcher, the worker and the client."""

from __future__ import annotations

MODE_NAMES = ("threads", "processes", "asyncio")  # worker execution modes; tasks are routed on them

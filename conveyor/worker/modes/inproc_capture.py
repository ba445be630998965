"""Output capture for modes that run many tasks in the worker process (threads, asyncio).

Many tasks share one process, so while such a mode runs, `sys.stdout` and `sys.stderr` are replaced by
proxies that look the current task up in a context variable (`conveyor.task.current`) and append to that
task's buffer in `TaskReports`; writes outside any task go to the real stream. A handler on the root
logger does the same for log records. Threads a task starts itself do not inherit the context, so their
output goes to the worker's own streams. `conveyor.progress` finds the current task the same way.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from conveyor import task
from conveyor.worker.execution import Key
from conveyor.worker.reports import LOG_FORMAT, TaskReports


class TaskContext:
    """The current task of a thread or asyncio task (conveyor.task.current): where its reports go."""

    __slots__ = ("closed", "key", "reports")

    def __init__(self, key: Key, reports: TaskReports):
        self.key = key
        self.reports = reports
        self.closed = False

    def progress(self, fraction: float | None, message: str | None) -> None:
        if not self.closed:
            self.reports.progress(self.key, fraction, message)


def _current_context() -> TaskContext | None:
    ctx = task.current.get()
    return ctx if isinstance(ctx, TaskContext) else None


def enter(reports: TaskReports, key: Key) -> TaskContext:
    """From here on, in this thread (or asyncio task), output and progress belong to this task."""
    ctx = TaskContext(key, reports)
    task.current.set(ctx)
    return ctx


def leave(ctx: TaskContext) -> None:
    ctx.closed = True  # a thread or coroutine the task left behind writes to the worker's streams again
    task.current.set(None)


class _StreamProxy:
    """Stands in for sys.stdout / sys.stderr: a task's writes go to its buffer, anything else through."""

    def __init__(self, stream: str, original: Any):
        self._stream = stream
        self._original = original

    def write(self, text: str) -> int:
        ctx = _current_context()
        if ctx is None or ctx.closed:
            return int(self._original.write(text))
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        ctx.reports.output(ctx.key, self._stream, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        ctx = _current_context()
        if ctx is None or ctx.closed:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, buffer...
        return getattr(self._original, name)


class _TaskLogHandler(logging.Handler):
    """Log records emitted while a task is current become that task's `log` stream."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = _current_context()
        if ctx is None or ctx.closed:
            return
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        ctx.reports.output(ctx.key, "log", text)


_install_lock = threading.Lock()
_installs = 0
_proxies: tuple[_StreamProxy, _StreamProxy] | None = None
_log_handler: _TaskLogHandler | None = None


def install() -> None:
    """Route task output by context (refcounted: several workers may share a process, as in tests)."""
    global _installs, _proxies, _log_handler
    with _install_lock:
        _installs += 1
        if _installs > 1:
            return
        out, err = _StreamProxy("stdout", sys.stdout), _StreamProxy("stderr", sys.stderr)
        sys.stdout, sys.stderr = out, err
        _proxies = (out, err)
        handler = _TaskLogHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        _log_handler = handler


def uninstall() -> None:
    global _installs, _proxies, _log_handler
    with _install_lock:
        if _installs == 0:
            return
        _installs -= 1
        if _installs:
            return
        if _proxies is not None:
            out, err = _proxies
            if sys.stdout is out:
                sys.stdout = out._original
            if sys.stderr is err:
                sys.stderr = err._original
            _proxies = None
        if _log_handler is not None:
            logging.getLogger().removeHandler(_log_handler)
            _log_handler = None

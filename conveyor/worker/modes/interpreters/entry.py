"""The code that runs inside each subinterpreter of interpreters mode (loaded by `BOOTSTRAP`, never by the worker).

Everything crosses the boundary as bytes: a task comes in as one pickle of (job id, attempt, retry_on,
call frames) and its outcome goes out as one pickle of (ok, info, frames), so no object is shared with
the worker's interpreter. Output and progress go back while the task runs, as pickles on the mode's
cross-interpreter queue: (job id, attempt, stream, text) or (job id, attempt, "progress", fraction, message).
"""

from __future__ import annotations

import logging
import pickle
import sys
from typing import Any

from conveyor import task as task_api
from conveyor.worker.execution import Task, run_sync
from conveyor.worker.reports import LOG_FORMAT

# Run first in every new subinterpreter, with `events` (a cross-interpreter queue) in its __main__.
# msgspec (imported by conveyor.protocol's and conveyor.worker's package __init__) refuses subinterpreters,
# so those packages are entered as bare packages: only the pure-Python modules a task needs are loaded.
BOOTSTRAP = """
import importlib.util, sys, types
import conveyor.errors
for _name in ("conveyor.protocol", "conveyor.worker", "conveyor.worker.modes", "conveyor.worker.modes.interpreters"):
    _spec = importlib.util.find_spec(_name)
    _pkg = types.ModuleType(_name)
    _pkg.__path__ = list(_spec.submodule_search_locations)
    sys.modules[_name] = _pkg
sys.modules["conveyor.protocol"].ProtocolError = conveyor.errors.ProtocolError
from conveyor.worker.modes.interpreters import entry as _entry
_entry.install(events, capture)
"""

_events: Any = None  # the mode's queue of output and progress
_capture = True
_current: tuple[str, int] | None = None  # the task this interpreter runs (one at a time)


def _send(*event: Any) -> None:
    if _events is not None:
        _events.put(pickle.dumps(event))


class _Stream:
    """sys.stdout / sys.stderr of the subinterpreter: a task's writes go back to the worker as events."""

    def __init__(self, name: str, original: Any):
        self._name = name
        self._original = original

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if _current is None:
            return int(self._original.write(text))
        _send(_current[0], _current[1], self._name, text)
        return len(text)

    def flush(self) -> None:
        if _current is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class _LogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if _current is None:
            return
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        _send(_current[0], _current[1], "log", text)


class _Reporter:
    """conveyor.progress() inside the subinterpreter."""

    def progress(self, fraction: float | None, message: str | None) -> None:
        if _current is not None:
            _send(_current[0], _current[1], "progress", fraction, message)


def install(events: Any, capture: bool) -> None:
    global _events, _capture
    _events, _capture = events, capture
    task_api.process_reporter = _Reporter()
    task_api.no_client = (
        "conveyor.current_client() is not available in interpreters mode: a client needs pyzmq and msgspec, "
        "which refuse subinterpreters; run tasks that submit children in threads or processes mode"
    )
    if capture:
        sys.stdout = _Stream("stdout", sys.stdout)  # type: ignore[assignment,unused-ignore]
        sys.stderr = _Stream("stderr", sys.stderr)  # type: ignore[assignment,unused-ignore]
        handler = _LogHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)


def run(blob: bytes) -> bytes:
    """Run one task given as a pickle; return its outcome as a pickle. Called through Interpreter.call."""
    global _current
    job_id, attempt, timeout, retry_on, frames = pickle.loads(blob)
    task = Task(job_id, attempt, timeout, tuple(retry_on), list(frames))
    _current = task.key
    try:
        outcome = run_sync(task)
    finally:
        _current = None
    return pickle.dumps((outcome.ok, outcome.info, [bytes(f) for f in outcome.frames]))


def interpreter_id() -> int:
    """This subinterpreter's id (for tests and the demo: which interpreter ran a task)."""
    try:
        from concurrent import interpreters as api  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        from backports import interpreters as api  # type: ignore[import-not-found,no-redef,unused-ignore]
    return int(api.get_current().id)

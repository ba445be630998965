"""How a task's failure travels: a plain info map everyone can read, plus the pickled exception.

info = {"kind": str, "type": "module.QualName", "message": str, "traceback": str}
kind is one of ERROR_KINDS. The pickled exception (one frame, when it pickles) lets a Python
client re-raise the same type; the CLI and the dispatcher only read the info map.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import traceback
from types import TracebackType
from typing import Any

from conveyor import errors

EXCEPTION = "exception"  # the task raised
TIMEOUT = "timeout"  # the task ran past its timeout
CRASHED = "crashed"  # the process running it died
LOST = "lost"  # the worker holding it went silent
CANCELLED = "cancelled"
NOT_FOUND = "not_found"  # the function could not be imported
REFUSED = "refused"  # the dispatcher could not make the job durable (its journal's disk is full): never ran
REJECTED = "rejected"  # the dispatcher refused the submission itself (a bad option, an unknown limit key)
EXPIRED = "expired"  # not started by its expiry time
DEPENDENCY_FAILED = "dependency_failed"  # a parent failed for good: info has root, root_fn, root_error
DEPENDENCY_CANCELLED = "dependency_cancelled"  # a parent was cancelled or expired: info has root
UNKNOWN_DEPENDENCY = "unknown_dependency"  # a rejection: a parent the dispatcher does not know
ERROR_KINDS = (
    EXCEPTION, TIMEOUT, CRASHED, LOST, CANCELLED, NOT_FOUND, REFUSED, REJECTED, EXPIRED, DEPENDENCY_FAILED,
    DEPENDENCY_CANCELLED, UNKNOWN_DEPENDENCY,
)
# Infrastructure failures: retried automatically (up to the limit) whatever the task's retry_on says.
INFRASTRUCTURE_KINDS = frozenset({CRASHED, LOST})

_KIND_TYPES: dict[str, type[BaseException]] = {
    TIMEOUT: errors.TaskTimeout,
    CRASHED: errors.WorkerCrashed,
    LOST: errors.WorkerLost,
    CANCELLED: errors.JobCancelled,
    NOT_FOUND: errors.FunctionNotFound,
    REFUSED: errors.JournalFull,
    EXPIRED: errors.JobExpired,
}


def type_name(exc_type: type[BaseException]) -> str:
    module = exc_type.__module__
    return exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"


def error_info(kind: str, type_: str, message: str, tb: str = "") -> dict[str, Any]:
    return {"kind": kind, "type": type_, "message": message, "traceback": tb}


def _origin(module: str) -> str:
    """A module's file, found without importing it (a processes-mode child never loads asyncio)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    return spec.origin


# Frames from these directories above the task's own code are machinery, not the user's story.
_MACHINERY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path))
    for path in (os.path.dirname(__file__), *(_origin(m) for m in ("asyncio", "concurrent.futures")))
)


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """Skip the worker's own frames at the top of a task's traceback: users want their code."""
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_MACHINERY_DIRS) and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def encode_exception(exc: BaseException, kind: str = EXCEPTION) -> tuple[dict[str, Any], list[bytes]]:
    tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    info = error_info(kind, type_name(type(exc)), str(exc), tb)
    try:
        import cloudpickle  # (on first use: a dispatcher never pickles)

        frames = [cloudpickle.dumps(exc.with_traceback(None), protocol=5)]
    except Exception:
        frames = []
    return info, frames


def rebuild_exception(info: dict[str, Any], frames: list[Any]) -> BaseException:
    """The exception a client raises for a failed job, with the remote traceback as its cause."""
    kind = info.get("kind", EXCEPTION)
    message = str(info.get("message", ""))
    tb = str(info.get("traceback", ""))
    exc: BaseException
    if kind == REJECTED:
        exc = errors.JobRejected(str(info.get("type", "ValueError")), message)
    elif kind == UNKNOWN_DEPENDENCY:
        exc = errors.UnknownDependency("UnknownDependency", message)
    elif kind == DEPENDENCY_FAILED:
        exc = errors.DependencyFailed(message, str(info.get("root", "")), str(info.get("root_fn", "")))
        root_error = info.get("root_error")
        if isinstance(root_error, dict):  # the root's own error, as its own future raises it (its frames)
            exc.__cause__ = rebuild_exception(root_error, frames)
            return exc
    elif kind == DEPENDENCY_CANCELLED:
        exc = errors.DependencyCancelled(message, str(info.get("root", "")))
    elif kind in _KIND_TYPES:
        exc = _KIND_TYPES[kind](message)
    else:
        exc = errors.RemoteError(str(info.get("type", "Exception")), message, tb)
        if frames:
            try:
                loaded = pickle.loads(bytes(frames[0]))
            except Exception:
                loaded = None
            if isinstance(loaded, BaseException):
                exc = loaded
    if tb:
        exc.__cause__ = errors.RemoteTraceback(tb)
    return exc


def describe(info: dict[str, Any]) -> str:
    """One line for humans: 'ValueError: bad input'."""
    return f"{info.get('type', 'Error')}: {info.get('message', '')}"

"""Running one task: decode the call, run it, encode the outcome. Shared by every mode executor."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from conveyor.errors import FunctionNotFound
from conveyor.protocol import ProtocolError
from conveyor.protocol import failures as perr
from conveyor.protocol.joined import unpack_joined
from conveyor.protocol.limits import oversized
from conveyor.protocol.payload import Call, decode_call, decode_value, encode_value, unpack_task
from conveyor.task import Failed, running

Key: TypeAlias = tuple[str, int]  # (job id, attempt): a job can come back to the same worker under a newer attempt


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class Task:
    """One assignment from the dispatcher."""

    job_id: str
    attempt: int
    timeout: float | None
    retry_on: tuple[str, ...]
    frames: list[Any]
    key: Key = field(init=False)  # (job id, attempt): what every table of the worker is keyed by

    def __post_init__(self) -> None:
        self.key = (self.job_id, self.attempt)


@dataclass(slots=True)
class Outcome:
    """How one attempt ended: `info` is {duration} on success, else an error record (protocol §9)."""

    job_id: str
    attempt: int
    ok: bool
    info: dict[str, Any]
    frames: list[Any] = field(default_factory=list)


def is_retryable(exc: BaseException, retry_on: tuple[str, ...]) -> bool:
    """True if exc is an instance of a type named in retry_on (by name or qualified name)."""
    if not retry_on:
        return False
    return any(cls.__name__ in retry_on or perr.type_name(cls) in retry_on for cls in type(exc).__mro__)


def failure(task: Task, exc: BaseException, kind: str = perr.EXCEPTION) -> Outcome:
    info, frames = perr.encode_exception(exc, kind)
    info["retryable"] = is_retryable(exc, task.retry_on)
    return Outcome(task.job_id, task.attempt, False, info, frames)


def infra_failure(task: Task, kind: str, type_: str, message: str) -> Outcome:
    info = perr.error_info(kind, type_, message)
    return Outcome(task.job_id, task.attempt, False, info, [])


def success(task: Task, value: Any, started: float) -> Outcome:
    try:
        frames = encode_value(value)
    except Exception as exc:  # an unpicklable result is the task's failure, not the worker's
        return failure(task, TypeError(f"cannot serialize the result: {exc}"))
    return Outcome(task.job_id, task.attempt, True, {"duration": time.perf_counter() - started}, frames)


def load(task: Task) -> Call | Outcome:
    """Decode the task's call, or the outcome explaining why it cannot run."""
    try:
        packed = unpack_task(task.frames) or unpack_joined(task.frames)
        if packed is None:
            return decode_call(task.frames)
        return decode_call(packed[0], packed[1].values(_parent_value))
    except FunctionNotFound as exc:
        out = failure(task, exc, perr.NOT_FOUND)
        out.info["traceback"] = ""
        return out
    except ProtocolError as exc:
        return failure(task, exc)
    except Exception as exc:  # unpickling a function or arguments raised (missing module, ...)
        return failure(task, exc)


def _parent_value(job_id: str, state: str, error: dict[str, Any] | None, frames: list[Any]) -> Any:
    """What the call receives for a parent that did not succeed (allow_failure): Failed(its error)."""
    if state == "succeeded":  # not sent as one of these; decoded all the same
        return decode_value(frames)
    if state == "unknown":  # only after a dispatcher restart that lost it: nothing to pass
        raise RuntimeError(f"a parent's result is gone: {(error or {}).get('message', '')}")
    return Failed(perr.rebuild_exception(error or {}, frames), job_id, state)


def run_sync(task: Task) -> Outcome:
    """Run a task to completion in the calling thread (threads mode, process children)."""
    token = running.set((task.job_id, task.attempt))  # conveyor.current_job()
    try:
        return _run_sync(task)
    finally:
        running.reset(token)


def _run_sync(task: Task) -> Outcome:
    call = load(task)
    if isinstance(call, Outcome):
        return call
    started = time.perf_counter()
    try:
        if call.chunk:
            value: Any = [_call_sync(call.fn, a, k) for a, k in call.args]
        else:
            value = _call_sync(call.fn, call.args, call.kwargs)
    except (Exception, SystemExit) as exc:  # sys.exit() in a task fails the task, not the worker
        return failure(task, exc)
    return success(task, value, started)


def _call_sync(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):  # a coroutine function outside asyncio mode: run it to completion
        import asyncio  # here: a processes-mode child loads asyncio only for such a task

        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def run_async(task: Task) -> Outcome:
    """Run a task on the current event loop (asyncio mode).

    Coroutine functions are awaited here, so thousands can wait at once on one thread. A plain
    function would block every other task on the loop, so it runs in the loop's default thread pool
    (asyncio.to_thread copies the context: current_job() works there too).
    """
    token = running.set((task.job_id, task.attempt))  # this asyncio task's own context
    try:
        return await _run_async(task)
    finally:
        running.reset(token)


async def _run_async(task: Task) -> Outcome:
    import asyncio

    call = load(task)
    if isinstance(call, Outcome):
        return call
    started = time.perf_counter()
    try:
        if call.chunk:
            # the calls of a chunk wait together, as separate tasks would
            value: Any = list(await asyncio.gather(*(_call_async(call.fn, a, k) for a, k in call.args)))
        else:
            value = await _call_async(call.fn, call.args, call.kwargs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return failure(task, exc)
    return success(task, value, started)


async def _call_async(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import asyncio

    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result


def fit_outcome(outcome: Outcome, limit: int) -> Outcome:
    """A worker's Outcome whose frames fit the limit: itself, or a failure saying the result is too large."""
    n = oversized(outcome.frames, limit) if outcome.frames else None
    if n is None:
        return outcome
    message = (
        f"the result has a frame of {n} bytes, over the {limit}-byte max_message_size "
        "(raise it on the dispatcher, workers and clients alike)"
    )
    return Outcome(outcome.job_id, outcome.attempt, False, perr.error_info(perr.EXCEPTION, "ValueError", message))

"""Checks of peer input at the dispatcher's edge, before anything reaches the scheduler or is stored.

A decoded msgpack body can hold anything: infinities where counts go, ints beyond 64 bits, strings
where maps go, lists nested a thousand deep. Whatever the dispatcher keeps and later re-encodes
(an outcome's info map, a job's options, a worker's attributes) must be plain and shallow, or a
later send or journal write would fail far from the message that caused it. Each function raises
ProtocolError (the message is malformed, dropped and counted) or returns the value with its types
checked; they are cheap on the well-formed input the reference peers send.
"""

from __future__ import annotations

from typing import Any

from conveyor.protocol import ProtocolError

INT64 = (-(2**63), 2**63 - 1)
MAX_ID = 1024  # characters of a job id, a name, a host or a tag
MAX_DEPTH = 6  # nesting of an info map or options
_SCALARS = frozenset({str, float, bool, bytes, type(None)})  # exact types, as msgpack decodes them
_INT_LO, _INT_HI = -(2**63), 2**64 - 1  # what msgpack can encode again


def as_int(value: Any, what: str, lo: int = INT64[0], hi: int = INT64[1]) -> int:
    if type(value) is int and lo <= value <= hi:
        return value
    if type(value) is bool:
        return int(value)
    raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}]")


def as_str(value: Any, what: str, max_len: int = MAX_ID) -> str:
    if type(value) is str and len(value) <= max_len:
        return value
    raise ProtocolError(f"{what} must be a string of at most {max_len} characters")


def plain(value: Any, what: str, depth: int = MAX_DEPTH) -> Any:
    """value, if it is msgpack scalars, lists and str-keyed maps nested at most `depth` deep."""
    t = type(value)
    if t in _SCALARS or (t is int and _INT_LO <= value <= _INT_HI):
        return value
    if t is int:
        raise ProtocolError(f"{what}: integer out of range")
    if depth <= 0:
        raise ProtocolError(f"{what} is nested too deep")
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise ProtocolError(f"{what} must have string keys")
            tv = type(v)
            if not (tv in _SCALARS or (tv is int and _INT_LO <= v <= _INT_HI)):
                plain(v, what, depth - 1)
        return value
    if t is list:
        for v in value:
            tv = type(v)
            if not (tv in _SCALARS or (tv is int and _INT_LO <= v <= _INT_HI)):
                plain(v, what, depth - 1)
        return value
    raise ProtocolError(f"{what} holds an unsupported value")


def outcome_info(value: Any) -> dict[str, Any]:
    """The info map of a RESULTS entry: {duration} or an error record (docs/protocol.md §9)."""
    if type(value) is not dict:
        raise ProtocolError("outcome info must be a map")
    plain(value, "outcome info")
    for key in ("kind", "type", "message", "traceback"):
        if key in value and type(value[key]) is not str:
            raise ProtocolError(f"outcome info {key!r} must be a string")
    return value


def task_options(value: Any) -> Any:
    """SUBMIT options, as far as the dispatcher stores them (TaskOptions checks each known key)."""
    if value is not None and type(value) is not dict:
        raise ValueError("task options must be a map")
    try:
        return plain(value, "task options", depth=3)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None  # rejects this entry only


def count(value: Any) -> int:
    return as_int(value, "a frame count", 0, 2**31)


def submit_entries(body: Any) -> list[Any]:
    """SUBMIT entries [job_id, options, n_frames]: the id a string, the count a small integer."""
    if type(body) is not list:
        raise ProtocolError("SUBMIT body must be an array")
    for entry in body:
        if type(entry) is not list or len(entry) < 3:
            raise ProtocolError("SUBMIT entry must be [job_id, options, n_frames]")
        as_str(entry[0], "job id")
        count(entry[2])
    return body


def results_entries(body: Any) -> list[Any]:
    """RESULTS entries [job_id, attempt, ok, info, n_frames], checked before any is applied."""
    if type(body) is not list:
        raise ProtocolError("RESULTS body must be an array")
    for entry in body:
        if type(entry) is not list or len(entry) < 5:
            raise ProtocolError("RESULTS entry must be [job_id, attempt, ok, info, n_frames]")
        as_str(entry[0], "job id")
        as_int(entry[1], "attempt")
        outcome_info(entry[3])
        count(entry[4])
    return body


def ready_body(body: Any) -> dict[str, Any]:
    """A READY map with every field the dispatcher keeps of the worker checked (docs/protocol.md §5)."""
    if type(body) is not dict:
        raise ProtocolError("READY body must be a map")
    for key in ("name", "host", "mode"):
        as_str(body.get(key), key)
    as_str(body.get("session", ""), "session")
    as_int(body.get("pid"), "pid", 0, 2**31)
    for key in ("concurrency", "credit", "prefetch"):
        as_int(body.get(key, 0), key, -(2**31), 2**31)
    tags = body.get("tags", [])
    if type(tags) is not list or len(tags) > 1024:
        raise ProtocolError("tags must be an array of at most 1024 strings")
    for tag in tags:
        as_str(tag, "tag")
    running = body.get("running", [])
    if type(running) is not list:
        raise ProtocolError("running must be an array")
    for item in running:
        if type(item) is not list or len(item) != 2:
            raise ProtocolError("running entries must be [job_id, attempt]")
        as_str(item[0], "job id")
        as_int(item[1], "attempt")
    return body

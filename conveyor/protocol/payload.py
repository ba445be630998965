"""Task payloads: how a function call and its result become data frames, and back.

The dispatcher never calls anything here: it routes these frames as opaque bytes. Only clients
(which encode calls and decode results) and workers (the reverse) do, so pickled data is only
ever loaded by the peers that created or asked for it.

A *value* (arguments, a result) is encoded as frames:
    frame 0   one codec byte + body
              b"m" + msgpack   plain data (None, bool, int, float, str, bytes, list, dict with str keys);
                               bytes of 64 KiB or more travel as their own frames (ExtType 1 = frame index)
              b"p" + pickle    anything else, pickle protocol 5; out-of-band buffers as their own frames
    frame 1.. buffers          sent without copying (zmq copy=False)

A *call* is encoded as frames:
    frame 0   msgpack [fn_ref, by_value, chunk]   fn_ref "module:qualname" (also the display name)
    frame 1   cloudpickle of the function          only when by_value
    then      the value frames of [args, kwargs]   or, for a chunk, of [[args, kwargs], ...]

A call may refer to the results of other jobs (its *parents*, docs/workflows.md): where the client
had a JobFuture, the value holds `ParentRef(i)`, the i-th parent of the SUBMIT entry (msgpack:
ExtType 2 = parent index; pickle: a persistent id). The worker decodes the call with the parents'
values (`decode_call(frames, parents)`), so the task receives them in place; only ids crossed the
client's link. On the worker, a task with parents travels as one header frame (b"P" + msgpack
[n_call_frames, [[job_id, state, n_frames, error], ...]]) then its call frames then each parent's result
frames (`pack_task`, `unpack_task`).
"""

from __future__ import annotations

import importlib
import io
import pickle
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle
import msgpack

from conveyor.errors import FunctionNotFound, ProtocolError

CODEC_MSGPACK = ord("m")
CODEC_PICKLE = ord("p")
OOB_THRESHOLD = 64 * 1024
_EXT_FRAME = 1
_EXT_PARENT = 2
_PARENT_PID = "conveyor.parent"  # pickle persistent ids of parent references: (this, index)
TASK_WITH_PARENTS = ord("P")  # first byte of a worker task's header frame (a call header is a msgpack array)
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

Frames = list[Any]  # bytes, memoryview or zmq.Frame: anything with the buffer protocol


class _NotPlain(Exception):
    pass


class ParentRef:
    """Where a call refers to its i-th parent's result (the client puts it where a JobFuture was)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"ParentRef({self.index})"

    def __eq__(self, other: object) -> bool:
        return type(other) is ParentRef and other.index == self.index

    def __hash__(self) -> int:
        return hash((ParentRef, self.index))


class _RefPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Pickles ParentRef as a persistent id, so the worker's unpickler puts the parent's value there."""

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is ParentRef:
            return (_PARENT_PID, obj.index)
        return None


def _plain(obj: Any, buffers: list[Any]) -> Any:
    """obj with large bytes replaced by frame references; raises _NotPlain if msgpack can't round-trip it."""
    t = type(obj)
    if t is str or t is float or t is bool or obj is None:
        return obj
    if t is int:
        if _INT_MIN <= obj <= _INT_MAX:
            return obj
        raise _NotPlain
    if t is bytes:
        if len(obj) >= OOB_THRESHOLD:
            buffers.append(obj)
            return msgpack.ExtType(_EXT_FRAME, (len(buffers)).to_bytes(4, "little"))
        return obj
    if t is ParentRef:
        return msgpack.ExtType(_EXT_PARENT, obj.index.to_bytes(4, "little"))
    if t is list:
        return [_plain(x, buffers) for x in obj]
    if t is dict:
        out = {}
        for k, v in obj.items():
            if type(k) is not str:
                raise _NotPlain
            out[k] = _plain(v, buffers)
        return out
    raise _NotPlain


def encode_value(obj: Any, refs: bool = False) -> Frames:
    """The frames of a value; `refs`: it may hold ParentRef (slower pickling, for calls with parents)."""
    buffers: list[Any] = []
    try:
        plain = _plain(obj, buffers)
        body = msgpack.packb(plain, use_bin_type=True)
    except (_NotPlain, RecursionError, ValueError):  # ValueError: e.g. a str with a lone surrogate
        pass
    else:
        return [bytes((CODEC_MSGPACK,)) + body, *buffers]
    oob: list[pickle.PickleBuffer] = []
    if refs:
        out = io.BytesIO()
        _RefPickler(out, protocol=5, buffer_callback=oob.append).dump(obj)
        body = out.getvalue()
    else:
        body = cloudpickle.dumps(obj, protocol=5, buffer_callback=oob.append)
    return [bytes((CODEC_PICKLE,)) + body, *(b.raw() for b in oob)]


class _ParentUnpickler(pickle.Unpickler):
    def __init__(self, body: Any, buffers: Frames, parents: list[Any]):
        super().__init__(io.BytesIO(body), buffers=buffers)
        self._parents = parents

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 2 and pid[0] == _PARENT_PID and 0 <= pid[1] < len(self._parents):
            return self._parents[pid[1]]
        raise pickle.UnpicklingError(f"a reference to parent {pid!r}, which this task does not have")


def decode_value(frames: Frames, parents: list[Any] | None = None) -> Any:
    """The value of these frames; `parents`: the values its ParentRefs stand for (a call with parents)."""
    if not frames:
        raise ProtocolError("empty value")
    head = memoryview(frames[0])
    if len(head) == 0:
        raise ProtocolError("empty value frame")
    codec, body = head[0], head[1:]
    rest = frames[1:]
    if codec == CODEC_MSGPACK:

        def ext_hook(code: int, data: bytes) -> Any:
            index = int.from_bytes(data, "little")
            if code == _EXT_PARENT and parents is not None:
                if not 0 <= index < len(parents):
                    raise ProtocolError("parent reference out of range")
                return parents[index]
            if code != _EXT_FRAME:
                raise ProtocolError(f"unknown msgpack extension {code}")
            if not 1 <= index <= len(rest):
                raise ProtocolError("frame reference out of range")
            return bytes(rest[index - 1])

        try:
            return msgpack.unpackb(body, raw=False, ext_hook=ext_hook, strict_map_key=False)
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack raises several types for bad input
            raise ProtocolError(f"bad msgpack value: {type(exc).__name__}") from None
    if codec == CODEC_PICKLE:
        if parents is not None:
            return _ParentUnpickler(body, rest, parents).load()
        return pickle.loads(body, buffers=rest)
    raise ProtocolError(f"unknown codec {codec!r}")


# --- functions -------------------------------------------------------------------------------


def function_ref(fn: Callable[..., Any]) -> str | None:
    """'module:qualname' when a worker can import fn by name, else None (send it by value)."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    mod = sys.modules.get(module)
    if mod is None:
        return None
    target: Any = mod
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    if target is not fn:
        return None
    return f"{module}:{qualname}"


def display_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', repr(fn))}"


def resolve_function(ref: str) -> Callable[..., Any]:
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise FunctionNotFound(f"bad function reference {ref!r}: expected 'module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FunctionNotFound(f"cannot import module {module_name!r}: {exc}") from None
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise FunctionNotFound(f"module {module_name!r} has no attribute {qualname!r}") from None
    if not callable(target):
        raise FunctionNotFound(f"{ref} is not callable")
    return target  # type: ignore[no-any-return]


def encode_function(fn: Callable[..., Any] | str) -> tuple[str, bytes | None]:
    """(reference or display name, pickled function or None)."""
    if isinstance(fn, str):
        return fn, None
    ref = function_ref(fn)
    if ref is not None:
        return ref, None
    return display_name(fn), cloudpickle.dumps(fn, protocol=5)


_call_headers: dict[tuple[str, bool], bytes] = {}


def encode_call(
    fn_name: str,
    fn_bytes: bytes | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    refs: bool = False,
) -> Frames:
    key = (fn_name, fn_bytes is not None)
    header = _call_headers.get(key)
    if header is None:  # the same few functions are called over and over: pack each header once
        header = msgpack.packb([fn_name, fn_bytes is not None, False], use_bin_type=True)
        if len(_call_headers) < 4096:
            _call_headers[key] = header
    frames: Frames = [header]
    if fn_bytes is not None:
        frames.append(fn_bytes)
    frames.extend(encode_value([list(args), kwargs], refs))
    return frames


def encode_chunk(fn_name: str, fn_bytes: bytes | None, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> Frames:
    """One task that runs fn once per (args, kwargs) and returns the list of results."""
    header = msgpack.packb([fn_name, fn_bytes is not None, True], use_bin_type=True)
    frames: Frames = [header]
    if fn_bytes is not None:
        frames.append(fn_bytes)
    frames.extend(encode_value([[list(a), k] for a, k in calls]))
    return frames


class Call:
    """A decoded call, ready to run on a worker."""

    __slots__ = ("args", "chunk", "fn", "kwargs", "name")

    def __init__(self, name: str, fn: Callable[..., Any], chunk: bool, args: Any, kwargs: dict[str, Any]):
        self.name = name
        self.fn = fn
        self.chunk = chunk
        self.args = args  # for a chunk: list of (args, kwargs)
        self.kwargs = kwargs


_function_cache: dict[Any, Callable[..., Any]] = {}


def decode_call(frames: Frames, parents: list[Any] | None = None) -> Call:
    """Inverse of encode_call/encode_chunk. Raises FunctionNotFound or ProtocolError, and for a function
    or arguments sent as pickles, whatever unpickling them raises. `parents`: the values of the
    parents the call refers to (ParentRef i becomes parents[i])."""
    if not frames:
        raise ProtocolError("empty call")
    try:
        fn_name, by_value, chunk = msgpack.unpackb(bytes(frames[0]), raw=False)
    except Exception:
        raise ProtocolError("bad call header") from None
    if not isinstance(fn_name, str) or not isinstance(by_value, bool) or not isinstance(chunk, bool):
        raise ProtocolError("bad call header")
    if len(frames) < (3 if by_value else 2):
        raise ProtocolError("a call needs its function and argument frames")
    pos = 1
    if by_value:
        blob = bytes(frames[1])
        pos = 2
        fn = _function_cache.get(blob)
        if fn is None:
            fn = pickle.loads(blob)
            if len(_function_cache) > 1024:
                _function_cache.clear()
            _function_cache[blob] = fn
    else:
        fn = _function_cache.get(fn_name)
        if fn is None:
            fn = resolve_function(fn_name)
            _function_cache[fn_name] = fn
    value = decode_value(frames[pos:], parents)
    calls = value if chunk else [value]
    if not isinstance(calls, list) or not all(
        isinstance(c, list | tuple) and len(c) == 2 and isinstance(c[0], list | tuple) and isinstance(c[1], dict)
        for c in calls
    ):
        raise ProtocolError("bad call arguments: expected [args, kwargs]" + (" per call" if chunk else ""))
    if chunk:
        return Call(fn_name, fn, True, [(tuple(a), k) for a, k in calls], {})
    args, kwargs = value
    return Call(fn_name, fn, False, tuple(args), kwargs)


# --- a worker's task with parents --------------------------------------------------------------


def pack_task(
    n_call_frames: int, parents: list[tuple[str, str, int, dict[str, Any] | None]], frames: Frames
) -> Frames:
    """A task's frames with its parents' results: a header frame, the call's frames, each parent's frames."""
    header = bytes((TASK_WITH_PARENTS,)) + msgpack.packb([n_call_frames, [list(p) for p in parents]],
                                                         use_bin_type=True)
    return [header, *frames]


ParentOutcome = tuple[str, str, dict[str, Any] | None, Frames]  # job id, state, error record, result frames


def unpack_task(frames: Frames) -> tuple[Frames, list[ParentOutcome]] | None:
    """(call frames, [(job id, state, error, result frames)] per parent) of a packed task; None for a plain call."""
    if not frames or not len(frames[0]) or memoryview(frames[0])[0] != TASK_WITH_PARENTS:
        return None
    try:
        n_call, parents = msgpack.unpackb(bytes(memoryview(frames[0])[1:]), raw=False)
        pos = 1 + int(n_call)
        out: list[ParentOutcome] = []
        for job_id, state, n, error in parents:
            out.append((str(job_id), str(state), error if isinstance(error, dict) else None,
                        list(frames[pos : pos + n])))
            pos += n
    except Exception:
        raise ProtocolError("bad task header") from None
    if pos != len(frames):
        raise ProtocolError("a task's frame counts do not add up")
    return list(frames[1 : 1 + int(n_call)]), out

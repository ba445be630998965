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
ExtType 2 = parent index; pickle: a persistent id), and where it had a list of nothing but futures
of parents i..j-1, `ParentRange(i, j)`: the list of their values (ExtType 3, one reference for a
fan-in over 100,000). The worker decodes the call with the parents'
values (`decode_call(frames, parents)`), so the task receives them in place; only ids crossed the
client's link. On the worker, a task with parents travels as one header frame, b"P" + msgpack
[n_call_frames, [n_frames per parent], [[index, job_id, state, error] per parent that did not
succeed]], then its call frames, then each parent's result frames (`pack_task`, `unpack_task`); or,
when every parent succeeded with one frame, joined (b"J", protocol/joined.py).
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
import sys
from collections.abc import Callable
from typing import Any

import msgpack

from conveyor.errors import FunctionNotFound, ProtocolError

CODEC_MSGPACK = ord("m")
CODEC_PICKLE = ord("p")
OOB_THRESHOLD = 64 * 1024
_EXT_FRAME = 1
_EXT_PARENT = 2
_EXT_PARENTS = 3
_PARENT_PID = "conveyor.parent"  # pickle persistent ids of parent references: (this, index)
_PARENTS_PID = "conveyor.parents"  # ...and of ranges: (this, start, stop)
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


class ParentRange:
    """Where a call has the list of the results of parents start..stop-1 (a list of futures, a fan-in)."""

    __slots__ = ("start", "stop")

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __repr__(self) -> str:
        return f"ParentRange({self.start}, {self.stop})"

    def __eq__(self, other: object) -> bool:
        return type(other) is ParentRange and (other.start, other.stop) == (self.start, self.stop)

    def __hash__(self) -> int:
        return hash((ParentRange, self.start, self.stop))


@functools.cache
def _ref_pickler_class() -> Any:
    """A cloudpickle Pickler that pickles ParentRef as a persistent id, so the worker's unpickler puts the
    parent's value there. Made on first use: cloudpickle is imported only where something is pickled (a
    dispatcher never pickles)."""
    import cloudpickle

    class _RefPickler(cloudpickle.Pickler):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> Any:
            if type(obj) is ParentRef:
                return (_PARENT_PID, obj.index)
            if type(obj) is ParentRange:
                return (_PARENTS_PID, obj.start, obj.stop)
            return None

    return _RefPickler


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
    if t is ParentRange:
        return msgpack.ExtType(_EXT_PARENTS, obj.start.to_bytes(4, "little") + obj.stop.to_bytes(4, "little"))
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
        _ref_pickler_class()(out, protocol=5, buffer_callback=oob.append).dump(obj)
        body = out.getvalue()
    else:
        import cloudpickle

        body = cloudpickle.dumps(obj, protocol=5, buffer_callback=oob.append)
    return [bytes((CODEC_PICKLE,)) + body, *(b.raw() for b in oob)]


class _ParentUnpickler(pickle.Unpickler):
    def __init__(self, body: Any, buffers: Frames, parents: list[Any]):
        super().__init__(io.BytesIO(body), buffers=buffers)
        self._parents = parents

    def persistent_load(self, pid: Any) -> Any:
        n = len(self._parents)
        if type(pid) is tuple and len(pid) == 2 and pid[0] == _PARENT_PID and 0 <= pid[1] < n:
            return self._parents[pid[1]]
        if type(pid) is tuple and len(pid) == 3 and pid[0] == _PARENTS_PID and 0 <= pid[1] <= pid[2] <= n:
            return self._parents[pid[1] : pid[2]]
        raise pickle.UnpicklingError(f"a reference to parent {pid!r}, which this task does not have")


def _no_ext(code: int, data: bytes) -> Any:
    if code == _EXT_FRAME:
        raise ProtocolError("frame reference out of range")
    raise ProtocolError(f"unknown msgpack extension {code}")


def decode_single(frame: Any) -> Any:
    """decode_value([frame]), faster for a value of one frame (a parent's result, most often)."""
    head = memoryview(frame)
    if head.nbytes and head[0] == CODEC_MSGPACK:
        try:
            return msgpack.unpackb(head[1:], raw=False, ext_hook=_no_ext, strict_map_key=False)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"bad msgpack value: {type(exc).__name__}") from None
    return decode_value([frame])


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
        if not rest and parents is None:  # the usual value: no frames to refer to (no closure to build)
            try:
                return msgpack.unpackb(body, raw=False, ext_hook=_no_ext, strict_map_key=False)
            except ProtocolError:
                raise
            except Exception as exc:
                raise ProtocolError(f"bad msgpack value: {type(exc).__name__}") from None

        def ext_hook(code: int, data: bytes) -> Any:
            if code == _EXT_PARENTS and parents is not None and len(data) == 8:
                start, stop = int.from_bytes(data[:4], "little"), int.from_bytes(data[4:], "little")
                if not 0 <= start <= stop <= len(parents):
                    raise ProtocolError("parent reference out of range")
                return parents[start:stop]
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
    import cloudpickle

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


def encode_plain_chunk(fn_name: str, fn_bytes: bytes | None, args: list[tuple[Any, ...]]) -> Frames | None:
    """encode_chunk of calls without keywords (a map's), if every value is msgpack-plain; else None (the
    caller then looks for what is not plain: a future, or a value to pickle)."""
    buffers: list[Any] = []
    try:
        body = msgpack.packb(_plain([[list(a), {}] for a in args], buffers), use_bin_type=True)
    except (_NotPlain, RecursionError, ValueError):
        return None
    header = msgpack.packb([fn_name, fn_bytes is not None, True], use_bin_type=True)
    return [header, *([fn_bytes] if fn_bytes is not None else []), bytes((CODEC_MSGPACK,)) + body, *buffers]


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
    n_call_frames: int, n_frames: list[int], others: list[tuple[int, str, str, dict[str, Any] | None]], frames: Frames
) -> Frames:
    """A task's frames with its parents' results: a header frame, the call's frames, each parent's frames.

    `n_frames` counts each parent's result frames; `others` are the parents that did not succeed, as
    (index, job id, state, error record). Arrays of plain ints pack fast: a fan-in has 100,000 parents."""
    header = msgpack.packb([n_call_frames, n_frames, [list(o) for o in others]], use_bin_type=True)
    return [bytes((TASK_WITH_PARENTS,)) + header, *frames]


class PackedParents:
    """The parents' results of a packed task, read lazily: `values(decode_failed)` builds them in order."""

    __slots__ = ("frames", "n_frames", "others", "start")

    def __init__(self, frames: Frames, start: int, n_frames: list[int], others: dict[int, tuple[str, str, Any]]):
        self.frames, self.start, self.n_frames, self.others = frames, start, n_frames, others

    def values(self, failed: Callable[[str, str, dict[str, Any] | None, Frames], Any]) -> list[Any]:
        """Each parent's value: its decoded result, or failed(job_id, state, error, frames) for the others.

        One pass without a tuple or list per parent: with 100,000 parents, allocating those made the
        garbage collector the main cost."""
        frames, others, pos = self.frames, self.others, self.start
        if not others:
            fast = _msgpack_singles(frames, pos, self.n_frames)
            if fast is not None:
                return fast
        out: list[Any] = []
        append = out.append
        for i, n in enumerate(self.n_frames):
            if others and i in others:
                job_id, state, error = others[i]
                append(failed(job_id, state, error, list(frames[pos : pos + n])))
            elif n == 1:
                append(decode_single(frames[pos]))
            else:
                append(decode_value(frames[pos : pos + n]))
            pos += n
        return out


_ARRAY32 = 0xDD


def _msgpack_singles(frames: Frames, start: int, n_frames: list[int]) -> list[Any] | None:
    """The values, if each is one msgpack frame (most results), decoded in one call; else None (then
    each is decoded on its own). The codec byte b"m" is itself msgpack (the integer 109), so the frames
    joined are one msgpack array [109, value, 109, value, ...] once given its header."""
    n = len(n_frames)
    if n < 64 or len(frames) - start != n:  # few parents, or one has several frames
        return None
    blob = b"".join([bytes((_ARRAY32,)) + (2 * n).to_bytes(4, "big"), *frames[start:]])
    try:
        value = msgpack.unpackb(blob, raw=False, ext_hook=_no_ext, strict_map_key=False)
    except Exception:
        return None  # a pickled one, or a bad one: decoded one by one (the error names the right one)
    if type(value) is not list or len(value) != 2 * n or value[0::2].count(CODEC_MSGPACK) != n:
        return None
    return value[1::2]


def unpack_task(frames: Frames) -> tuple[Frames, PackedParents] | None:
    """(call frames, the parents' results) of a packed task; None for a plain call."""
    head = memoryview(frames[0]) if frames else memoryview(b"")
    if not head.nbytes or head[0] != TASK_WITH_PARENTS:
        return None
    try:
        n_call, n_frames, raw_others = msgpack.unpackb(bytes(head[1:]), raw=False)
        n_call = int(n_call)
        others = {int(i): (str(j), str(st), e if isinstance(e, dict) else None) for i, j, st, e in raw_others}
        total = 1 + n_call + sum(n_frames)
    except Exception:
        raise ProtocolError("bad task header") from None
    if total != len(frames) or any(type(n) is not int or n < 0 for n in n_frames):
        raise ProtocolError("a task's frame counts do not add up")
    return list(frames[1 : 1 + n_call]), PackedParents(frames, 1 + n_call, n_frames, others)

"""Tier 1: the wire protocol as pure functions on bytes (no sockets, no processes)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.errors import (
    FunctionNotFound,
    JobCancelled,
    RemoteError,
    RemoteTraceback,
    TaskTimeout,
    WorkerCrashed,
    WorkerLost,
)
from conveyor.protocol import (
    SIGNATURE,
    Cmd,
    Message,
    ProtocolError,
    VersionMismatch,
    decode,
    encode,
    split_frames,
)
from conveyor.protocol import failures as perr
from conveyor.protocol.frames import MAX_BODY_BYTES, PACK_MAX, PACKED
from conveyor.protocol.payload import (
    CODEC_MSGPACK,
    CODEC_PICKLE,
    OOB_THRESHOLD,
    decode_call,
    decode_value,
    encode_call,
    encode_chunk,
    encode_function,
    encode_value,
    function_ref,
)
from tests import tasks

# --- messages ---------------------------------------------------------------------------------------

BODIES: list[Any] = [
    None,
    {},
    {"name": "w", "pid": 12, "tags": ["a", "b"], "credit": 4, "running": [["j-1", 2]]},
    [["job-1", 1, None, [], 2], ["job-2", 3, 1.5, ["OSError"], 0]],
    {"nested": {"bytes": b"\x00\xff", "float": 0.25, "neg": -(2**40), "big": 2**64 - 1}},
]


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
@pytest.mark.parametrize("body", BODIES, ids=["none", "empty", "map", "batch", "nested"])
def test_every_command_round_trips(cmd: Cmd, body: Any) -> None:
    frames = [b"frame-a", b"", b"z" * 70_000]
    parts = encode(cmd, body, frames)
    # Two small frames travel packed: lengths, then the pack, then the large frame as itself.
    assert parts[0] == SIGNATURE and parts[1] == bytes((cmd, PACKED))
    assert len(parts) == 6 and parts[5] is frames[2]
    msg = decode(parts)
    assert msg == Message(cmd, body, frames)
    assert type(msg.cmd) is Cmd

    one = encode(cmd, body, [b"only"])
    assert one[1] == bytes((cmd,)) and len(one) == 4
    assert decode(one) == Message(cmd, body, [b"only"])

    bare = decode(encode(cmd, body))
    assert bare == Message(cmd, body, [])


def test_decode_accepts_any_buffer_type() -> None:
    parts = encode(Cmd.SUBMIT, [["j", {}, 1]], [b"data"])
    msg = decode([memoryview(bytes(p)) for p in parts])
    assert msg.cmd is Cmd.SUBMIT and msg.body == [["j", {}, 1]]
    assert [bytes(f) for f in msg.frames] == [b"data"]


@pytest.mark.parametrize("signature", [b"CNV9", b"CNV1", b"CNV3", b"CNV0", b"CNV10"])
def test_another_version_is_a_version_mismatch(signature: bytes) -> None:
    with pytest.raises(VersionMismatch):
        decode([signature, bytes((Cmd.HELLO,)), msgpack.packb({})])


@pytest.mark.parametrize(
    "parts",
    [
        [],
        [SIGNATURE],
        [SIGNATURE, bytes((Cmd.HELLO,))],
        [b"ZMTP", bytes((Cmd.HELLO,)), msgpack.packb({})],
        [b"", bytes((Cmd.HELLO,)), msgpack.packb({})],
        [b"CN", bytes((Cmd.HELLO,)), msgpack.packb({})],
        [SIGNATURE, b"", msgpack.packb({})],
        [SIGNATURE, b"\x20\x20", msgpack.packb({})],
        [SIGNATURE, b"\xff", msgpack.packb({})],
        [SIGNATURE, b"\x00", msgpack.packb({})],
        [SIGNATURE, bytes((Cmd.HELLO,)), b""],
        [SIGNATURE, bytes((Cmd.HELLO,)), b"\xc1"],  # a byte msgpack never uses
        [SIGNATURE, bytes((Cmd.HELLO,)), b"\x92\x01"],  # truncated array
        [SIGNATURE, bytes((Cmd.HELLO,)), msgpack.packb({}) + b"\x00"],  # trailing data
        [SIGNATURE, bytes((Cmd.HELLO,)), b"\xa2\xff\xfe"],  # a str that is not UTF-8
        [SIGNATURE, bytes((Cmd.HELLO,)), b"\x81\x91\x01\x01"],  # an unhashable map key
    ],
    ids=[
        "no-frames", "one-frame", "two-frames", "foreign-signature", "empty-signature", "short-signature",
        "empty-command", "two-byte-command", "unknown-command-ff", "unknown-command-00", "empty-body",
        "bad-msgpack", "truncated-msgpack", "trailing-bytes", "bad-utf8", "unhashable-key",
    ],
)
def test_garbage_is_a_protocol_error(parts: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(parts)
    assert type(info.value) is ProtocolError  # not a version mismatch


def test_a_body_over_the_limit_is_refused() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        decode([SIGNATURE, bytes((Cmd.HELLO,)), b"\xc0" * (MAX_BODY_BYTES + 1)])


def test_split_frames() -> None:
    frames = [b"a", b"b", b"c"]
    assert split_frames([1, 0, 2], frames) == [[b"a"], [], [b"b", b"c"]]
    assert split_frames([], []) == []
    assert split_frames([0, 0], []) == [[], []]


@pytest.mark.parametrize(
    ("counts", "n_frames"),
    [([1, 3], 3), ([4], 3), ([1], 3), ([], 1), ([-1, 4], 3), ([1.0, 2], 3), (["1", 2], 3), ([None], 0)],
    ids=["too-many", "one-too-many", "extra-frames", "no-entries", "negative", "float", "str", "none"],
)
def test_bad_split_frames_counts(counts: list[Any], n_frames: int) -> None:
    with pytest.raises(ProtocolError):
        split_frames(counts, [b"x"] * n_frames)


_frame = st.binary(max_size=64)
_valid_head = st.tuples(
    st.just(SIGNATURE), st.sampled_from([bytes((c,)) for c in Cmd] + [bytes((c, PACKED)) for c in Cmd])
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.lists(_frame, max_size=6),
        st.lists(st.sampled_from([SIGNATURE, b"CNV9", b"CNV", b"\x20", b"\x41", b"\xff"]) | _frame, max_size=6),
        st.builds(lambda head, rest: [*head, *rest], _valid_head, st.lists(_frame, min_size=1, max_size=4)),
    )
)
def test_decode_never_raises_anything_but_protocol_error(parts: list[bytes]) -> None:
    try:
        msg = decode(parts)
    except ProtocolError:
        return
    assert isinstance(msg.cmd, Cmd)
    if len(parts[1]) == 1:
        assert msg.frames == parts[3:]


@pytest.mark.parametrize(
    "lengths, pack, large",
    [
        ([3, 3], b"abcde", []),  # the lengths run past the pack
        ([2], b"abc", []),  # the pack has bytes no length covers
        ([1, -1], b"a", []),  # a large frame is missing
        ([1], b"a", [b"extra"]),  # a large frame too many
        ([-2], b"", []),
        (["x"], b"x", []),
        ({"a": 1}, b"", []),
    ],
)
def test_malformed_packed_frames_are_protocol_errors(lengths: Any, pack: bytes, large: list[bytes]) -> None:
    parts = [SIGNATURE, bytes((Cmd.SUBMIT, PACKED)), msgpack.packb([]), msgpack.packb(lengths), pack, *large]
    with pytest.raises(ProtocolError):
        decode(parts)


def test_packed_frames_are_slices_of_one_buffer_in_order() -> None:
    frames = [b"a" * 10, b"b" * 100_000, b"", b"c" * 5, memoryview(b"d" * 7)]
    parts = encode(Cmd.RESULTS, [], frames)
    assert len(parts) == 6  # lengths, the pack of four small ones, the large one
    msg = decode([bytes(p) for p in parts])
    assert [bytes(f) for f in msg.frames] == [bytes(f) for f in frames]


# --- values ---------------------------------------------------------------------------------------


def _codec(frames: list[Any]) -> int:
    return bytes(frames[0])[0]


PLAIN: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    -0.0,
    "",
    "héllo ✓",
    b"",
    b"\x00\xff" * 100,
    [],
    [1, [2, [3, None]], "x"],
    {},
    {"a": {"b": [1, None, b"raw"], "c": 2.5}, "": True},
]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_data_takes_the_msgpack_path(value: Any) -> None:
    frames = encode_value(value)
    assert _codec(frames) == CODEC_MSGPACK
    assert len(frames) == 1
    back = decode_value(frames)
    assert back == value
    assert type(back) is type(value)


def test_large_bytes_travel_as_their_own_frames() -> None:
    big1 = bytes(range(256)) * (OOB_THRESHOLD // 256)  # exactly the threshold
    big2 = b"y" * (3 * OOB_THRESHOLD)
    small = b"s" * (OOB_THRESHOLD - 1)
    value = {"a": big1, "b": [big2, small], "c": "text"}
    frames = encode_value(value)
    assert _codec(frames) == CODEC_MSGPACK
    assert len(frames) == 3
    assert frames[1] is big1 and frames[2] is big2  # sent as is, never copied into the body
    assert len(frames[0]) < OOB_THRESHOLD + 100  # only the small one is inline
    assert decode_value(frames) == value
    # a receiver may hand in memoryviews (zmq.Frame buffers): same result
    assert decode_value([memoryview(bytes(f)) for f in frames]) == value

    only = encode_value(big2)
    assert len(only) == 2 and decode_value(only) == big2
    assert len(encode_value(small)) == 1


@dataclass
class Point:
    x: int
    y: list[int]


class Custom:
    def __init__(self, label: str):
        self.label = label

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.label == self.label

    def __hash__(self) -> int:
        return hash(self.label)


class ZeroCopyByteArray(bytearray):
    """A bytearray that pickles its buffer out of band (the PEP 574 recipe)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        if protocol >= 5:
            return type(self)._reconstruct, (pickle.PickleBuffer(self),), None
        return type(self)._reconstruct, (bytearray(self),)

    @classmethod
    def _reconstruct(cls, obj: Any) -> ZeroCopyByteArray:
        with memoryview(obj) as m:
            return cls(m)


NOT_PLAIN: list[Any] = [
    (1, 2),
    (),
    {1, 2, 3},
    frozenset({"a"}),
    {1: "int key"},
    {"k": (1, 2)},
    [1, (2, 3)],
    2**64,
    -(2**63) - 1,
    Point(1, [2, 3]),
    Custom("c"),
    bytearray(b"abc"),
    ValueError("as a value"),
    1 + 2j,
]


@pytest.mark.parametrize("value", NOT_PLAIN, ids=repr)
def test_everything_else_takes_the_pickle_path(value: Any) -> None:
    frames = encode_value(value)
    assert _codec(frames) == CODEC_PICKLE
    back = decode_value(frames)
    assert type(back) is type(value)
    if isinstance(value, BaseException):
        assert back.args == value.args
    else:
        assert back == value


def test_pickle_buffers_travel_out_of_band() -> None:
    data = ZeroCopyByteArray(b"q" * (2 * OOB_THRESHOLD))
    value = {"payload": data, "meta": (1, 2)}
    frames = encode_value(value)
    assert _codec(frames) == CODEC_PICKLE
    assert len(frames) == 2
    assert len(frames[0]) < 1000  # the buffer is not in the pickle body
    assert bytes(frames[1]) == bytes(data)
    data[0] = ord("Q")  # zero copy: the frame is a view of the original buffer
    assert bytes(frames[1][:1]) == b"Q"
    back = decode_value(frames)
    assert type(back["payload"]) is ZeroCopyByteArray and back["payload"] == data
    assert back["meta"] == (1, 2)


def test_plain_bytearray_round_trips() -> None:
    data = bytearray(b"b" * (2 * OOB_THRESHOLD))
    frames = encode_value(data)
    assert _codec(frames) == CODEC_PICKLE
    back = decode_value(frames)
    assert type(back) is bytearray and back == data


def test_a_str_with_a_lone_surrogate_round_trips() -> None:
    # e.g. os.listdir() of a non-UTF-8 file name decodes to a lone surrogate (surrogateescape)
    for value in ["\udcff", ["name-\udc80"], {"k\ud800": 1}]:
        assert decode_value(encode_value(value)) == value


def test_a_nested_value_round_trips() -> None:
    value: Any = {"leaf": (1, 2)}  # a tuple at the bottom: the whole value must take the pickle path
    for _ in range(300):
        value = [value]
    frames = encode_value(value)
    assert _codec(frames) == CODEC_PICKLE and decode_value(frames) == value


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"x\x90"],
        [b"m" + msgpack.packb(msgpack.ExtType(1, (1).to_bytes(4, "little")))],  # frame 1 missing
        [b"m" + msgpack.packb(msgpack.ExtType(1, (0).to_bytes(4, "little"))), b"f"],
        [b"m" + msgpack.packb(msgpack.ExtType(7, b"?"))],
    ],
    ids=["no-frames", "empty-frame", "unknown-codec", "missing-frame", "frame-zero", "unknown-ext"],
)
def test_bad_values_are_protocol_errors(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode_value(frames)


_plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_plain_values)
def test_plain_values_round_trip_exactly(value: Any) -> None:
    frames = encode_value(value)
    assert _codec(frames) == CODEC_MSGPACK
    back = decode_value(frames)
    assert back == value
    assert repr(back) == repr(value)  # same types all the way down (bool stays bool, -0.0 stays -0.0)


# --- calls ----------------------------------------------------------------------------------------


def test_a_call_by_reference() -> None:
    name, blob = encode_function(tasks.add)
    assert (name, blob) == ("tests.tasks:add", None)
    frames = encode_call(name, blob, (1,), {"b": 2})
    assert len(frames) == 2  # header + value: no function bytes
    call = decode_call(frames)
    assert call.name == "tests.tasks:add" and call.fn is tasks.add and not call.chunk
    assert call.args == (1,) and call.kwargs == {"b": 2}
    assert call.fn(*call.args, **call.kwargs) == 3


def test_a_call_by_name_string() -> None:
    assert encode_function("tests.tasks:noop") == ("tests.tasks:noop", None)
    call = decode_call(encode_call("tests.tasks:noop", None, ((1, {2}),), {}))
    assert call.fn is tasks.noop
    assert call.args == ((1, {2}),)  # arguments that are not plain data survive too


def test_a_call_by_value() -> None:
    factor = 3

    def closure(x: int) -> int:
        return x * factor

    for fn, arg, expected in [(lambda x: x * 2, 21, 42), (closure, 5, 15)]:
        name, blob = encode_function(fn)
        assert blob is not None
        assert name.startswith("tests.test_protocol:") and name.endswith(fn.__qualname__)
        frames = encode_call(name, blob, (arg,), {})
        assert len(frames) == 3  # header + pickled function + value
        call = decode_call(frames)
        assert call.name == name
        assert call.fn(*call.args, **call.kwargs) == expected


def test_a_chunk_of_calls() -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((1, 2), {}), ((3,), {"b": 4}), ((), {"a": 5})]
    call = decode_call(encode_chunk("tests.tasks:add", None, calls))
    assert call.chunk and call.fn is tasks.add
    assert call.args == calls and call.kwargs == {}
    assert [call.fn(*a, **k) for a, k in call.args] == [3, 7, 5]

    name, blob = encode_function(lambda a, b=0: a - b)
    by_value = decode_call(encode_chunk(name, blob, calls))
    assert by_value.chunk and [by_value.fn(*a, **k) for a, k in by_value.args] == [-1, -1, 5]


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("nosuch_module_xyz:fn", "cannot import module"),
        ("tests.tasks:missing", "has no attribute"),
        ("tests.tasks", "bad function reference"),
        ("tests.tasks:CustomError.nope", "has no attribute"),
    ],
)
def test_a_missing_function_is_function_not_found(ref: str, match: str) -> None:
    with pytest.raises(FunctionNotFound, match=match):
        decode_call(encode_call(ref, None, (), {}))


def test_a_bad_call_header_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_call([])
    with pytest.raises(ProtocolError):
        decode_call([b"\xc1", *encode_value([[], {}])])
    with pytest.raises(ProtocolError):
        decode_call([msgpack.packb(["tests.tasks:add", False]), *encode_value([[], {}])])


class Holder:
    def method(self) -> None:
        pass

    @staticmethod
    def static() -> None:
        pass


def _in_main() -> None:
    pass


_in_main.__module__ = "__main__"


def test_function_ref() -> None:
    assert function_ref(tasks.add) == "tests.tasks:add"
    assert function_ref(tasks.async_sleep) == "tests.tasks:async_sleep"
    assert function_ref(Holder.static) == "tests.test_protocol:Holder.static"
    assert function_ref(Holder.method) == "tests.test_protocol:Holder.method"
    assert function_ref(len) == "builtins:len"

    def local() -> None:
        pass

    offset = 1
    by_value: list[Callable[..., Any]] = [lambda: None, local, lambda x: x + offset, _in_main]
    for fn in by_value:
        assert function_ref(fn) is None, fn
        assert encode_function(fn)[1] is not None

    def shadowed() -> None:
        pass

    shadowed.__module__, shadowed.__qualname__ = "tests.tasks", "add"  # names another object
    assert function_ref(shadowed) is None
    shadowed.__module__ = "not_imported_module_xyz"
    assert function_ref(shadowed) is None


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "exc_type"),
    [
        (perr.TIMEOUT, TaskTimeout),
        (perr.CRASHED, WorkerCrashed),
        (perr.LOST, WorkerLost),
        (perr.CANCELLED, JobCancelled),
        (perr.NOT_FOUND, FunctionNotFound),
    ],
)
def test_rebuild_exception_by_kind(kind: str, exc_type: type[BaseException]) -> None:
    exc = perr.rebuild_exception(perr.error_info(kind, exc_type.__name__, "what happened", "remote tb\n"), [])
    assert type(exc) is exc_type and str(exc) == "what happened"
    assert isinstance(exc.__cause__, RemoteTraceback) and exc.__cause__.tb == "remote tb\n"

    bare = perr.rebuild_exception(perr.error_info(kind, exc_type.__name__, "no tb"), [])
    assert type(bare) is exc_type and bare.__cause__ is None


def _raise(exc: BaseException) -> None:
    raise exc


def test_rebuild_a_task_exception_of_the_same_type() -> None:
    for original in (ValueError("bad input"), tasks.CustomError("custom")):
        try:
            _raise(original)
        except Exception as exc:
            info, frames = perr.encode_exception(exc)
        assert info["kind"] == perr.EXCEPTION
        assert info["type"] == perr.type_name(type(original))
        assert info["message"] == str(original) and "_raise" in info["traceback"]
        assert len(frames) == 1
        rebuilt = perr.rebuild_exception(info, frames)
        assert type(rebuilt) is type(original) and rebuilt.args == original.args
        assert isinstance(rebuilt.__cause__, RemoteTraceback) and "raise exc" in rebuilt.__cause__.tb
    assert perr.type_name(tasks.CustomError) == "tests.tasks.CustomError"
    assert perr.describe(info) == "tests.tasks.CustomError: custom"


@pytest.mark.parametrize(
    "frames",
    [[], [b"not a pickle"], [pickle.dumps("a string, not an exception")]],
    ids=["no-frames", "garbage", "not-an-exception"],
)
def test_rebuild_a_task_exception_that_cannot_travel(frames: list[bytes]) -> None:
    info = perr.error_info(perr.EXCEPTION, "remote.module.Oops", "it broke", "Traceback...\n")
    exc = perr.rebuild_exception(info, frames)
    assert type(exc) is RemoteError
    assert exc.type_name == "remote.module.Oops" and exc.message == "it broke"
    assert exc.remote_traceback == "Traceback...\n"
    assert isinstance(exc.__cause__, RemoteTraceback)


def test_rebuild_an_unknown_kind_is_a_remote_error() -> None:
    exc = perr.rebuild_exception(perr.error_info("rejected", "ValueError", "timeout must be positive"), [])
    assert isinstance(exc, RemoteError) and exc.type_name == "ValueError"
    assert perr.rebuild_exception({}, []).__class__ is RemoteError  # an empty record still gives an error


def test_an_unpicklable_exception_keeps_its_info() -> None:
    try:
        tasks.fail_unpicklable()
    except Exception as exc:
        info, frames = perr.encode_exception(exc)
    assert frames == [] and info["type"] == "tests.tasks.Unpicklable"
    rebuilt = perr.rebuild_exception(info, frames)
    assert isinstance(rebuilt, RemoteError) and "fail_unpicklable" in rebuilt.remote_traceback


def test_a_pack_stays_under_its_limit_and_the_rest_travel_as_frames() -> None:
    frames = [bytes([i % 256]) * 30_000 for i in range(100)]  # 3 MB of small frames
    parts = encode(Cmd.ASSIGN, [], frames)
    assert len(parts[4]) <= PACK_MAX and all(len(p) <= PACK_MAX for p in parts)
    assert [bytes(f) for f in decode(parts).frames] == frames

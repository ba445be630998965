"""The joined layout of a fan-in's parents (conveyor/protocol/joined.py, docs/protocol.md §8.3): pure."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.errors import ProtocolError
from conveyor.protocol import commands as c
from conveyor.protocol.frames import PACK_LIMIT
from conveyor.protocol.joined import JoinedParents, join_frames, pack_joined, unpack_joined
from conveyor.protocol.payload import ParentRange, decode_call, decode_single, encode_call, encode_value

values = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
          | st.text(max_size=40) | st.binary(max_size=40) | st.lists(st.integers(), max_size=4))


def one_frame(value: object) -> bytes:
    [frame] = encode_value(value)
    return frame


def roundtrip(results: list[bytes], pack_max: int = 1 << 20) -> list[object]:
    """The dispatcher's join, the ASSIGN entry's wire form, the worker's pack and unpack, then the values."""
    call = encode_call("builtins:len", None, (ParentRange(0, len(results)),), {}, refs=True)
    joined, frames = join_frames(results, pack_max)
    entry = c.decode_body(c.Cmd.ASSIGN, c.encode_body(c.Assign(0, [c.AssignEntry("j", 1, None, (), len(call),
                                                                                    [], joined)]))).tasks[0]
    assert entry.total_frames == len(call) + len(frames)
    task = pack_joined(entry.n_frames, entry.joined, [*call, *frames])
    unpacked = unpack_joined(task)
    assert unpacked is not None
    call_frames, parents = unpacked
    out = parents.values()
    assert decode_call(call_frames, out).args == (out,)  # the ParentRange is the whole list, in order
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(values, max_size=120), st.integers(16, 400))
def test_values_come_back_in_order_whatever_the_chunking(xs: list[object], pack_max: int) -> None:
    frames = [one_frame(x) for x in xs]
    joined, out = join_frames(frames, pack_max)
    assert sum(joined.chunks) == len(xs) and joined.lengths == [len(f) for f in frames]
    assert all(len(f) <= pack_max or n == 1 for f, n in zip(out, joined.chunks, strict=True))
    assert b"".join(out) == b"".join(frames)
    assert roundtrip(frames, pack_max) == xs


def test_a_fan_in_of_100000_goes_as_one_frame_and_decodes_in_one_call() -> None:
    frames = [one_frame(i * 0.5) for i in range(100_000)]
    joined, out = join_frames(frames)
    assert len(out) == 1 and joined.chunks == [100_000]
    assert roundtrip(frames) == [i * 0.5 for i in range(100_000)]


def test_pickled_results_are_sliced_out_and_decoded_one_by_one() -> None:
    mixed = [one_frame(1), one_frame({1, 2}), one_frame("x"), one_frame(frozenset({3}))]  # sets go pickled
    assert mixed[1][:1] == b"p"
    assert roundtrip(mixed) == [1, {1, 2}, "x", frozenset({3})]


def test_a_large_result_goes_alone_and_is_not_copied() -> None:
    big = one_frame(b"z" * (PACK_LIMIT + 1))
    small = [one_frame(i) for i in range(3)]
    joined, out = join_frames([small[0], big, small[1], small[2]])
    assert joined.chunks == [1, 1, 2] and out[1] is big
    assert roundtrip([small[0], big, small[1], small[2]]) == [0, b"z" * (PACK_LIMIT + 1), 1, 2]
    [only] = join_frames([big])[1]
    assert only is big


def test_no_parents_and_other_tasks() -> None:
    assert roundtrip([]) == []
    assert unpack_joined(encode_call("builtins:len", None, (1,), {})) is None  # a plain call
    assert JoinedParents([], []).values() == []


@pytest.mark.parametrize("lengths, chunks, nframes", [
    ([1, 2], [1], 1),  # the chunks do not cover the lengths
    ([1, 2], [2], 2),  # more frames than chunks
    ([1, 2], [1, 1], 2),  # sizes do not add up (each frame below is 2 bytes)
    ([2, 2], [0, 2], 2),  # an empty chunk
])
def test_a_joined_layout_that_does_not_add_up_is_malformed(lengths: list[int], chunks: list[int], nframes: int) -> None:
    call = encode_call("builtins:len", None, (), {})
    with pytest.raises(ProtocolError):
        pack_joined(len(call), c.JoinedResults(lengths, chunks), [*call, *[b"m\x01"] * nframes])


def test_a_bad_worker_header_is_malformed() -> None:
    with pytest.raises(ProtocolError, match="bad task header"):
        unpack_joined([b"J" + pickle.dumps(1)])
    with pytest.raises(ProtocolError):
        unpack_joined([b"J" + c.encode_body([5, [[1], [1]]]), b"m\x01"])  # 5 call frames, 0 sent


def test_a_bad_result_is_reported_as_such() -> None:
    with pytest.raises(ProtocolError):
        JoinedParents([b"m\xc1"], [2]).values()  # 0xc1 is never valid msgpack
    assert decode_single(memoryview(b"xm\x05")[1:]) == 5  # results are decoded from memoryview slices

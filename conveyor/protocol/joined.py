"""Parents' results joined into a few frames: the compact ASSIGN layout of a fan-in (docs/protocol.md §8.3).

When every parent of a task succeeded with a one-frame result, the dispatcher sends their frames joined,
in order, into a few data frames (`join_frames`), with each result's length and how many results each
frame holds (commands.JoinedResults), instead of one ParentResult entry and one frame per parent: with
100,000 parents, building, packing, sending, unpacking and validating 100,000 of each was most of the
fan-in's start latency. The dispatcher only cuts and joins opaque bytes; it never looks inside them.

On the worker, such a task travels as a header frame b"J" + msgpack [n_call_frames, lengths, chunks],
its call frames, then the joined frames (`pack_joined`, `unpack_joined`). `JoinedParents.values` decodes
all of them in one msgpack call when each is msgpack (most results: numbers, strings, small lists), and
otherwise slices each result out of its frame as a memoryview (no copy) and decodes it on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from conveyor.errors import ProtocolError
from conveyor.protocol.payload import CODEC_MSGPACK, Frames, decode_single

if TYPE_CHECKING:
    from conveyor.protocol.commands import JoinedResults

# The task side (unpack_joined, JoinedParents) also runs in a subinterpreter (interpreters mode), where
# msgspec refuses to load: so this module imports neither msgspec nor the modules that do (commands,
# frames) at its top; only the dispatcher's and the worker's sides (join_frames, pack_joined) use them.

TASK_WITH_JOINED = ord("J")  # first byte of a worker task's header frame (payload.TASK_WITH_PARENTS: "P")
_ARRAY32 = 0xDD


def _size(frame: Any) -> int:
    return len(frame) if type(frame) is bytes else memoryview(frame).nbytes


def join_frames(frames: list[Any], pack_max: int | None = None) -> tuple[JoinedResults, list[Any]]:
    """One-frame results, in order, as (their JoinedResults, the joined frames). Consecutive results go
    into one frame up to `pack_max` bytes (a receiver's ZMQ_MAXMSGSIZE limits each frame); a result over
    PACK_LIMIT goes alone, as it came (not copied)."""
    from conveyor.protocol.commands import JoinedResults
    from conveyor.protocol.frames import PACK_LIMIT, PACK_MAX

    if pack_max is None:
        pack_max = PACK_MAX
    if not frames:
        return JoinedResults([], []), []
    lengths = list(map(len, frames))  # bytes, zmq.Frame or a byte memoryview: len is the size in bytes
    if sum(lengths) <= pack_max and max(lengths, default=0) <= PACK_LIMIT:  # the usual fan-in: one frame
        out = [b"".join(frames)] if len(frames) != 1 else list(frames)
        return JoinedResults(lengths, [len(frames)]), out
    chunks: list[int] = []
    out = []
    start = size = 0
    for i, n in enumerate(lengths):
        if i > start and (n > PACK_LIMIT or size + n > pack_max):
            chunks.append(i - start)
            out.append(frames[start] if i - start == 1 else b"".join(frames[start:i]))
            start, size = i, 0
        size += n
        if n > PACK_LIMIT:  # alone in its frame: the next result starts another
            chunks.append(1)
            out.append(frames[i])
            start, size = i + 1, 0
    if start < len(frames):
        chunks.append(len(frames) - start)
        out.append(frames[start] if len(frames) - start == 1 else b"".join(frames[start:]))
    return JoinedResults(lengths, chunks), out


def check_joined(lengths: list[int], chunks: list[int], frames: Frames) -> None:
    """ProtocolError unless `frames` (the joined frames) are exactly what lengths and chunks describe."""
    if len(frames) != len(chunks) or sum(chunks) != len(lengths):
        raise ProtocolError("joined parent results: the chunk counts do not match the lengths or the frames")
    pos = 0
    for frame, n in zip(frames, chunks, strict=True):
        if n < 1 or _size(frame) != sum(lengths[pos : pos + n]):
            raise ProtocolError("joined parent results: a frame's size does not match its lengths")
        pos += n


def pack_joined(n_call_frames: int, joined: JoinedResults, frames: Frames) -> Frames:
    """A worker task's frames: a header, the call's frames, then the joined frames (`frames` holds both)."""
    lengths, chunks = list(joined.lengths), list(joined.chunks)
    check_joined(lengths, chunks, frames[n_call_frames:])
    header = msgpack.packb([n_call_frames, [lengths, chunks]], use_bin_type=True)
    return [bytes((TASK_WITH_JOINED,)) + header, *frames]


class JoinedParents:
    """The parents' results of a task packed by pack_joined; `values(failed)` builds them in order
    (`failed` is never called: every parent succeeded; it is there to match payload.PackedParents)."""

    __slots__ = ("frames", "lengths")

    def __init__(self, frames: Frames, lengths: list[int]):
        self.frames, self.lengths = frames, lengths

    def values(self, failed: Any = None) -> list[Any]:
        n = len(self.lengths)
        if n == 0:
            return []
        # The codec byte b"m" is itself msgpack (the integer 109): msgpack results joined are one
        # msgpack array [109, value, 109, value, ...] once given its header, decoded in one call.
        blob = b"".join([bytes((_ARRAY32,)) + (2 * n).to_bytes(4, "big"), *self.frames])
        try:
            value = msgpack.unpackb(blob, raw=False, ext_hook=_no_ext, strict_map_key=False)
        except Exception:
            value = None  # a pickled one, or a bad one: decoded one by one (the error names the right one)
        if type(value) is list and len(value) == 2 * n and value[0::2].count(CODEC_MSGPACK) == n:
            return value[1::2]
        out: list[Any] = []
        append = out.append
        lengths = iter(self.lengths)
        for frame in self.frames:
            view = memoryview(frame)
            pos, end = 0, view.nbytes
            while pos < end:
                size = next(lengths)
                append(decode_single(view[pos : pos + size]))
                pos += size
        return out


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"a parent's result holds msgpack extension {code}")


def unpack_joined(frames: Frames) -> tuple[Frames, JoinedParents] | None:
    """(call frames, the parents' results) of a task packed by pack_joined; None for any other."""
    head = memoryview(frames[0]) if frames else memoryview(b"")
    if not head.nbytes or head[0] != TASK_WITH_JOINED:
        return None
    # Made by this worker's own pack_joined from an ASSIGN that commands.py checked: the checks here
    # guard against a bug, not a peer (types, then every count and size by check_joined).
    try:
        n_call, (lengths, chunks) = msgpack.unpackb(bytes(head[1:]), raw=False)
        if type(n_call) is not int or n_call < 0 or type(lengths) is not list or type(chunks) is not list:
            raise TypeError
        if (lengths and min(lengths) < 0) or (chunks and min(chunks) < 0):
            raise TypeError
    except Exception:
        raise ProtocolError("bad task header") from None
    if 1 + n_call > len(frames):
        raise ProtocolError("a task's frame counts do not add up")
    joined_frames = list(frames[1 + n_call :])
    try:
        check_joined(lengths, chunks, joined_frames)
    except TypeError:  # a length that is not a number
        raise ProtocolError("bad task header") from None
    return list(frames[1 : 1 + n_call]), JoinedParents(joined_frames, lengths)

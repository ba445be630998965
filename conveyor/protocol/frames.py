"""Conveyor wire messages: frame layout, commands, and pure encode/decode functions.

Every message is a ZeroMQ multipart message (the ROUTER adds the peer's routing id in front):

    frame 0   b"CNV2"            protocol signature and version
    frame 1   one byte           the command (see `Cmd`); a second byte PACKED when small frames are packed
    frame 2   msgpack body       the command's fields (a map, or for batches an array)
    frame 3.. data frames        opaque payloads (function, arguments, results), counted in the body

Packed form (a batch of small tasks would otherwise cost one ZeroMQ frame, and a send and a
receive call, per task): frame 3 is a msgpack array with one length per data frame, frame 4 the
small data frames back to back, frames 5.. the large ones (length -1) in order.

Epoch (a standby pair, docs/standby.md): the second byte of the command frame may also carry EPOCH,
and then eight more bytes follow, the sender's epoch (big-endian): a dispatcher's own, or the highest a
worker or client has obeyed. Without it the epoch is 0 (no pair).

`docs/protocol.md` is the specification; this module is its only implementation. Nothing here
touches a socket, so every function can be tested with plain bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

from conveyor.errors import ProtocolError, VersionMismatch

SIGNATURE = b"CNV2"
SIGNATURE_PREFIX = b"CNV"
PROTOCOL_VERSION = 2  # 2: JOB_DONE and RESULTS carry sequence numbers, acknowledged (ACK, ASSIGN, HEARTBEAT)

# Limits applied to every decoded body: a peer cannot make the decoder allocate without bound.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_ARRAY_LEN = 1 << 20  # entries of one msgpack array (ids of a WATCH, entries of a batch)
MAX_MAP_LEN = 1 << 16  # pairs of one msgpack map
# Arrays and maps in a body larger than SMALL_BODY: at most one per CONTAINER_BYTES bytes of it. An empty
# array is one byte on the wire and a 56-byte list in memory: a 16 MiB body of them cost 1.1 GiB and 5 s of
# the dispatcher's only thread. Real bodies spend 8 bytes or more per array or map (a job id, at least).
SMALL_BODY = 64 * 1024
CONTAINER_BYTES = 4
PACKED = 0x01  # second byte of the command frame: the data frames are packed (see above)
EPOCH = 0x02  # second byte of the command frame: eight bytes of epoch follow (see above)
PACK_LIMIT = 32 * 1024  # data frames up to this size travel packed; larger ones stay frames (no copy)
PACK_MAX = 1024 * 1024  # a pack never grows past this (ZMQ_MAXMSGSIZE limits each frame); the rest go plain


class Cmd(enum.IntEnum):
    # worker -> dispatcher
    READY = 0x01  # register: name, host, pid, mode, concurrency, tags, credit, running
    RESULTS = 0x02  # batch of task outcomes; each returns one credit
    GIVEBACK = 0x03  # batch of job ids handed back unstarted/unfinished (drain); each returns credit
    LEAVING = 0x04  # the worker is draining: send nothing new
    GOODBYE = 0x05  # the worker is exiting now
    PROGRESS = 0x06  # batch of the latest progress reports of running tasks
    OUTPUT = 0x07  # batch of output chunks (stdout, stderr, log) of running tasks
    LENT = 0x08  # how many of its slots tasks waiting on their children lend now: each is one more slot
    # dispatcher -> worker
    ASSIGN = 0x10  # batch of tasks, each with its data frames
    CANCEL = 0x11  # stop running a job attempt
    RECONNECT = 0x12  # "I don't know you": re-send READY
    RESEND = 0x13  # a RESULTS message went missing: re-send the unacknowledged ones from this sequence number
    # client -> dispatcher
    HELLO = 0x20  # open a session, learn the dispatcher instance
    SUBMIT = 0x21  # batch of tasks
    WATCH = 0x22  # send me these jobs' outcomes (now if finished, later if not)
    CANCEL_JOBS = 0x23  # cancel these jobs
    STATUS = 0x24  # cluster status request
    JOB_INFO = 0x25  # snapshot of jobs' states without waiting
    JOBS = 0x26  # list jobs by state, age and function (recent ones, from a bounded history)
    LOGS = 0x27  # a job's captured output from given offsets
    ACK = 0x28  # JOB_DONE messages received, up to this sequence number
    LIMITS = 0x29  # list the limit keys, and set or remove some
    SCHEDULE = 0x2A  # create, change, pause, resume, trigger, backfill, delete, list, show, preview schedules
    PROMOTE = 0x2B  # an operator: become the active dispatcher of the standby pair (answered even by a passive)
    # dispatcher -> client
    WELCOME = 0x30  # answer to HELLO
    ACCEPTED = 0x31  # these job ids are accepted (sent after the journal commit), rejected, or busy
    JOB_DONE = 0x32  # batch of finished jobs, each with its result frames
    STATUS_REPLY = 0x33
    JOB_INFO_REPLY = 0x34
    CANCELLED = 0x35  # ack of CANCEL_JOBS: which ids were cancelled
    JOBS_REPLY = 0x36
    LOGS_REPLY = 0x37
    LIMITS_REPLY = 0x38
    SCHEDULE_REPLY = 0x39
    PROMOTE_REPLY = 0x3A  # promoted (or already active), or refused and why
    # both directions, any peer
    HEARTBEAT = 0x40
    ERROR = 0x41  # fatal for the session: another protocol version, or a key not allowed this command
    SHUTDOWN = 0x42  # dispatcher -> workers and clients: the dispatcher is stopping
    REDIRECT = 0x43  # a passive dispatcher -> any peer: not active; where the active is, the highest epoch
    STALE = 0x44  # worker or client -> dispatcher: your epoch is below one I have obeyed
    # the two dispatchers of a standby pair, and the witness (docs/standby.md)
    PAIR_BEAT = 0x50  # heartbeat, vote and journal position
    PAIR_BATCH = 0x51  # one group-commit batch of the active's journal (or a whole snapshot of it)
    PAIR_ACK = 0x52  # the passive applied and committed batches up to this sequence number
    LEASE = 0x53  # dispatcher -> witness: grant or renew the lease for an epoch
    LEASE_REPLY = 0x54  # witness -> dispatcher: granted or refused


_CMD_BY_BYTE = {bytes((c,)): c for c in Cmd}
_CMD_FRAME = {c: bytes((c,)) for c in Cmd}
_CMD_FRAME_PACKED = {c: bytes((c, PACKED)) for c in Cmd}


@dataclass(slots=True)
class Message:
    cmd: Cmd
    body: Any
    frames: list[bytes]


_pack_body = msgspec.msgpack.Encoder().encode  # typed bodies (commands.py) and plain values alike


def pack(obj: Any) -> bytes:
    return _pack_body(obj)


def unpack(data: bytes) -> Any:
    if len(data) > MAX_BODY_BYTES:
        raise ProtocolError("message body too large")
    count = None if len(data) <= SMALL_BODY else _container_budget(len(data) // CONTAINER_BYTES)
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=False,
        max_array_len=MAX_ARRAY_LEN,
        max_map_len=MAX_MAP_LEN,
        max_ext_len=0,  # bodies never hold extension types (timestamps included)
        list_hook=count,
        object_hook=count,
    )


def _container_budget(budget: int) -> Callable[[Any], Any]:
    """A hook msgpack calls for each array and map it builds: it refuses the body past `budget` of them."""

    def count(container: Any) -> Any:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise ProtocolError("message body holds too many arrays and maps for its size")
        return container

    return count


def encode(cmd: Cmd, body: Any = None, frames: Sequence[Any] = (), epoch: int = 0) -> list[Any]:
    """The frames of one message (without the ROUTER envelope); several small data frames go packed.
    `epoch` > 0 goes in the command frame (a standby pair)."""
    if epoch:
        parts = encode(cmd, body, frames)
        flags = PACKED if len(parts[1]) == 2 else 0
        parts[1] = bytes((cmd, flags | EPOCH)) + epoch.to_bytes(8, "big")
        return parts
    if len(frames) < 2:
        return [SIGNATURE, _CMD_FRAME[cmd], _pack_body(body), *frames]
    lengths: list[int] = []
    small: list[Any] = []
    large: list[Any] = []
    packed = 0
    for frame in frames:
        n = len(frame) if type(frame) is bytes else memoryview(frame).nbytes
        if n <= PACK_LIMIT and packed + n <= PACK_MAX:
            lengths.append(n)
            small.append(frame)
            packed += n
        else:
            lengths.append(-1)
            large.append(frame)
    if len(small) < 2:
        return [SIGNATURE, _CMD_FRAME[cmd], _pack_body(body), *frames]
    return [SIGNATURE, _CMD_FRAME_PACKED[cmd], _pack_body(body), _pack_body(lengths), b"".join(small), *large]


def decode(parts: Sequence[Any]) -> Message:
    """Parse the frames of one message (envelope already removed), its body as plain msgpack values.

    Raises VersionMismatch for another Conveyor version and ProtocolError for anything malformed.
    Peers read typed bodies instead: commands.decode_message.
    """
    cmd, raw, frames = split(parts)
    try:
        body = unpack(raw)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for bad input
        raise ProtocolError(f"bad msgpack body: {type(exc).__name__}") from None
    return Message(cmd, body, frames)


def split(parts: Sequence[Any]) -> tuple[Cmd, bytes, list[Any]]:
    """(command, raw body, data frames) of one message; the body is not decoded."""
    if len(parts) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(parts)}")
    sig = bytes(parts[0])
    if sig != SIGNATURE:
        if sig.startswith(SIGNATURE_PREFIX):
            raise VersionMismatch(f"peer speaks {sig!r}, this dispatcher speaks {SIGNATURE!r}")
        raise ProtocolError("not a Conveyor message")
    cmd_frame = bytes(parts[1])
    packed = len(cmd_frame) == 2 and cmd_frame[1] == PACKED
    if len(cmd_frame) != 1 and not packed:
        if len(cmd_frame) != 10 or cmd_frame[1] & ~(PACKED | EPOCH) or not cmd_frame[1] & EPOCH:
            raise ProtocolError("command frame must be one byte, or the command, its flags and an epoch")
        packed = bool(cmd_frame[1] & PACKED)
    cmd = _CMD_BY_BYTE.get(cmd_frame[:1])
    if cmd is None:
        raise ProtocolError(f"unknown command 0x{cmd_frame[0]:02x}")
    raw = bytes(parts[2])
    if len(raw) > MAX_BODY_BYTES:
        raise ProtocolError("message body too large")
    return cmd, raw, _unpacked(parts) if packed else list(parts[3:])


def frame_epoch(command_frame: Any) -> int:
    """The epoch a message's command frame carries (0: none)."""
    raw = bytes(command_frame)
    return int.from_bytes(raw[2:10], "big") if len(raw) == 10 else 0


def _unpacked(parts: Sequence[Any]) -> list[Any]:
    """The data frames of a packed message: pieces of the pack, and the large frames as they came."""
    if len(parts) < 5:
        raise ProtocolError("a packed message needs its lengths and its pack")
    try:
        lengths = unpack(bytes(parts[3]))
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"bad msgpack frame lengths: {type(exc).__name__}") from None
    if type(lengths) is not list:
        raise ProtocolError("packed frame lengths must be an array")
    # Copied out as bytes: the small frames of a batch then live and die each with its own job
    # instead of keeping the whole message alive, and a bytes object is smaller than a memoryview.
    pack = bytes(parts[4])
    large = parts[5:]
    frames: list[Any] = []
    pos = n_large = 0
    for n in lengths:
        if type(n) is not int or n < -1:
            raise ProtocolError("a packed frame length must be an integer >= -1")
        if n == -1:
            if n_large >= len(large):
                raise ProtocolError("fewer large frames than packed lengths say")
            frames.append(large[n_large])
            n_large += 1
        else:
            end = pos + n
            if end > len(pack):
                raise ProtocolError("packed lengths run past the pack")
            frames.append(pack[pos:end])
            pos = end
    if pos != len(pack) or n_large != len(large):
        raise ProtocolError("packed lengths do not cover the pack and the large frames")
    return frames


def split_frames(counts: Sequence[int], frames: list[bytes]) -> list[list[bytes]]:
    """Cut the data frames of a batch into one list per entry, given each entry's frame count."""
    out: list[list[bytes]] = []
    pos = 0
    for n in counts:
        if not isinstance(n, int) or n < 0 or pos + n > len(frames):
            raise ProtocolError("frame counts do not match the data frames")
        out.append(frames[pos : pos + n])
        pos += n
    if pos != len(frames):
        raise ProtocolError("extra data frames")
    return out

"""Frame size limits every peer applies: a frame over a receiver's ZMQ_MAXMSGSIZE drops the whole
connection, so senders refuse such frames before sending them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_MAX_MESSAGE_SIZE = 512 * 1024 * 1024  # ZMQ_MAXMSGSIZE: the largest single frame a socket accepts

def oversized(frames: Sequence[Any], limit: int) -> int | None:
    """The size of the first frame larger than `limit` bytes, or None."""
    for frame in frames:
        n = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
        if n > limit:
            return n
    return None


def check_frames(frames: Sequence[Any], limit: int, what: str = "the task's call") -> None:
    """Raise ValueError if a frame would make the dispatcher drop the connection (ZMQ_MAXMSGSIZE)."""
    n = oversized(frames, limit)
    if n is not None:
        raise ValueError(
            f"{what} has a frame of {n} bytes, over the {limit}-byte max_message_size of Conveyor's sockets "
            "(raise it on the dispatcher, workers and clients alike, e.g. --max-message-mib)"
        )

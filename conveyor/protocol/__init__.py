"""Conveyor's wire protocol, pure code with no sockets (docs/protocol.md is its specification):

    frames.py     the frame layout, commands, encode/decode, packing, body limits
    commands.py   one typed body per command
    payload.py    task calls and values (data frames)
    failures.py   error records: how a failure travels
    limits.py     frame size limits
    durations.py  durations as people write them ("10m")
"""

from conveyor.errors import ProtocolError, VersionMismatch
from conveyor.protocol.frames import (
    PROTOCOL_VERSION,
    SIGNATURE,
    Cmd,
    Message,
    decode,
    encode,
    split_frames,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SIGNATURE",
    "Cmd",
    "Message",
    "ProtocolError",
    "VersionMismatch",
    "decode",
    "encode",
    "split_frames",
]

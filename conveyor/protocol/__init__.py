"""Conveyor's wire protocol: message framing, task payloads and error records. Pure code, no sockets."""

from conveyor.protocol.messages import (
    PROTOCOL_VERSION,
    SIGNATURE,
    Cmd,
    Message,
    ProtocolError,
    VersionMismatch,
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

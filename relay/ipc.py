"""The pipe between the relay and a camera's worker process.

Sans-io: bytes in, messages out. Worker -> relay messages are a fixed header
and a payload; relay -> worker commands are single bytes.

Why a process: PyAV and numpy hold the GIL through a whole JPEG decode or a
pattern render, stalling the event loop (and every viewer's packets) for tens
of milliseconds. In its own process the camera work never touches the loop.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!BBqdI")  # type, flags, pts, capture time, payload length
MAX_PAYLOAD = 64 * 1024 * 1024  # no frame is this big; a larger length means a corrupt stream

UNIT = 1  # one H.264 access unit (Annex B)
JPEG = 2  # one JPEG frame as the camera sent it
STATUS = 3  # JSON: state, size, fps, encoder, counters
LOG = 4  # JSON: level, logger, message

# A stream's state as a STATUS message reports it while its encoder cannot encode.
ENCODER_ERROR = "encoder_error"

FLAG_KEYFRAME = 1
FLAG_FORCED = 2

CMD_KEYFRAME = b"K"
CMD_JPEG_ON = b"J"
CMD_JPEG_OFF = b"j"
CMD_MAX_FPS = b"R"  # followed by one byte: the highest frame rate to encode (0: no limit)


class ProtocolError(Exception):
    pass


@dataclass(slots=True)
class Message:
    kind: int
    flags: int
    pts: int
    capture_time: float
    payload: bytes

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & FLAG_KEYFRAME)

    @property
    def forced(self) -> bool:
        return bool(self.flags & FLAG_FORCED)

    def json(self) -> dict:
        return json.loads(self.payload)


def pack(kind: int, payload: bytes, *, flags: int = 0, pts: int = 0, capture_time: float = 0.0) -> bytes:
    return HEADER.pack(kind, flags, pts, capture_time, len(payload)) + payload


def pack_json(kind: int, obj: dict) -> bytes:
    return pack(kind, json.dumps(obj, separators=(",", ":")).encode())


def parse_header(header: bytes) -> tuple[int, int, int, float, int]:
    kind, flags, pts, capture_time, length = HEADER.unpack(header)
    if kind not in (UNIT, JPEG, STATUS, LOG):
        raise ProtocolError(f"unknown message type {kind}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"message of {length} bytes is over the {MAX_PAYLOAD} limit")
    return kind, flags, pts, capture_time, length


def parse(data: bytes) -> tuple[list[Message], bytes]:
    """Whole messages from ``data``, and the bytes left over for the next read."""
    out = []
    offset = 0
    while len(data) - offset >= HEADER.size:
        kind, flags, pts, capture_time, length = parse_header(data[offset : offset + HEADER.size])
        end = offset + HEADER.size + length
        if len(data) < end:
            break
        out.append(Message(kind, flags, pts, capture_time, data[offset + HEADER.size : end]))
        offset = end
    return out, data[offset:]


def parse_commands(data: bytes) -> tuple[list[tuple[bytes, int | None]], bytes]:
    """Relay -> worker commands in ``data``: (command, argument or None) each, and an
    incomplete tail to prepend to the next read. Unknown bytes are skipped."""
    out: list[tuple[bytes, int | None]] = []
    i = 0
    while i < len(data):
        cmd = data[i : i + 1]
        if cmd == CMD_MAX_FPS:
            if i + 1 >= len(data):
                return out, data[i:]
            out.append((cmd, data[i + 1]))
            i += 2
            continue
        if cmd in (CMD_KEYFRAME, CMD_JPEG_ON, CMD_JPEG_OFF):
            out.append((cmd, None))
        i += 1
    return out, b""

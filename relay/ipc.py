"""The boundary between the relay and a camera's worker process.

Sans-io: bytes in, messages out. A worker process runs one camera or several
(``[video] cameras_per_worker``: RTSP cameras passed through share one). Worker
-> relay messages are a fixed header, which names the camera (its index in the
worker), and a payload; relay -> worker commands are a camera's index and a
byte (and its argument, for some). What crosses is typed: the worker's
settings (``WorkerConfig`` per camera, a JSON list in its environment) and
its status (``WorkerStatus``, a JSON ``STATUS`` message), each with its own
``to_json`` and ``from_json``; the relay reads the pipe with ``Reader``, over
the same ``parse`` the tests cut at every boundary.

Why a process: PyAV and numpy hold the GIL through a whole JPEG decode or a
pattern render, stalling the event loop (and every viewer's packets) for tens
of milliseconds. In its own process the camera work never touches the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import time
import typing
from dataclasses import dataclass, field

HEADER = struct.Struct("!BBHqdI")  # type, flags, camera (index in the worker), pts, capture time, payload length
MAX_PAYLOAD = 64 * 1024 * 1024  # no frame is this big; a larger length means a corrupt stream

UNIT = 1  # one H.264 access unit (Annex B)
JPEG = 2  # one JPEG frame as the camera sent it
STATUS = 3  # JSON: state, size, fps, encoder, counters
LOG = 4  # JSON: level, logger, message
# One Opus packet (20 ms): pts in 48 kHz samples of the capture clock (the wall clock, as a unit's capture time),
# capture time of its first sample as a receiver decodes it.
AUDIO = 5

# A stream's state as a STATUS message reports it while its encoder cannot encode.
ENCODER_ERROR = "encoder_error"
ENCODERS = ("auto", "libx264", "h264_v4l2m2m")  # what WorkerConfig.encoder may name
WORKER_CONFIG_ENV = "CAMRELAY_WORKER_CONFIG"  # the worker's cameras: a JSON list of WorkerConfig (configs_to_json)

FLAG_KEYFRAME = 1
FLAG_FORCED = 2
FLAG_PASSTHROUGH = 4  # the camera's own access unit, neither decoded nor encoded here
# The payload starts with where each NAL unit of the unit begins (``Message.nals``): a 16-bit count, then each
# offset (32 bits) into the unit that follows. A camera's unit as camrelay's depacketizer gathered it carries them,
# so the relay packetizes it without scanning it for start codes; an encoded unit does not (the relay scans).
FLAG_NALS = 8
NAL_COUNT = struct.Struct("!H")
START_CODE_BYTES = 4  # before each NAL unit of a unit with offsets (h264.START_CODE)
# At most this many NAL units in a unit with offsets (a count past it is a corrupt stream): a 4K picture in 8 slices,
# with SEI, parameter sets and a delimiter, is a dozen or two. A unit with more goes without (the relay scans it).
MAX_NALS = 1024

CMD_KEYFRAME = b"K"
# At most one forced IDR per this many seconds per stream (the worker's limit): a storm of PLIs from many
# viewers must not turn the stream into all keyframes. The relay's hub starts a joiner that comes within it of a
# keyframe from that keyframe (``relay.hub.PacketHub``: one forced IDR serves every joiner of its window).
KEYFRAME_MIN_INTERVAL = 0.5
CMD_JPEG_ON = b"J"
CMD_JPEG_OFF = b"j"
CMD_MAX_FPS = b"R"  # followed by one byte: the highest frame rate to encode (0: no limit)
# JPEGs of keyframes only, followed by one byte: the fewest seconds between two (a recorder's snapshots). A camera
# passed through then decodes one picture a GOP or an interval, whichever is rarer, not every one.
CMD_JPEG_KEYFRAMES = b"k"
# Start the camera afresh in its worker (a new pipeline, its counters carried on): the relay's handling of its
# messages failed. The worker's other cameras go on.
CMD_RESTART = b"X"

# Seconds a camera may send nothing (no frame, no slate: it sends the slate when its source has nothing) before it
# is taken as stuck: its worker process killed by the relay's watchdog when no camera of it sends, the camera alone
# started afresh by its worker's watch when others of it do. A fresh process or camera is given
# OUTPUT_STARTUP_GRACE first: it imports PyAV and opens its source.
OUTPUT_STALL = 3.0
OUTPUT_STARTUP_GRACE = 15.0


# Cameras one worker process may run: a command names its camera in one byte.
MAX_CAMERAS_PER_WORKER = 255
# Bytes of WORKER_CONFIG_ENV's value: Linux refuses a process whose one environment string ("NAME=value") is over
# MAX_ARG_STRLEN (128 KiB), and 255 cameras with long URLs would pass it. The relay splits a group past this.
MAX_CONFIG_ENV = 120 * 1024


class ProtocolError(Exception):
    pass


@dataclass(slots=True)
class Message:
    kind: int
    flags: int
    camera: int  # which of the worker's cameras (its index in the worker's configs); 0 for a worker of one
    pts: int
    capture_time: float
    payload: bytes
    # Where each NAL unit of a UNIT begins in ``payload`` (its header byte, after a 4-byte start code; each ends where
    # the next one's start code begins: ``h264.nals_at``), when the worker knew (FLAG_NALS); None otherwise.
    nals: tuple[int, ...] | None = None

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & FLAG_KEYFRAME)

    @property
    def forced(self) -> bool:
        return bool(self.flags & FLAG_FORCED)

    @property
    def passthrough(self) -> bool:
        return bool(self.flags & FLAG_PASSTHROUGH)

    def json(self) -> dict:
        return json.loads(self.payload)


def pack(
    kind: int,
    payload: bytes,
    *,
    flags: int = 0,
    pts: int = 0,
    capture_time: float = 0.0,
    camera: int = 0,
    nals: tuple[int, ...] | None = None,
) -> bytes:
    """One message; ``nals``, where each NAL unit of a UNIT's ``payload`` begins (``Message.nals``), goes in front
    of it (FLAG_NALS) when given and not over ``MAX_NALS``."""
    if nals is None or len(nals) > MAX_NALS:
        return HEADER.pack(kind, flags & ~FLAG_NALS, camera, pts, capture_time, len(payload)) + payload
    head = _offsets(len(nals)).pack(len(nals), *nals)
    return HEADER.pack(kind, flags | FLAG_NALS, camera, pts, capture_time, len(head) + len(payload)) + head + payload


@functools.cache
def _offsets(count: int) -> struct.Struct:
    """The count and ``count`` offsets in front of a unit with FLAG_NALS."""
    return struct.Struct(f"!H{count}I")


def _nals(view: memoryview, start: int, end: int) -> tuple[tuple[int, ...], int]:
    """(the offsets of a FLAG_NALS payload at ``start`` of ``view``, ending at ``end``; where its unit begins);
    ``ProtocolError`` unless each lies in the unit, after a start code that follows the last NAL unit's first byte
    (none of them empty)."""
    if end - start < NAL_COUNT.size:
        raise ProtocolError("unit with NAL offsets too short for their count")
    (count,) = NAL_COUNT.unpack_from(view, start)
    if count == 0:  # a unit has one NAL unit at least: none named is no unit's places (nals_at would fail on them)
        raise ProtocolError("unit with NAL offsets names none")
    fmt = _offsets(count) if count <= MAX_NALS else None
    if fmt is None or end - start < fmt.size:
        raise ProtocolError(f"unit with {count} NAL offsets does not hold them")
    nals = fmt.unpack_from(view, start)[1:]
    size, last = end - start - fmt.size, -1
    for offset in nals:
        if offset <= last + START_CODE_BYTES or offset >= size:
            raise ProtocolError(f"NAL offset {offset} out of order or past its {size}-byte unit")
        last = offset
    return nals, start + fmt.size


def pack_json(kind: int, obj: dict, camera: int = 0) -> bytes:
    return pack(kind, json.dumps(obj, separators=(",", ":")).encode(), camera=camera)


KINDS = frozenset((UNIT, JPEG, STATUS, LOG, AUDIO))
# A camera's Opus packet goes to each viewer as one RTP payload in one datagram: at most what a 1,500-byte MTU
# carries after IP, UDP, RTP with camrelay's extensions and SRTP's tag. Opus at its highest rate (510 kbit/s)
# makes 1,275 bytes in 20 ms. A worker drops a camera's packet over it (``relay.rtpaudio``).
MAX_AUDIO_PAYLOAD = 1400
# Each kind's largest payload: a length past it is a corrupt or hostile worker's, refused before it is read (a
# status or log line of megabytes is no worker's; the send paths refuse a payload over a datagram, and once did
# so by ending the viewer's send loop).
MAX_PAYLOADS = {UNIT: MAX_PAYLOAD, JPEG: MAX_PAYLOAD, STATUS: 1 << 20, LOG: 1 << 20, AUDIO: MAX_AUDIO_PAYLOAD}
# A pts any clock of a worker's gives (90 kHz or 48 kHz ticks of the wall clock: about 2**47 today) by far; a
# viewer's timeline adds offsets to it in 64 bits.
MAX_PTS = 1 << 60
# Seconds since the epoch a capture time may be (the year 2286): a recording names its files from it.
MAX_CAPTURE_TIME = 1e10


def parse_header(header: bytes | memoryview, offset: int = 0) -> tuple[int, int, int, int, float, int]:
    """(type, flags, camera, pts, capture time, payload length) of the header at ``offset``; ``ProtocolError``
    if corrupt."""
    kind, flags, camera, pts, capture_time, length = fields = HEADER.unpack_from(header, offset)
    if kind not in KINDS:
        raise ProtocolError(f"unknown message type {kind}")
    if length > MAX_PAYLOADS[kind]:
        raise ProtocolError(f"message of type {kind} of {length} bytes is over its {MAX_PAYLOADS[kind]} limit")
    if not -MAX_PTS <= pts <= MAX_PTS:
        raise ProtocolError(f"pts {pts} is out of range")
    if not -MAX_CAPTURE_TIME <= capture_time <= MAX_CAPTURE_TIME:  # NaN too
        raise ProtocolError(f"capture time {capture_time} is out of range")
    return fields


def _split(data: bytes | bytearray | memoryview) -> tuple[list[Message], int]:
    """Whole messages from the start of ``data``, and how many bytes they took (each payload copied once)."""
    out = []
    offset, size = 0, len(data)
    with memoryview(data) as view:
        while size - offset >= HEADER.size:
            kind, flags, camera, pts, capture_time, length = parse_header(view, offset)
            end = offset + HEADER.size + length
            if size < end:
                break
            start, nals = offset + HEADER.size, None
            if flags & FLAG_NALS:
                nals, start = _nals(view, start, end)
            out.append(Message(kind, flags, camera, pts, capture_time, bytes(view[start:end]), nals))
            offset = end
    return out, offset


def parse(data: bytes) -> tuple[list[Message], bytes]:
    """Whole messages from ``data``, and the bytes left over for the next read."""
    messages, used = _split(data)
    return messages, data[used:]


class Reader:
    """Whole messages out of a byte stream however it is cut (``parse``, keeping what is left between reads)."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """The messages ``data`` completes; ``ProtocolError`` for a corrupt stream. A read that starts with a
        message (most: the worker writes each whole) is parsed where it lies; only what a message still lacks
        is kept."""
        if self._pending:
            self._pending += data
            messages, used = _split(self._pending)
            del self._pending[:used]
            return messages
        messages, used = _split(data)
        self._pending += memoryview(data)[used:]
        return messages


def command(camera: int, cmd: bytes) -> bytes:
    """Relay -> worker: ``cmd`` (a command byte, and its argument byte for some) for the worker's camera ``camera``."""
    return bytes([camera]) + cmd


_WITH_ARGUMENT = (CMD_MAX_FPS, CMD_JPEG_KEYFRAMES)
_WITHOUT_ARGUMENT = (CMD_KEYFRAME, CMD_JPEG_ON, CMD_JPEG_OFF, CMD_RESTART)


def parse_commands(data: bytes) -> tuple[list[tuple[int, bytes, int | None]], bytes]:
    """Relay -> worker commands in ``data``: (camera, command, argument or None) each, and an incomplete tail to
    prepend to the next read. An unknown command byte is skipped with its camera's."""
    out: list[tuple[int, bytes, int | None]] = []
    i = 0
    while i < len(data):
        if i + 1 >= len(data):
            return out, data[i:]
        camera, cmd = data[i], data[i + 1 : i + 2]
        if cmd in _WITH_ARGUMENT:
            if i + 2 >= len(data):
                return out, data[i:]
            out.append((camera, cmd, data[i + 2]))
            i += 3
            continue
        if cmd in _WITHOUT_ARGUMENT:
            out.append((camera, cmd, None))
        i += 2
    return out, b""


# -- what crosses, typed


@functools.cache
def _fields(cls) -> tuple[tuple[str, type], ...]:
    """(name, type) of each field of the dataclass ``cls``, its annotations resolved once (``get_type_hints``
    took 0.3 ms, and the relay read a status a second per camera)."""
    types = typing.get_type_hints(cls)
    return tuple((f.name, types[f.name]) for f in dataclasses.fields(cls))


def from_json(cls, data: bytes | str):
    """An instance of the dataclass ``cls`` from a JSON object holding every one of its fields, each of its type;
    ``ValueError`` (or ``KeyError``, ``TypeError``) otherwise."""
    raw = json.loads(data)
    if not isinstance(raw, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object")
    values = {}
    for name, kind in _fields(cls):
        value = raw[name]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise TypeError(f"{cls.__name__}.{name}: expected {kind.__name__}, got {value!r}")
        values[name] = value
    return cls(**values)


def to_json(obj) -> bytes:
    """The dataclass ``obj`` (plain values only: what crosses is flat) as a JSON object."""
    return json.dumps({name: getattr(obj, name) for name, _ in _fields(type(obj))}, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    bitrate: int  # bits per second
    fps: float
    keyframe_interval: float  # seconds between regular IDRs
    encoder: str = "auto"  # one of ENCODERS


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a camera's worker runs: its source and how to encode it."""

    name: str
    source: str  # the source spec as given (an RTSP camera's URL with its password: never in argv)
    width: int
    height: int
    fps: float
    bitrate: int
    keyframe_interval: float
    encoder: str
    log_level: str = "info"
    mode: str = "auto"  # relay.source.MODES: the stream's #mode=, else [video] mode
    # what the worker captures sound from (relay.source.audio_source): "" none, "test" the test sound, "track" the
    # source's own track (an RTSP camera's, a file's)
    audio: str = ""

    def to_json(self) -> str:
        return to_json(self).decode()

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkerConfig:
        return from_json(cls, data)


def configs_to_json(configs: list[WorkerConfig]) -> str:
    """A worker's cameras, in the order their messages and commands number them: what ``WORKER_CONFIG_ENV`` holds."""
    return "[" + ",".join(c.to_json() for c in configs) + "]"


def configs_from_json(data: bytes | str) -> list[WorkerConfig]:
    """The cameras ``configs_to_json`` wrote: 1 to ``MAX_CAMERAS_PER_WORKER`` of them; ``ValueError`` (or
    ``KeyError``, ``TypeError``) otherwise."""
    raw = json.loads(data)
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CAMERAS_PER_WORKER:
        raise ValueError(f"WorkerConfig list: expected 1 to {MAX_CAMERAS_PER_WORKER} of them")
    return [WorkerConfig.from_json(json.dumps(item)) for item in raw]


@dataclass(slots=True)
class Counters:
    """What a stream's worker counts, and the relay adds up across the workers it has run."""

    frames_captured: int = 0
    frames_encoded: int = 0
    frames_dropped_encoder_busy: int = 0
    frames_dropped_corrupt: int = 0
    frames_slate: int = 0
    frames_dropped_thermal: int = 0
    frames_dropped_source_loss: int = 0  # a camera's units lost on the network (camrelay's RTSP client's count)
    frames_decoded: int = 0  # pictures decoded: every frame when transcoding, only for JPEGs when passing through
    keyframes: int = 0
    keyframes_forced: int = 0
    bytes_encoded: int = 0
    encode_ms: float = 0.0
    source_errors: int = 0
    last_error: str = ""
    audio_frames_captured: int = 0  # PCM blocks (20 ms) read from the audio source
    audio_frames_encoded: int = 0  # Opus packets (the relay counts those it receives)
    audio_frames_dropped_overrun: int = 0  # blocks the audio source lost because they were not read in time
    audio_source_errors: int = 0
    audio_packets_dropped: int = 0  # RTP packets of a camera's sound that could not be read (or came late)
    audio_cpu_seconds: float = 0.0  # of the worker's audio thread: capture and Opus encode
    # Times the camera was started afresh inside its worker process (stuck, silent, failed): the others went on
    camera_restarts: int = 0
    audio_restarts: int = 0  # its sound's thread taken as hung and the sound started afresh (the video untouched)
    # Encode threads started (the slate's, a transcode's): each one's first picture waits for PyAV's import and x264's
    # open, so the relay's watchdog gives the process a fresh one's grace when this grows.
    encode_starts: int = 0


# Counters the worker's STATUS reports for the relay to add up; the relay counts the encoded frames itself.
WORKER_COUNTERS = (
    "frames_captured",
    "frames_dropped_encoder_busy",
    "frames_dropped_corrupt",
    "frames_dropped_thermal",
    "frames_dropped_source_loss",
    "frames_slate",
    "frames_decoded",
    "source_errors",
    "audio_frames_captured",
    "audio_frames_dropped_overrun",
    "audio_source_errors",
    "audio_packets_dropped",
    "audio_cpu_seconds",
    "camera_restarts",
    "audio_restarts",
    "encode_starts",
)


@dataclass(slots=True)
class WorkerStatus(Counters):
    """A worker's STATUS message: its counters so far, its source's state and size, its encoder."""

    slate: bool = False  # showing the no-signal slate now
    source_opens: int = 0
    state: str = "starting"  # starting, live, retrying, no_signal, ENCODER_ERROR
    width: int = 0
    height: int = 0
    fps: float = 0.0
    encoder: str = ""  # "none" while the source is passed through and no slate shows
    encoders_running: int = 0
    mode: str = ""  # "passthrough" or "transcode" once the source is open; "" before
    mode_reason: str = ""  # why (relay.source.decide_mode)
    codec: str = ""  # what the source delivers, FFmpeg's name: h264, hevc, mjpeg; "test pattern"
    profile: str = ""  # the source's H.264 profile, level and size ("High 4.0 1920x1080"), when it sends H.264
    reader: str = ""  # what reads the source: "rtspin" (camrelay's RTSP client), "ffmpeg", "test pattern"
    audio: str = ""  # the audio source ("test sound"); "" without sound
    audio_state: str = "off"  # off, starting, live, retrying
    audio_codec: str = ""  # "opus" once its encoder is open
    audio_channels: int = 0
    audio_bitrate: int = 0  # bits a second the Opus encoder is set to
    audio_encode_ms: float = 0.0  # one 20 ms frame's encode, smoothed
    audio_last_error: str = ""
    # Why the camera needs a worker process of its own ("" if not): in a shared one it turned out to need a
    # transcode or FFmpeg's demuxer (which hold the GIL the others share); it stopped, for the relay to move it.
    own_process: str = ""
    started: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return to_json(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkerStatus:
        return from_json(cls, data)

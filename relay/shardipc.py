"""The boundary between the relay and its fan-out shards (``[webrtc] shards`` > 1).

Sans-io: bytes in, messages out, both ways over the shard's stdin and stdout.
Every message is a fixed header and a payload. Frames (``VIDEO``, ``AUDIO``)
carry one encoded frame of one stream, named by a small number the relay gave
it (``STREAM`` says which name it stands for), once per shard whatever the
number of its viewers. Everything else is one typed dataclass as JSON (the
``ipc`` helpers: every field present and of its type), one kind each:

    relay -> shard: STREAM (StreamName), OFFER (Offer), TRICKLE (Trickle), HANGUP (Hangup), frames
    shard -> relay: REPLY (Reply), EVENT (SessionEvent), KEYFRAME (stream number; flags: why),
                    STATS (ShardStats), LOG (LogLine)

The shard's own settings (``ShardConfig``) are JSON in its environment, never
in its arguments; a viewer's TURN credentials come with its offer, minted by
the relay, and the secret they are minted from never leaves the relay.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .ipc import ProtocolError, from_json, to_json

# type, flags, stream number, pts, capture time, the relay's publish time, payload length
HEADER = struct.Struct("!BBHqddI")
MAX_PAYLOAD = 64 * 1024 * 1024  # no frame or offer is this big; a larger length means a corrupt stream
# What the relay reads from a shard: never a frame, only answers (an SDP answer: a few KiB), events, figures (at
# most REPORTED_DELAYS delays a stream: ~10 KiB each) and log lines (cut at MAX_LOG_TEXT); a larger length is a
# corrupt or runaway shard, not 64 MiB held in the relay's memory.
MAX_SHARD_PAYLOAD = 1024 * 1024
MAX_LOG_TEXT = 64 * 1024  # characters of one forwarded log line (a traceback fits); longer ones are cut
# Fan-out delays sent to the relay per stream per report: 30 viewers' worth of 30 fps, a few KiB of JSON a second;
# more viewers' are left out of the relay's percentiles (the shard's own window still has them). More is refused.
REPORTED_DELAYS = 900
SHARD_CONFIG_ENV = "CAMRELAY_SHARD_CONFIG"  # the shard's ShardConfig, as JSON

VIDEO = 1  # one H.264 access unit of a stream's hub
AUDIO = 2  # one Opus packet of a stream's audio hub
STREAM = 3  # StreamName: the stream a number stands for, sent before its first frame
OFFER = 4
TRICKLE = 5
HANGUP = 6
REPLY = 7
EVENT = 8
KEYFRAME = 9  # a shard's viewers want a keyframe of the stream (a join; FLAG_LAG: laggards; FLAG_VIEWER: PLI, FIR)
STATS = 10
LOG = 11
KINDS = frozenset(range(VIDEO, LOG + 1))

FLAG_KEYFRAME = 1  # frames: decodes on its own
FLAG_CACHING = 2  # frames: the stream starts joiners from its GOP cache now (relay.stream.Stream.starts_from_cache)
FLAG_LAG = 1  # KEYFRAME: asked for laggards (the stream's KeyframeGate), else for a join
FLAG_VIEWER = 2  # KEYFRAME: a viewer's PLI or FIR, each one (the stream's gate for viewers decides: relay.hub)


@dataclass(slots=True)
class Message:
    kind: int
    flags: int
    stream: int
    pts: int
    capture_time: float
    published_at: float
    payload: bytes


def pack(
    kind: int,
    payload: bytes,
    *,
    flags: int = 0,
    stream: int = 0,
    pts: int = 0,
    capture_time: float = 0.0,
    published_at: float = 0.0,
) -> bytes:
    return HEADER.pack(kind, flags, stream, pts, capture_time, published_at, len(payload)) + payload


def pack_json(kind: int, obj) -> bytes:
    """One of the dataclasses below as its message."""
    return pack(kind, to_json(obj))


class Reader:
    """Whole messages out of a byte stream however it is cut; ``ProtocolError`` for a corrupt one."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._pending = bytearray()
        self.max_payload = max_payload

    def feed(self, data: bytes) -> list[Message]:
        self._pending += data
        out = []
        offset, size = 0, len(self._pending)
        with memoryview(self._pending) as view:
            while size - offset >= HEADER.size:
                kind, flags, stream, pts, capture_time, published_at, length = HEADER.unpack_from(view, offset)
                if kind not in KINDS:
                    raise ProtocolError(f"unknown message type {kind}")
                if length > self.max_payload:
                    raise ProtocolError(f"message of {length} bytes is over the {self.max_payload} limit")
                end = offset + HEADER.size + length
                if size < end:
                    break
                payload = bytes(view[offset + HEADER.size : end])
                out.append(Message(kind, flags, stream, pts, capture_time, published_at, payload))
                offset = end
        del self._pending[:offset]
        return out


# -- what crosses, typed


class _Json:
    __slots__ = ()

    def to_bytes(self) -> bytes:
        return to_json(self)

    @classmethod
    def from_bytes(cls, data: bytes | str):
        return from_json(cls, data)


@dataclass(frozen=True, slots=True)
class ShardConfig(_Json):
    """What a shard runs with: its number, and the ``[webrtc]`` settings its viewers' sessions need."""

    index: int
    ice_addresses: list  # host candidates only on these (none: every interface)
    additional_hosts: list  # more host candidates in every answer (relay.webrtc.ice)
    connect_timeout: float
    batch_sends: bool
    playout_delay: list  # [min, max] ms, or [] for none
    max_lag: float  # [video] max_lag, the lag limit of every viewer
    log_level: str = "info"
    c_send: bool = True  # [webrtc] c_send: the C send path where it is built
    c_batch: bool = True  # [webrtc] c_batch: one C call a frame for every viewer of a stream


@dataclass(frozen=True, slots=True)
class StreamName(_Json):
    number: int
    name: str


@dataclass(frozen=True, slots=True)
class Offer(_Json):
    """A viewer's offer, checked by the relay (access, limits, SDP), for the shard to answer."""

    request: int
    stream: str
    sdp: str
    remote: str
    audio: bool  # send the stream's sound to the offer's audio section
    ice_servers: list  # [[urls...], username, credential] each: the relay's ICE servers, credentials minted for it


@dataclass(frozen=True, slots=True)
class Trickle(_Json):
    request: int
    session: str
    sdpfrag: str


@dataclass(frozen=True, slots=True)
class Hangup(_Json):
    request: int
    session: str
    why: str


@dataclass(frozen=True, slots=True)
class Reply(_Json):
    """The answer to a request: ``ok``, else ``error`` (``rejected``: the client's fault, a 400)."""

    request: int
    ok: bool
    session: str = ""
    sdp: str = ""
    error: str = ""
    rejected: bool = False


CONNECTED = "connected"
CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionEvent(_Json):
    session: str
    state: str  # CONNECTED or CLOSED
    why: str = ""


STATS_COUNTERS = (
    "delivered",
    "batched",
    "dropped",
    "resyncs",
    "audio_dropped",
    "retransmits",
    "retransmits_refused",
)  # per stream: never go down in one process
STATS_GAUGES = ("viewers", "connected")
STATS_KEYS = frozenset((*STATS_COUNTERS, *STATS_GAUGES, "fanout_delays"))


@dataclass(frozen=True, slots=True)
class ShardStats(_Json):
    """A shard's figures, once a second: per stream (its viewers' hubs in the shard), and its own CPU time."""

    streams: dict  # name -> COUNTERS and GAUGES (ints), "fanout_delays" (floats, at most REPORTED_DELAYS)
    cpu_seconds: float


@dataclass(frozen=True, slots=True)
class LogLine(_Json):
    level: int
    logger: str
    message: str

"""Configuration: one TOML file, overridden by ``CAMRELAY_*`` variables, overridden by flags.

Sans-io: ``load()`` takes the file's text, the environment and the flags as
plain values and returns a validated ``Config`` or raises ``ConfigError``
naming the key. ``camrelay.example.toml`` documents every key.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .auth import HASH_HELP, TOKEN_PATTERN, parse_hash
from .ipc import ENCODERS, MAX_CAMERAS_PER_WORKER
from .lag import DEFAULT_MAX_LAG, MAX_MAX_LAG, MIN_MAX_LAG
from .logsafe import redact, redact_url, url_passwords
from .sched import DEFAULT_SLICE, MAX_SLICE, MIN_SLICE
from .source import MODES, SourceSpec, parse_fps, parse_size, parse_source_spec

if TYPE_CHECKING:
    from aiortc import RTCIceServer

ENV_PREFIX = "CAMRELAY_"
STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # safe in URLs and file names: whole (is_stream_name)
# Names the RTSP server keeps: mediamtx's aliases of every path (all, all_others: a config naming one is refused
# whole, RTSP down for every stream), and camrelay's alias of its first stream (live: rtsp://host:8554/live).
RESERVED_STREAM_NAMES = ("live", "all", "all_others")
STREAM_NAME_RULE = "letters, digits, - or _ (at most 64), not " + ", ".join(RESERVED_STREAM_NAMES)


def is_stream_name(name: object) -> bool:
    """``name`` is a stream's name: ``STREAM_NAME`` whole (no newline after it), and not one the RTSP server keeps."""
    return isinstance(name, str) and STREAM_NAME.fullmatch(name) is not None and name not in RESERVED_STREAM_NAMES


MIN_BITRATE = 100_000  # below this H.264 at any useful size is mush
MAX_BITRATE = 50_000_000  # above this no Pi uplink or browser jitter buffer keeps up
MAX_VIEWERS_LIMIT = 10_000
# Bounds of durations, in seconds, with why: past these a value is a typo or an
# attack on the relay itself (a session held for ever, an encoder that cannot open).
DAY = 86_400.0
MAX_KEYFRAME_INTERVAL = 60.0  # x264's GOP is fps x this; a minute is already useless to a joining viewer
MIN_KEYFRAME_INTERVAL = 0.1
MAX_CONNECT_TIMEOUT = 300.0  # ICE and DTLS finish in seconds; five minutes covers the worst TURN path
MAX_SEGMENT = 3600.0  # one file an hour at most: a crash loses at most its last fragment anyway
MAX_AGE = 100 * 365 * DAY  # recordings kept longer than a century: surely a typo
MAX_SESSION_RATE = 1000.0  # new sessions per second per address
MIN_SESSION_RATE = 0.001  # one in a quarter of an hour: lower is a rate limit that never refills
MAX_BYTES = 2**60  # an exabyte: more is a typo
MAX_CONNECTIONS_LIMIT = 100_000  # http.max_connections: far beyond what a Pi's fds and memory hold
MAX_HEADER_TIMEOUT = 3600.0  # http.header_timeout: seconds; longer lets idle connections pile up for hours
# webrtc.turn_credential_lifetime: a minted TURN credential only has to last from the offer to the allocation
# (seconds), but the relay's and the TURN server's clocks may disagree by some; past a day it is no longer short.
MIN_TURN_LIFETIME = 60.0
# webrtc.playout_delay: the playout-delay RTP header extension (relay/webrtc/playout.py) carries each value in 12
# bits of 10 ms.
PLAYOUT_DELAY_UNIT_MS = 10
PLAYOUT_DELAY_MAX_MS = 0xFFF * PLAYOUT_DELAY_UNIT_MS  # 40.95 s
PLAYOUT_DELAY_OFF = ("off", "none", "false")
# webrtc.shards: fan-out processes serving the WebRTC viewers (relay.webrtc.shards). A Pi has 4 cores; more than
# this is a typo. "auto" is kept as 0 and decided from the cores at start (relay.webrtc.shards.shards_for).
MAX_SHARDS = 64
AUTO_SHARDS = 0
AUTH_MODES = ("token", "password", "none")
# How a viewer joining a stream (or one that fell behind) gets its first picture: "keyframe" forces an IDR for it,
# "cached_gop" starts it at once from the hub's cache of the current GOP, "auto" does the latter for streams that
# cannot force a keyframe (passthrough) and the former for the rest.
JOIN_POLICIES = ("auto", "cached_gop", "keyframe")
# Keys whose values are secrets: never quoted in an error, and worth a warning in a file others can read.
SECRET_KEYS = ("auth.token", "auth.password_hash", "rtsp.password", "webrtc.ice_credential", "webrtc.turn_secret")
ICE_SERVER_KEYS = ("urls", "username", "credential")  # a webrtc.ice_servers table: a browser's RTCIceServer
TURN_SCHEMES = ("turn:", "turns:")
# RFC 7064 and 7065 as aiortc parses them: a host name or IPv4 address (aiortc takes no [IPv6] literal), a port,
# and for TURN the transport to reach it over.
ICE_URL = re.compile(
    r"(?P<scheme>stuns?|turns?):[A-Za-z0-9.-]+(?::(?P<port>\d{1,5}))?(?P<query>\?transport=(?:udp|tcp))?"
)


def well_formed(url: str) -> bool:
    """Whether aiortc can gather with ``url``: one it cannot parse fails the peer connection it is given to."""
    m = ICE_URL.fullmatch(url)
    return bool(m) and not (m["query"] and m["scheme"].startswith("stun")) and 0 < int(m["port"] or 1) < 65536


class ConfigError(ValueError):
    """A configuration value is wrong; ``str()`` names the key, and no URL's password (it is printed, unfiltered)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


@dataclass(frozen=True, slots=True)
class StreamConfig:
    name: str
    source: SourceSpec


@dataclass(frozen=True, slots=True)
class VideoConfig:
    width: int = 1280
    height: int = 720
    fps: float = 30.0
    bitrate: int = 2_000_000  # bits per second
    keyframe_interval: float = 1.0  # seconds
    encoder: str = "auto"
    join: str = "auto"  # JOIN_POLICIES
    mode: str = "auto"  # one of source.MODES; a stream's #mode= overrides it
    # Seconds of video a viewer (any subscriber of a stream) may fall behind and still get every frame, late;
    # further behind it skips whole GOPs (relay.lag).
    max_lag: float = DEFAULT_MAX_LAG
    # RTSP cameras (over TCP, not transcoded) that share one worker process: each its own threads, its own stall
    # and output watch, one interpreter's fixed cost for all (docs/benchmarks.md, "Many cameras"). 8: measured
    # there (a camera's worker share 1.2 -> 0.6-0.8 % of a core; all of camrelay's memory a camera 34.6 -> 15.7 MiB
    # at 16 cameras); past 8 a camera saves little more (the interpreter's ~25 MiB split further) while more
    # cameras wait on one GIL while one draws its slate, and restart together when their process dies.
    cameras_per_worker: int = 8
    # Seconds of CPU slice camrelay's threads ask the scheduler for (relay.sched: picked sooner when they wake on a
    # busy machine, the same share of it); 0: the kernel's default.
    cpu_slice: float = DEFAULT_SLICE


@dataclass(frozen=True, slots=True)
class AudioConfig:
    enabled: bool = True  # streams carry their source's sound (the test pattern's); a spec's #audio= overrides it


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    cors_origins: tuple[str, ...] = ()  # other sites allowed to use WHEP from a browser; empty: same origin only
    # Host names (besides this machine's own names and addresses) requests may be addressed to; "*": any
    allowed_hosts: tuple[str, ...] = ()
    # Reverse proxies (addresses or networks) whose X-Forwarded-For and X-Forwarded-Proto are believed
    trusted_proxies: tuple[str, ...] = ()
    # Connections at once, all clients (and at most half the fd limit). A browser holds up to 6, mostly idle
    # (idle ones make room for new ones); an MJPEG client or a download 1 while it lasts.
    max_connections: int = 512
    # One address's share: a browser's 6, a dashboard's MJPEG streams (trusted_proxies are exempt).
    max_connections_per_address: int = 32
    # Seconds a connection has to send a request's headers, from connecting or from its previous response;
    # idle keep-alive connections are closed then too. A LAN client needs milliseconds.
    header_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: str = "token"  # token, password or none
    token: str = field(default="", repr=False)  # empty: generated on first start, kept in <state_dir>/viewer-token
    user: str = ""  # password mode: the user name for HTTP Basic
    password_hash: str = field(default="", repr=False)  # password mode: from `camrelay hash-password`
    protect_metrics: bool = True
    protect_healthz: bool = False


@dataclass(frozen=True, slots=True)
class IceServer:
    """One server as a browser's ``RTCIceServer`` describes it."""

    urls: tuple[str, ...]
    username: str = ""
    credential: str = field(default="", repr=False)

    @property
    def is_turn(self) -> bool:
        return any(url.startswith(TURN_SCHEMES) for url in self.urls)

    def to_aiortc(self) -> RTCIceServer:
        from aiortc import RTCIceServer

        return RTCIceServer(urls=list(self.urls), username=self.username or None, credential=self.credential or None)


@dataclass(frozen=True, slots=True)
class WebRTCConfig:
    ice_servers: tuple[IceServer, ...] = ()  # STUN and TURN servers; none means host candidates only
    ice_username: str = ""  # for TURN servers given as URLs, with no credential of their own
    ice_credential: str = field(default="", repr=False)
    turn_secret: str = field(default="", repr=False)  # coturn's static-auth-secret: per-session TURN credentials
    turn_credential_lifetime: float = 600.0  # seconds a minted TURN credential can start an allocation
    ice_addresses: tuple[str, ...] = ()  # empty: every interface but loopback
    additional_hosts: tuple[str, ...] = ()  # more host candidates: public addresses or names behind a port forward
    connect_timeout: float = 15.0
    max_viewers: int = 100  # per stream
    # All streams together. At 2 Mbit/s each, 200 viewers are 400 Mbit/s: well
    # inside a gigabit port, and about what one event loop can packetize.
    max_viewers_total: int = 200
    # Sessions still connecting (answered, ICE and DTLS not done), all streams:
    # what offers that never connect may hold (each a few sockets), freed after
    # connect_timeout. Per client address too, so one viewer with a few
    # addresses cannot take them all: a page of 8 tiles fits in one address's share.
    max_pending: int = 64
    max_pending_per_address: int = 8
    session_rate: float = 1.0  # new sessions per second per client address, after the burst
    session_burst: int = 20  # new sessions one address may open at once (a page with many tiles)
    # A viewer's datagrams of one event-loop pass leave in one segmented write (relay.webrtc.udpbatch); off: one
    # system call per datagram, as aiortc sends (the batcher's A/B, docs/benchmarks.md).
    batch_sends: bool = True
    # With batch_sends, a viewer's frame made, protected and written in one C call where that part is built
    # (relay/webrtc/_fastsend.c, relay.webrtc.rtpsend.C_SEND); off: the Python path (the C path's A/B).
    c_send: bool = True
    # With c_send, one C call a published frame sends it to every live viewer of the stream that can take it now
    # (relay.webrtc.rtpsend.push_batch); off: one C call a viewer-frame (the batch's A/B).
    c_batch: bool = True
    # The playout-delay header extension sent to viewers that offer it, (min, max) in ms; None: not negotiated,
    # as aiortc does (docs/benchmarks.md, "Playout delay", for why the default).
    playout_delay: tuple[int, int] | None = (0, 0)
    # Fan-out processes the viewers' peer connections live in (relay.webrtc.shards); 1: in the relay's own process;
    # AUTO_SHARDS ("auto"): from the number of cores.
    shards: int = AUTO_SHARDS


@dataclass(frozen=True, slots=True)
class RtspConfig:
    enabled: bool = True
    host: str = ""  # "" or "0.0.0.0": every interface
    port: int = 8554
    rtp_port: int = 8000  # RTP over UDP to readers that ask for it
    rtcp_port: int = 8001
    api_port: int = 9997  # no longer used (mediamtx runs without its control API); accepted so old files start
    user: str = ""  # read credentials; empty: anyone on the network may read
    password: str = field(default="", repr=False)
    publish_url: str = ""  # an RTSP server of the user's own (rtsp://host:port): publish there, run no mediamtx
    mediamtx: str = ""  # the binary; empty: bin/mediamtx, else PATH
    # Go scheduler threads (GOMAXPROCS) of camrelay's mediamtx; 0: Go's default, one per core. With one, its
    # goroutines hand each packet on without waking another thread: 18 % less of its CPU at 5 cameras here
    # (docs/benchmarks.md, "Many cameras", 2026-11-30). Not the default: one thread caps every NVR reader and
    # mediamtx's garbage collection at one core, which many cameras and readers on a Pi could fill unseen.
    mediamtx_threads: int = 0


@dataclass(frozen=True, slots=True)
class RecordConfig:
    enabled: bool = False
    root: str = ""  # empty: <state_dir>/recordings
    segment: float = 5.0  # seconds per MP4 segment (each starts on a keyframe)
    snapshot_interval: float = 1.0  # seconds between JPEG snapshots; 0: none
    max_size: int = 0  # bytes per stream; oldest deleted first; 0: no limit
    max_age: float = 0.0  # seconds; older files deleted; 0: no limit


@dataclass(frozen=True, slots=True)
class DevicesConfig:
    discover: bool = True  # with no [streams]: cameras plugged in later become streams
    discover_interval: float = 2.0  # seconds between looks for new cameras


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    log_interval: float = 30.0  # seconds between status lines in the log
    thermal_limit: float = 0.0  # degrees C above which frame rates step down; 0: off


@dataclass(frozen=True, slots=True)
class WhipConfig:
    """One ``[[whip]]`` entry: push ``stream`` to the WHIP endpoint ``url``."""

    stream: str
    url: str
    bearer_token: str = field(default="", repr=False)  # sent as Authorization: Bearer


@dataclass(frozen=True, slots=True)
class Config:
    streams: tuple[StreamConfig, ...] = ()  # empty: cameras found at start, else the test pattern
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    http: HttpConfig = HttpConfig()
    webrtc: WebRTCConfig = WebRTCConfig()
    rtsp: RtspConfig = RtspConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    devices: DevicesConfig = DevicesConfig()
    record: RecordConfig = RecordConfig()
    auth: AuthConfig = AuthConfig()
    whip: tuple[WhipConfig, ...] = ()  # WHIP endpoints to publish streams to
    log_level: str = "info"
    state_dir: str = ""  # where camrelay keeps generated files; empty: $XDG_STATE_HOME/camrelay


# -- value parsers: each takes the raw value and returns the typed one or raises ValueError


def _int(lo: int, hi: int):
    def parse(v: Any) -> int:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"expected a whole number, got {v!r}")
        try:
            n = int(v)
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf
            raise ValueError(f"expected a whole number, got {v!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be in {lo}..{hi}, got {n}")
        return n

    return parse


def parse_duration(v: Any, lo: float = 0.001, hi: float = DAY, zero_is_off: bool = False) -> float:
    """``1.5``, ``"1.5s"``, ``"500ms"``, ``"2m"`` -> seconds, within ``lo``..``hi``; ``zero_is_off``: 0 in any of
    these forms (``0``, ``"0"``, ``"0ms"``) is 0.0 too (never ``false``, which is no duration)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = float(v)
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", v)):
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 1.5s or 500ms, got {v!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration, got {v!r}")
    if zero_is_off and seconds == 0:
        return 0.0
    if seconds <= 0:
        raise ValueError(f"must be positive, got {v!r}")
    if not lo <= seconds <= hi:
        raise ValueError(f"must be in {_seconds(lo)}..{_seconds(hi)}, got {v!r}")
    return seconds


def _seconds(s: float) -> str:
    return f"{s / DAY:g}d" if s >= DAY else f"{s:g}s"


def _duration(lo: float, hi: float, zero_is_off: bool = False):
    def parse(v: Any) -> float:
        return parse_duration(v, lo, hi, zero_is_off)

    return parse


def parse_bytes(v: Any) -> int:
    """``0``, ``1048576``, ``"500M"``, ``"20G"`` -> bytes (powers of 1024)."""
    n: float | None = None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        n = v
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)i?B?\s*", v)):
        n = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if n is None:
        raise ValueError(f"expected a size like 500M or 20G, got {v!r}")
    if not n <= MAX_BYTES:  # also inf, from a string of many digits
        raise ValueError(f"must be at most {MAX_BYTES} bytes, got {v!r}")
    return int(n)


def parse_bitrate(v: Any) -> int:
    """``2000000``, ``"2M"``, ``"2.5Mbps"``, ``"800k"`` -> bits per second."""
    if isinstance(v, int) and not isinstance(v, bool):
        bps = v
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)(?:bps|bit/s)?\s*", v)):
        bps = int(float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}[m.group(2)])
    else:
        raise ValueError(f"expected a bit rate like 2M or 800k, got {v!r}")
    if not MIN_BITRATE <= bps <= MAX_BITRATE:
        raise ValueError(f"must be in {MIN_BITRATE}..{MAX_BITRATE} bit/s, got {bps}")
    return bps


def _choice(*options: str):
    def parse(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {v!r}")
        return v

    return parse


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(x for x in re.split(r"[\s,]+", v) if x)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ValueError(f"expected a list of strings, got {v!r}")


def _number(lo: float, hi: float):
    """A finite number in ``lo``..``hi``; nan and inf are refused (TOML has both)."""

    def parse(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError(f"expected a number, got {v!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {v!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"must be a finite number, got {v!r}")
        if not lo <= f <= hi:
            raise ValueError(f"must be in {lo:g}..{hi:g}, got {v!r}")
        return f

    return parse


def _celsius(v: Any) -> float:
    try:
        c = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected degrees Celsius, got {v!r}") from None
    if c != 0 and not 40 <= c <= 100:
        raise ValueError(f"must be 0 (off) or in 40..100, got {v!r}")
    return c


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise ValueError(f"expected true or false, got {v!r}")


def _user(v: Any) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]*", _str(v)):
        raise ValueError("may hold only letters, digits, '.', '_' and '-'")
    return v


def _rtsp_password(v: Any) -> str:
    if not re.fullmatch(r"[\x21-\x7e]*", _str(v)):
        raise ValueError("may hold only printable ASCII without spaces")
    return v


def _rtsp_url(v: Any) -> str:
    if _str(v) and not re.fullmatch(r"rtsps?://[^/\s]+/?", v):
        raise ValueError(f"expected rtsp://host:port (no path), got {v!r}")
    return v.rstrip("/")


def _token(v: Any) -> str:
    if _str(v) and not TOKEN_PATTERN.fullmatch(v):
        raise ValueError("must be at least 16 letters, digits, '-' or '_' (or empty: generated)")
    return v


def _password_hash(v: Any) -> str:
    if _str(v):
        parse_hash(v)
    return v


def _hosts(v: Any) -> tuple[str, ...]:
    hosts = _str_list(v)
    for host in hosts:
        if host != "*" and not re.fullmatch(r"[A-Za-z0-9._-]+", host) and not _is_ipv6(host):
            raise ValueError(f"host {host!r} is not a host name or address (no scheme, no port) or *")
    return tuple(h.lower().rstrip(".") for h in hosts)


def parse_networks(values: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``("127.0.0.1", "10.0.0.0/8")`` -> networks; ``ValueError`` names the one that is not an address."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network (like 127.0.0.1 or 10.0.0.0/8)") from None
    return tuple(networks)


def _networks(v: Any) -> tuple[str, ...]:
    networks = _str_list(v)
    parse_networks(networks)
    return networks


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def parse_playout_delay(v: Any) -> tuple[int, int] | None:
    """``"off"`` -> None; ``"0,100"`` -> (0, 100): the least and the most delay (ms) a browser may add before it
    shows a frame, multiples of 10 with min <= max <= 40950."""
    text = str(v).strip().lower() if isinstance(v, str) else None
    if text in PLAYOUT_DELAY_OFF:
        return None
    bits = text.replace(" ", "").split(",") if text else []
    if len(bits) != 2 or not all(b.isascii() and b.isdigit() and len(b) <= 6 for b in bits):
        raise ValueError(f'expected "off" or "MIN,MAX" in ms (like "0,0" or "0,100"), got {v!r}')
    low, high = int(bits[0]), int(bits[1])
    unit, most = PLAYOUT_DELAY_UNIT_MS, PLAYOUT_DELAY_MAX_MS
    if low % unit or high % unit or not low <= high <= most:
        raise ValueError(f"{low},{high}: want multiples of {unit} ms with min <= max <= {most}")
    return low, high


def parse_shards(v: Any) -> int:
    """``"auto"`` -> ``AUTO_SHARDS``; else a whole number of fan-out processes, 1..``MAX_SHARDS``."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return AUTO_SHARDS
    try:
        return _int(1, MAX_SHARDS)(v)
    except ValueError as exc:
        raise ValueError(f'expected "auto" or a whole number of processes in 1..{MAX_SHARDS}, got {v!r}') from exc


def _fps(v: Any) -> float:
    return parse_fps(str(v))


# A TURN username or credential reaches viewers in a Link header (relay.webrtc.ice.link_headers), as it is: printable
# ASCII without spaces, as rtsp.password. A control character fails every response that lists the ICE servers;
# browsers read header bytes as Latin-1, so anything past ASCII would reach them mangled; and mediamtx's reader.js
# splits Link headers on ", " and finds the credential by '"; credential="', so with no space any value parses.
_link_text = _rtsp_password


def _ice_url(url: str) -> str:
    if not url.startswith(("stun:", "stuns:", *TURN_SCHEMES)):
        raise ValueError(f"ICE server {url!r} is not a stun:, stuns:, turn: or turns: URL")
    if not well_formed(url):
        raise ValueError(
            f"ICE server {url!r} is not scheme:host[:port] (turn: and turns: may add ?transport=udp or tcp)"
        )
    return url


def _ice_servers(v: Any) -> tuple[IceServer, ...]:
    """URLs (``"stun:host"``) or tables shaped like a browser's RTCIceServer (``{urls, username, credential}``).

    An error names the entry (``[1].credential``) and never quotes a credential.
    """
    if isinstance(v, str):  # from the environment: URLs only
        v = list(_str_list(v))
    if not isinstance(v, list):
        raise ValueError("expected a list of URLs or {urls, username, credential} tables")
    servers = []
    for i, entry in enumerate(v):
        if isinstance(entry, str):
            servers.append(IceServer((_ice_url(entry),)))
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"[{i}]: expected a URL or a table with urls, username and credential")
        for key in entry:
            if key not in ICE_SERVER_KEYS:
                raise ValueError(f"[{i}].{key}: unknown key (a table takes {', '.join(ICE_SERVER_KEYS)})")
        urls = entry.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if not (isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls)):
            raise ValueError(f"[{i}].urls: expected a URL or a list of URLs")
        for key in ("username", "credential"):
            if not isinstance(entry.get(key, ""), str):
                raise ValueError(f"[{i}].{key}: expected a string")
            try:
                _link_text(entry.get(key, ""))
            except ValueError as exc:
                raise ValueError(f"[{i}].{key}: {exc}") from None
        server = IceServer(tuple(_ice_url(u) for u in urls), entry.get("username", ""), entry.get("credential", ""))
        if server.credential and not server.username:
            raise ValueError(f"[{i}].username: a credential needs its username")
        servers.append(server)
    return tuple(servers)


DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1123
MAX_DNS_NAME = 253  # characters of a DNS name, without its final dot (RFC 1035's 255 bytes on the wire)


def _is_dns_name(text: str) -> bool:
    """RFC 1123 labels, the last not all digits (RFC 3696 section 2): else "999.1.1.1" would be a name."""
    name = text.removesuffix(".")
    labels = name.split(".")
    return len(name) <= MAX_DNS_NAME and all(DNS_LABEL.fullmatch(x) for x in labels) and not labels[-1].isdigit()


def _additional_hosts(v: Any) -> tuple[str, ...]:
    hosts = _str_list(v)
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _is_dns_name(host):
                raise ValueError(f"{host!r} is not an IP address or a host name (no scheme, no port)") from None
    return hosts


def _origins(origins: tuple[str, ...]) -> tuple[str, ...]:
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"origin {origin!r} is not scheme://host[:port] (no path) or *")
    return origins


# section -> key -> parser. The one list of what the config file may say.
SCHEMA: dict[str, dict[str, Any]] = {
    "": {"log_level": _choice("debug", "info", "warning", "error"), "state_dir": _str},
    "http": {
        "host": _str,
        "port": _int(1, 65535),
        "cors_origins": lambda v: _origins(_str_list(v)),
        "allowed_hosts": _hosts,
        "trusted_proxies": _networks,
        "max_connections": _int(1, MAX_CONNECTIONS_LIMIT),
        "max_connections_per_address": _int(1, MAX_CONNECTIONS_LIMIT),
        "header_timeout": _duration(0.01, MAX_HEADER_TIMEOUT),
    },
    "auth": {
        "mode": _choice(*AUTH_MODES),
        "token": _token,
        "user": _user,
        "password_hash": _password_hash,
        "protect_metrics": _bool,
        "protect_healthz": _bool,
    },
    "video": {
        "size": lambda v: parse_size(_str(v)),
        "fps": _fps,
        "bitrate": parse_bitrate,
        "keyframe_interval": _duration(MIN_KEYFRAME_INTERVAL, MAX_KEYFRAME_INTERVAL),
        "encoder": _choice(*ENCODERS),
        "join": _choice(*JOIN_POLICIES),
        "mode": _choice(*MODES),
        "max_lag": _duration(MIN_MAX_LAG, MAX_MAX_LAG),
        "cameras_per_worker": _int(1, MAX_CAMERAS_PER_WORKER),
        "cpu_slice": _duration(MIN_SLICE, MAX_SLICE, zero_is_off=True),
    },
    "audio": {"enabled": _bool},
    "webrtc": {
        "ice_servers": _ice_servers,
        "ice_username": _link_text,
        "ice_credential": _link_text,
        "turn_secret": _str,
        "turn_credential_lifetime": _duration(MIN_TURN_LIFETIME, DAY),
        "ice_addresses": _str_list,
        "additional_hosts": _additional_hosts,
        "connect_timeout": _duration(1.0, MAX_CONNECT_TIMEOUT),
        "max_viewers": _int(1, MAX_VIEWERS_LIMIT),
        "max_viewers_total": _int(1, MAX_VIEWERS_LIMIT),
        "max_pending": _int(1, MAX_VIEWERS_LIMIT),
        "max_pending_per_address": _int(1, MAX_VIEWERS_LIMIT),
        "session_rate": _number(MIN_SESSION_RATE, MAX_SESSION_RATE),
        "session_burst": _int(1, MAX_VIEWERS_LIMIT),
        "batch_sends": _bool,
        "c_send": _bool,
        "c_batch": _bool,
        "playout_delay": parse_playout_delay,
        "shards": parse_shards,
    },
    "telemetry": {"log_interval": _duration(1.0, DAY), "thermal_limit": _celsius},
    "devices": {"discover": _bool, "discover_interval": _duration(0.1, 3600.0)},
    "record": {
        "enabled": _bool,
        "root": _str,
        "segment": _duration(1.0, MAX_SEGMENT),
        "snapshot_interval": _duration(0.1, DAY, zero_is_off=True),
        "max_size": parse_bytes,
        "max_age": _duration(60.0, MAX_AGE, zero_is_off=True),
    },
    "rtsp": {
        "enabled": _bool,
        "host": _str,
        "port": _int(1, 65535),
        "rtp_port": _int(1, 65535),
        "rtcp_port": _int(1, 65535),
        "api_port": _int(1, 65535),
        "user": _user,
        "password": _rtsp_password,
        "publish_url": _rtsp_url,
        "mediamtx": _str,
        "mediamtx_threads": _int(0, 256),
    },
}


def secrets_in_file(toml_text: str) -> list[str]:
    """The secrets a config file holds, by key (``auth.password_hash``, ``streams.cam1``), to warn about."""
    try:
        doc = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError:
        return []
    found = []
    for dotted in SECRET_KEYS:
        section, _, key = dotted.partition(".")
        table = doc.get(section)
        if isinstance(table, dict) and table.get(key):
            found.append(dotted)
    webrtc = doc.get("webrtc")
    servers = webrtc.get("ice_servers") if isinstance(webrtc, dict) else None
    if isinstance(servers, list) and any(isinstance(s, dict) and s.get("credential") for s in servers):
        found.append("webrtc.ice_servers")
    streams = doc.get("streams")
    if isinstance(streams, dict):
        found += [f"streams.{n}" for n, spec in streams.items() if isinstance(spec, str) and redact_url(spec) != spec]
    whips = doc.get("whip")
    if isinstance(whips, list):
        found += [
            f"whip[{i}].bearer_token" for i, w in enumerate(whips) if isinstance(w, dict) and w.get("bearer_token")
        ]
    return found


def secret_values(config: Config) -> set[str]:
    """The secrets ``config`` holds (the values of ``SECRET_KEYS``, the passwords in its URLs), for logs to hide."""
    values = {getattr(getattr(config, section), key) for section, _, key in (k.partition(".") for k in SECRET_KEYS)}
    values.update(server.credential for server in config.webrtc.ice_servers)  # a table's own TURN password
    for url in (config.rtsp.publish_url, *(s.source.target for s in config.streams), *(w.url for w in config.whip)):
        values.update(url_passwords(url))
    values.update(w.bearer_token for w in config.whip)
    return values - {""}


def _check_turn_credentials(w: WebRTCConfig) -> None:
    """Every TURN server has a credential: its own, minted from turn_secret, or the shared ice_credential (a
    browser refuses a TURN server without one, and so the whole configuration)."""
    if w.turn_secret and w.ice_credential:
        raise ConfigError(
            "webrtc.turn_secret: set it or webrtc.ice_credential, not both (a table in webrtc.ice_servers may give"
            " a server credentials of its own)"
        )
    for i, server in enumerate(w.ice_servers):
        if server.is_turn and not (server.credential or w.turn_secret or (w.ice_credential and not server.username)):
            raise ConfigError(
                f"webrtc.ice_servers[{i}]: TURN server {server.urls[0]} has no credential: give it username and"
                " credential, or set webrtc.turn_secret (coturn's use-auth-secret)"
            )


WHIP_KEYS = ("stream", "url", "bearer_token")
WHIP_TOKEN_ENV = ENV_PREFIX + "WHIP_BEARER_TOKEN"  # the token of WHIP entries that name none (--whip's)


def _whip_url(v: Any) -> str:
    """An http:// or https:// URL with a host. Errors never quote it: a path or query may hold a stream key."""
    problem = not isinstance(v, str) or re.search(r"\s", v)
    if not problem:
        try:
            parts = urlsplit(v)
            problem = parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0
        except ValueError:  # a port that is not a number
            problem = True
    if problem:
        raise ValueError("expected an http:// or https:// URL with a host (and no spaces)")
    return v


def parse_whip_arg(text: str) -> tuple[str, str]:
    """``NAME=URL`` from ``--whip``."""
    name, eq, url = text.partition("=")
    if not eq or not is_stream_name(name):
        raise ConfigError(
            f"--whip: expected NAME=URL (a stream name: {STREAM_NAME_RULE}; then the WHIP endpoint's URL)"
        )
    return name, url


def _whip_entries(doc: Any, args: list[str] | None, default_token: str) -> tuple[WhipConfig, ...]:
    """``[[whip]]`` tables, replaced by ``--whip`` entries when given (which take their token from the
    file's entry for the same URL); an entry without a token gets ``default_token``."""
    if not isinstance(doc, list) or not all(isinstance(t, dict) for t in doc):
        raise ConfigError('whip: expected [[whip]] tables with stream = "...", url = "..."')
    entries = []
    for i, table in enumerate(doc):
        for key in table:
            if key not in WHIP_KEYS:
                raise ConfigError(f"whip[{i}].{key}: unknown key (one of {', '.join(WHIP_KEYS)})")
        for key in ("stream", "url"):
            if key not in table:
                raise ConfigError(f"whip[{i}].{key}: required")
        for key, check in (("stream", _str), ("url", _whip_url), ("bearer_token", _rtsp_password)):
            try:
                check(table.get(key, ""))
            except ValueError as exc:
                raise ConfigError(f"whip[{i}].{key}: {exc}") from None
        if not is_stream_name(table["stream"]):
            raise ConfigError(f"whip[{i}].stream: {table['stream']!r} is not a stream name ({STREAM_NAME_RULE})")
        entries.append(WhipConfig(table["stream"], table["url"], table.get("bearer_token", "")))
    if args is not None:
        tokens = {e.url: e.bearer_token for e in entries}
        entries = []
        for arg in args:
            name, url = parse_whip_arg(arg)
            try:
                _whip_url(url)
            except ValueError as exc:
                raise ConfigError(f"--whip {name}: {exc}") from None
            entries.append(WhipConfig(name, url, tokens.get(url, "")))
    try:
        _rtsp_password(default_token)  # printable ASCII without spaces: what an HTTP header can carry
    except ValueError as exc:
        raise ConfigError(f"{WHIP_TOKEN_ENV}: {exc}") from None
    return tuple(WhipConfig(e.stream, e.url, e.bearer_token or default_token) for e in entries)


def parse_stream_arg(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` from ``--source``; a bare SPEC gets the next free camN name."""
    name, eq, spec = text.partition("=")
    if not eq or "://" in name or name.startswith(("test:", "v4l2:", "file:")):
        return "", text
    return name, spec


def load(
    toml_text: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    sources: list[str] | None = None,
    whips: list[str] | None = None,
) -> Config:
    """Build the configuration from its three layers; later layers win."""
    raw: dict[str, dict[str, Any]] = {section: {} for section in SCHEMA}
    streams: dict[str, str] = {}
    whip_doc: Any = []
    if toml_text:
        try:
            doc = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file: {exc}") from None
        for key, value in doc.items():
            if key == "streams":
                if not isinstance(value, dict):
                    raise ConfigError('streams: expected a table of name = "source spec"')
                for name, spec in value.items():
                    if not isinstance(spec, str):
                        raise ConfigError(f"streams.{name}: expected a source spec string, got {spec!r}")
                    streams[name] = spec
            elif key == "whip":
                whip_doc = value
            elif isinstance(value, dict) and key in SCHEMA and key:
                for sub, v in value.items():
                    if sub not in SCHEMA[key]:
                        raise ConfigError(f"{key}.{sub}: unknown key")
                    raw[key][sub] = v
            elif key in SCHEMA[""]:
                raw[""][key] = value
            else:
                raise ConfigError(f"{key}: unknown key")
    for var, value in (env or {}).items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name == "streams":
            streams = {}
            for i, item in enumerate(x for x in re.split(r"[\s;]+", value) if x):
                n, spec = parse_stream_arg(item)
                streams[n or f"cam{i}"] = spec
            continue
        if name in ("config", "worker_config", "whip_bearer_token"):
            continue  # the file's path, read by the CLI; a camera worker's own settings; read below
        section, _, key = name.partition("_")
        if section in SCHEMA and section and key in SCHEMA[section]:
            raw[section][key] = value
        elif name in SCHEMA[""]:
            raw[""][name] = value
        else:
            raise ConfigError(f"{var}: unknown setting")
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        raw[section][key] = value
    if sources:
        streams = {}
        for i, item in enumerate(sources):
            n, spec = parse_stream_arg(item)
            streams[n or f"cam{i}"] = spec

    values: dict[str, dict[str, Any]] = {}
    for section, keys in raw.items():
        values[section] = {}
        for key, value in keys.items():
            dotted = f"{section}.{key}" if section else key
            try:
                values[section][key] = SCHEMA[section][key](value)
            except ValueError as exc:
                message = f"{dotted}{exc}" if str(exc).startswith("[") else f"{dotted}: {exc}"  # [1].credential: ...
                if dotted in SECRET_KEYS:
                    message = redact(message, [str(value), repr(value)])
                raise ConfigError(message) from None

    video_kw = dict(values["video"])
    if "size" in video_kw:
        video_kw["width"], video_kw["height"] = video_kw.pop("size")
    video = VideoConfig(**video_kw)
    if video.width < 320:
        raise ConfigError(f"video.size: width {video.width} is below 320, the smallest the relay serves")

    parsed_streams = []
    for name, spec in streams.items():
        if not is_stream_name(name):
            raise ConfigError(f"streams.{ascii(name)[1:-1]}: name must be {STREAM_NAME_RULE}")
        try:
            source = parse_source_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"streams.{name}: {exc}") from None
        if source.kind == "test" and source.mode == "passthrough":
            raise ConfigError(f"streams.{name}: #mode=passthrough: the test pattern is drawn here, it has no H.264")
        parsed_streams.append(StreamConfig(name, source))

    whip = _whip_entries(whip_doc, whips, (env or {}).get(WHIP_TOKEN_ENV, ""))
    names = [s.name for s in parsed_streams]
    for i, w in enumerate(whip):
        if names and w.stream not in names:
            where = f"whip[{i}].stream" if whips is None else f"--whip {w.stream}"
            raise ConfigError(f"{where}: no stream named {w.stream!r} (streams: {', '.join(names)})")

    rtsp = RtspConfig(**values["rtsp"])
    if bool(rtsp.user) != bool(rtsp.password):
        missing = "rtsp.password" if rtsp.user else "rtsp.user"
        raise ConfigError(f"{missing}: set both rtsp.user and rtsp.password, or neither")
    if rtsp.rtp_port % 2 or rtsp.rtcp_port != rtsp.rtp_port + 1:
        raise ConfigError("rtsp.rtp_port: must be even, with rtsp.rtcp_port the next port (RTP/RTCP pairs)")

    auth = AuthConfig(**values["auth"])
    if auth.mode == "password" and not (auth.user and auth.password_hash):
        missing = "auth.user" if not auth.user else "auth.password_hash"
        raise ConfigError(f'{missing}: mode = "password" needs auth.user and auth.password_hash ({HASH_HELP})')

    webrtc = WebRTCConfig(**values["webrtc"])
    _check_turn_credentials(webrtc)

    return Config(
        streams=tuple(parsed_streams),
        video=video,
        audio=AudioConfig(**values["audio"]),
        http=HttpConfig(**values["http"]),
        webrtc=webrtc,
        rtsp=rtsp,
        telemetry=TelemetryConfig(**values["telemetry"]),
        devices=DevicesConfig(**values["devices"]),
        record=RecordConfig(**values["record"]),
        auth=auth,
        whip=whip,
        **values[""],
    )

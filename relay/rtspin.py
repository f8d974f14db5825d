"""RTSP in: what a client reading an IP camera over TCP says and hears, sans-io.

Plain values in, plain values out, and an ``RtspError`` that says exactly what
was wrong; no sockets and no clocks (the capture thread's driver,
``relay.camera.rtspsource``, does the I/O):

- ``request`` builds a request; ``Reader`` cuts what the camera sends on its
  one TCP connection into ``Response``s and ``Interleaved`` frames (``$``,
  RFC 2326 10.12).
- ``parse_challenges`` and ``authorization``: Basic, and Digest with MD5, with
  and without ``qop=auth`` (RFC 2617, as cameras speak it); ``Requests`` numbers
  a connection's requests and adds its session and credentials to each, and
  ``without_userinfo`` is a URL as it goes on the wire.
- ``parse_sdp``: the video of a DESCRIBE answer (codec, payload type, clock
  rate, control URL, ``sprop-parameter-sets``); ``parse_session`` and
  ``parse_interleaved`` read SETUP's answer.
- ``parse_rtp`` and ``H264Depacketizer``: RTP packets into access units
  (RFC 6184: single NAL unit, STAP-A, FU-A), each handed on at the packet that
  carries the marker bit, its last, not when the next one starts.
  ``Reader.feed_video`` reads a playing connection: its RTP packets go to the
  depacketizer where they lie in the bytes read (``push_frames``), most with no
  object made for each, a per-packet cost a camera's worker pays ~400 times a
  second at 1080p and 4 Mbit/s; the runs of them that go on with the unit
  being gathered are taken in one C call each (``relay/_rtpin.c``, ``C_TAKE``)
  where it is built, else by the same step in Python.

``relay/rtsp.py`` is the other direction, camrelay publishing to mediamtx; it
speaks through ``request``, ``Reader`` and the authentication here too.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import struct
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

from .h264 import START_CODE, H264Error, join_annexb, parse_sprop_parameter_sets
from .logsafe import printable

try:
    from . import _rtpin
except ImportError:  # not built (no C compiler or Python headers at set-up): the per-packet step in Python
    _rtpin = None  # type: ignore[assignment]

RTPIN_API = 3  # _rtpin.c's API_VERSION, as take is called here
# A module built from an older _rtpin.c (an editable install is not rebuilt when the source changes): not used.
C_TAKE_STALE = _rtpin is not None and getattr(_rtpin, "API_VERSION", None) != RTPIN_API
# The per-packet step of push_frames in C (relay/_rtpin.c), or None: the same step in Python.
C_TAKE = _rtpin.take if _rtpin is not None and not C_TAKE_STALE else None

# A response's status line and headers: a camera's are a few hundred bytes; more is not RTSP.
MAX_HEADER_BYTES = 64 * 1024
# A response's body (an SDP): a few kilobytes from any camera.
MAX_BODY_BYTES = 1024 * 1024
# One access unit as the depacketizer gathers it: a 4K I-frame at a high bit rate is a few MiB; more is a
# camera that never ends a unit (no marker, one timestamp), which must not take the worker's memory.
MAX_UNIT_BYTES = 16 * 1024 * 1024
# What one NAL unit held for a unit costs beyond its bytes (a bytes object's header, 33, its list slot, 8, the
# allocator's rounding), counted against MAX_UNIT_BYTES: a STAP-A of 2-byte NAL units held ~450 MiB when only
# their payload counted.
NAL_OVERHEAD = 64
RTP_HEADER = struct.Struct("!BBHII")
RTP_VERSION = 2
INTERLEAVED_HEADER = struct.Struct("!cBH")  # "$", channel, length
DOLLAR = ord("$")  # the first byte of an interleaved frame
# An interleaved frame's header, then its RTP packet's fixed header and two bytes of payload (an FU-A's indicator
# and header): read at once by Depacketizer.push_frames.
FRAME_HEAD = struct.Struct("!BBHBBHIIBB")
SEQUENCE_MOD = 1 << 16
# RFC 3550 A.1: a packet at most this many sequence numbers ahead follows a loss; farther ahead, or farther
# behind than MAX_MISORDER, it is a stray or a camera that restarted its stream, taken as a restart once two
# packets in a row follow on from it (a camera's encoder reset; a backward jump was "late" for ever before).
MAX_DROPOUT = 3000
MAX_MISORDER = 100  # sequence numbers behind the last that a packet is only late (or a duplicate)
TIMESTAMP_MOD = 1 << 32
DEFAULT_SESSION_TIMEOUT = 60  # seconds, RFC 2326 12.37, when SETUP's Session header names none
# An interleaved channel is one byte on the wire (RFC 2326 10.12): a Transport header naming more is wrong.
MAX_CHANNEL = 255
# A number on the wire: ASCII digits only, ten at most. str.isdigit() also takes "²", which int() then refuses with a
# ValueError that is no RtspError (a traceback at every retry), as it refuses over 4,300 digits; a few hundred
# overflow a float later (a clock rate, a session timeout). No number of RTSP, RTP or SDP needs more than ten.
DECIMAL = re.compile(r"[0-9]{1,10}")

NAL_IDR = 5
NAL_STAP_A = 24
NAL_FU_A = 28
# RTP-only NAL unit types of RFC 6184 that only packetization-mode 2 (interleaved) uses: no camera sends
# them in mode 0 or 1, which is what an SDP without packetization-mode=2 says.
NAL_INTERLEAVED_ONLY = {25: "STAP-B", 26: "MTAP16", 27: "MTAP24", 29: "FU-B"}
# Codecs by their SDP encoding name, in FFmpeg's names (what the worker's decide_mode speaks).
CODECS = {"h264": "h264", "h265": "hevc", "jpeg": "mjpeg", "mp4v-es": "mpeg4"}
STATIC_PAYLOAD_TYPES = {26: ("jpeg", 90000)}  # RFC 3551: the one static video type cameras use


class RtspError(ValueError):
    """What the camera sent cannot be read, or asks for what this client does not do."""


def decimal(text: str) -> int | None:
    """``text`` (spaces around it aside) as a number when it is ASCII digits, else None."""
    text = text.strip()
    return int(text) if DECIMAL.fullmatch(text) else None


# -- requests and responses


def request(method: str, url: str, cseq: int, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """An RTSP/1.0 request (``body``: ANNOUNCE's SDP); ``url`` must hold no user information (it goes on the
    wire)."""
    lines = [f"{method} {url} RTSP/1.0", f"CSeq: {cseq}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # (name in lower case, value), in the order sent
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n == name), None)

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    @property
    def cseq(self) -> int | None:
        value = self.header("cseq")
        return decimal(value) if value else None


@dataclass(frozen=True, slots=True)
class Interleaved:
    channel: int
    payload: bytes


@dataclass(slots=True)
class Played:
    """What the bytes read from a playing connection gave (``Reader.feed_video``)."""

    units: list[AccessUnit]  # access units completed, in order
    responses: list[Response]  # answers (a keep-alive's)
    errors: list[str]  # why each RTP packet of the video that could not be read was dropped
    others: list[Interleaved] = field(default_factory=list)  # the other channels' frames, when asked for


STATUS_LINE = re.compile(r"RTSP/1\.[0-9] ([0-9]{3})(?: (.*))?")


def parse_response_head(head: bytes) -> tuple[int, str, tuple[tuple[str, str], ...]]:
    """(status, reason, headers) of a response's head, the blank line excluded."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head.decode("latin-1")
    # control characters (a bare LF that splitting on CRLF left, an escape) each a "?": no forged log line or status
    status_line, *lines = (printable(line) for line in text.split("\r\n"))
    match = STATUS_LINE.fullmatch(status_line.strip())
    if match is None:
        raise RtspError(f"bad status line {status_line[:80]!r}")
    headers = []
    for line in lines:
        if line[:1] in (" ", "\t") and headers:  # a folded header continues the one before
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise RtspError(f"bad header line {line[:80]!r}")
        headers.append((name.strip().lower(), value.strip()))
    return int(match.group(1)), match.group(2) or "", tuple(headers)


@dataclass(frozen=True, slots=True)
class _Head:
    end: int  # where the blank line after the head starts
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    length: int  # of the body


class Reader:
    """Responses and interleaved frames out of the bytes of one RTSP connection, however they are cut."""

    def __init__(self) -> None:
        self._buf = bytearray()
        # The head of the response at the front of the buffer, parsed, while its body is still arriving: a
        # body's reads do not parse its head again each (that was quadratic in a large head and a slow body).
        self._head: _Head | None = None
        self._searched = 0  # bytes of an incomplete head already searched for its end

    def feed(self, data: bytes) -> list[Response | Interleaved]:
        self._buf += data
        out: list[Response | Interleaved] = []
        while self._buf:
            item = self._next()
            if item is None:
                break
            out.append(item)
        return out

    def feed_video(
        self, data: bytes | memoryview, channel: int, depacketizer: H264Depacketizer, others: bool = False
    ) -> Played:
        """``feed`` for a connection that plays: its interleaved frames go to ``depacketizer.push_frames`` where
        they lie in what was read (the RTP packets on ``channel`` into units, each it refuses dropped and why in
        ``errors``); the responses between them come out, and with ``others`` the frames of the other channels
        (an audio track, RTCP). What is not RTSP raises ``RtspError``.

        With nothing held from the read before, the frames are taken where they lie in ``data`` itself, and only
        what is left of it (a frame cut off at its end, an answer) is kept: most of a read is not copied."""
        buf = self._buf
        played = Played([], [], [])
        if buf:
            buf += data
        else:
            with memoryview(data) as view:
                used = depacketizer.push_frames(
                    view, channel, played.units, played.errors, played.others if others else None
                )
                if used == len(view):
                    return played
                buf += view[used:]
            if buf[0] == DOLLAR:
                return played  # the rest of a frame is still to come
        while buf:
            with memoryview(buf) as view:
                used = depacketizer.push_frames(
                    view, channel, played.units, played.errors, played.others if others else None
                )
            del buf[:used]
            if not buf or buf[0] == DOLLAR:
                break  # the rest of a frame is still to come
            response = self._next()  # a keep-alive's answer
            if response is None:
                break
            played.responses.append(response)  # type: ignore[arg-type]
        return played

    def eof(self) -> None:
        """The connection ended: ``RtspError`` if it ended inside a message."""
        if self._buf:
            what = "an interleaved frame" if self._buf[:1] == b"$" else "a response"
            raise RtspError(f"connection closed inside {what} ({len(self._buf)} bytes of it)")

    def _next(self) -> Response | Interleaved | None:
        buf = self._buf
        if buf[:1] == b"$":
            if len(buf) < INTERLEAVED_HEADER.size:
                return None
            _, channel, length = INTERLEAVED_HEADER.unpack_from(buf)
            end = INTERLEAVED_HEADER.size + length
            if len(buf) < end:
                return None
            frame = Interleaved(channel, bytes(buf[INTERLEAVED_HEADER.size : end]))
            del buf[:end]
            return frame
        head = self._head = self._head or self._parse_head()
        if head is None:
            return None
        total = head.end + 4 + head.length
        if len(buf) < total:
            return None
        self._head = None
        response = Response(head.status, head.reason, head.headers, bytes(buf[head.end + 4 : total]))
        del buf[:total]
        return response

    def _parse_head(self) -> _Head | None:
        """The head of the response at the front of the buffer, or None while it is incomplete."""
        buf = self._buf
        if not b"RTSP/"[: len(buf)] == bytes(buf[:5]):
            raise RtspError(f"expected a response or an interleaved frame, got {bytes(buf[:16])!r}")
        end = buf.find(b"\r\n\r\n", max(0, self._searched - 3))
        if end > MAX_HEADER_BYTES or (end < 0 and len(buf) > MAX_HEADER_BYTES):  # come whole in one read or not
            raise RtspError(f"response head over {MAX_HEADER_BYTES} bytes")
        if end < 0:
            self._searched = len(buf)
            return None
        self._searched = 0
        status, reason, headers = parse_response_head(bytes(buf[:end]))
        length_text = next((v for n, v in headers if n == "content-length"), "0")
        length = decimal(length_text)
        if length is None:
            raise RtspError(f"bad Content-Length {length_text[:20]!r}")
        if length > MAX_BODY_BYTES:
            raise RtspError(f"response body of {length} bytes is over the {MAX_BODY_BYTES} limit")
        return _Head(end, status, reason, headers, length)


# -- authentication


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "basic" or "digest"
    realm: str = ""
    nonce: str = ""
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    algorithm: str = ""  # as the challenge named it (MD5 is the only one); "" when it named none


AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


def parse_auth_params(text: str) -> dict[str, str]:
    """``realm="x", nonce="y", qop="auth"`` -> {"realm": "x", ...} (names in lower case)."""
    params = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = AUTH_PARAM.match(text, pos)
        if match is None or match.end() == pos:
            raise RtspError(f"bad authentication parameters {text[pos : pos + 40].strip()!r}")
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        pos = match.end()
    return params


def parse_challenges(values: list[str]) -> Challenge:
    """The challenge to answer from a 401's ``WWW-Authenticate`` headers: Digest with MD5 over Basic (a
    camera may offer Digest with SHA-256 too, which is passed over)."""
    if not values:
        raise RtspError("401 without a WWW-Authenticate header: no way to authenticate")
    found: dict[str, Challenge] = {}
    unusable = []
    for value in values:
        scheme, _, rest = value.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            found["basic"] = Challenge("basic", realm=parse_auth_params(rest).get("realm", ""))
        elif scheme == "digest":
            p = parse_auth_params(rest)
            qop = tuple(q.strip().lower() for q in p.get("qop", "").split(",") if q.strip())
            algorithm = p.get("algorithm", "")
            if "nonce" not in p:
                unusable.append("Digest without a nonce")
            elif qop and "auth" not in qop:
                unusable.append(f"Digest with qop {p['qop']!r} (only auth is supported)")
            elif algorithm and algorithm.upper() != "MD5":
                unusable.append(f"Digest with algorithm {algorithm!r} (only MD5 is supported)")
            else:
                found["digest"] = Challenge("digest", p.get("realm", ""), p["nonce"], qop, p.get("opaque"), algorithm)
        else:
            unusable.append(f"{scheme or value[:20]!r} (only Basic and Digest are supported)")
    if "digest" in found:
        return found["digest"]
    if "basic" in found:
        return found["basic"]
    raise RtspError("camera asks for authentication this client cannot answer: " + "; ".join(unusable))


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def authorization(
    challenge: Challenge, method: str, uri: str, user: str, password: str, cnonce: str = "", nc: int = 1
) -> str:
    """The ``Authorization`` header's value answering ``challenge`` for ``method uri``. Digest with qop=auth
    needs a client nonce (``cnonce``) and the count of requests made with this nonce (``nc``)."""
    if challenge.scheme == "basic":
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    ha1 = _md5(f"{user}:{challenge.realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    fields = [f'username="{user}"', f'realm="{challenge.realm}"', f'nonce="{challenge.nonce}"', f'uri="{uri}"']
    if "auth" in challenge.qop:
        if not cnonce:
            raise RtspError("Digest qop=auth needs a client nonce")
        response = _md5(f"{ha1}:{challenge.nonce}:{nc:08x}:{cnonce}:auth:{ha2}")
        fields += [f'response="{response}"', "qop=auth", f"nc={nc:08x}", f'cnonce="{cnonce}"']
    else:
        fields.append(f'response="{_md5(f"{ha1}:{challenge.nonce}:{ha2}")}"')
    if challenge.opaque is not None:
        fields.append(f'opaque="{challenge.opaque}"')
    if challenge.algorithm:
        fields.append(f"algorithm={challenge.algorithm}")
    return "Digest " + ", ".join(fields)


class Requests:
    """The requests of one client connection, camrelay's camera reader's or its publisher's: numbered (CSeq),
    naming the session once SETUP gave one, and, once a 401 was answered (``challenged``), each answering
    its challenge with ``user`` and ``password`` (Digest's nonce count counted, a client nonce each)."""

    def __init__(self, user_agent: str, user: str = "", password: str = "") -> None:
        self.user_agent = user_agent
        self.user, self.password = user, password
        self.cseq = 0  # the last request's
        self.session = ""  # SETUP's, once given
        self.challenge: Challenge | None = None
        self._nonce_count = 0

    def challenged(self, response: Response) -> None:
        """A 401: the requests after answer its ``WWW-Authenticate`` (``RtspError`` when none can be)."""
        self.challenge = parse_challenges(response.all("www-authenticate"))
        self._nonce_count = 0

    def make(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
        """The next request's bytes (``url`` without user information: it goes on the wire)."""
        self.cseq += 1
        all_headers = {"User-Agent": self.user_agent, **(headers or {})}
        if self.session:
            all_headers["Session"] = self.session
        if self.challenge is not None:
            self._nonce_count += 1
            all_headers["Authorization"] = authorization(
                self.challenge, method, url, self.user, self.password, secrets.token_hex(8), self._nonce_count
            )
        return request(method, url, self.cseq, all_headers, body)


def without_userinfo(url: str) -> str:
    """``url`` as it goes on the wire: no user or password (an empty path is ``/``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


# -- the SDP


@dataclass(frozen=True, slots=True)
class SdpVideo:
    codec: str  # FFmpeg's name: h264, hevc, mjpeg; else the SDP's encoding name in lower case
    payload_type: int
    clock_rate: int
    control: str  # the URL to SETUP
    parameter_sets: tuple[bytes, ...] = ()  # SPS and PPS NAL units from sprop-parameter-sets
    fmtp: dict[str, str] = field(default_factory=dict)

    @property
    def extradata(self) -> bytes:
        """The parameter sets as Annex B, as FFmpeg's RTSP demuxer gives them."""
        return join_annexb(list(self.parameter_sets))


def control_url(control: str | None, base: str) -> str:
    """The URL a media's ``a=control`` names, against ``base``."""
    if control is None or control == "*":
        return base
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", control):
        return control
    try:
        return urljoin(base if base.endswith("/") else base + "/", control)
    except ValueError as exc:  # a Content-Base such as rtsp://[::1/
        raise RtspError(f"control URL {control[:80]!r} against {base[:80]!r} cannot be read: {exc}") from None


def sdp_media(text: str) -> tuple[str | None, list[list[str]]]:
    """(the session's ``a=control``, each media's lines, its ``m=`` line first) of an SDP."""
    session_control: str | None = None
    media: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise RtspError(f"bad SDP line {line[:60]!r}")
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        elif line.startswith("a=control:"):
            session_control = line[len("a=control:") :]
    return session_control, media


def first_format(media: list[list[str]], kind: str) -> tuple[int, str | None, dict[str, str], str | None]:
    """(payload type, rtpmap, fmtp parameters, a=control) of the first media of ``kind`` ("video", "audio"): its
    first format, the one a camera sends."""
    found = next((m for m in media if m[0].startswith(f"m={kind} ")), None)
    if found is None:
        raise RtspError(f"SDP has no {kind} media")
    parts = found[0].split()
    pt = decimal(parts[3]) if len(parts) >= 4 else None
    if pt is None:
        raise RtspError(f"bad SDP media line {found[0][:60]!r}")
    rtpmap, fmtp, control = None, {}, None
    for line in found[1:]:
        if line.startswith(f"a=rtpmap:{pt} "):
            rtpmap = line.split(" ", 1)[1]
        elif line.startswith(f"a=fmtp:{pt} "):
            for item in line.split(" ", 1)[1].split(";"):
                name, eq, value = item.strip().partition("=")
                if eq:
                    fmtp[name.strip().lower()] = value.strip()
        elif line.startswith("a=control:"):
            control = line[len("a=control:") :]
    return pt, rtpmap, fmtp, control


def parse_sdp(text: str, base: str) -> SdpVideo:
    """The first video media of a DESCRIBE answer; ``base`` is Content-Base (else the URL described)."""
    session_control, media = sdp_media(text)
    pt, rtpmap, fmtp, control = first_format(media, "video")
    if rtpmap is not None:
        name, _, rest = rtpmap.partition("/")
        rate = decimal(rest.split("/")[0])
        if not rate:
            raise RtspError(f"bad rtpmap clock rate {rtpmap[:40]!r}")
        encoding, clock_rate = name.strip().lower(), rate
    elif pt in STATIC_PAYLOAD_TYPES:
        encoding, clock_rate = STATIC_PAYLOAD_TYPES[pt]
    else:
        raise RtspError(f"video payload type {pt} has no rtpmap")
    codec = CODECS.get(encoding, encoding)
    sets: tuple[bytes, ...] = ()
    if codec == "h264":
        if fmtp.get("packetization-mode", "0") not in ("0", "1"):
            raise RtspError(f"H.264 packetization-mode {fmtp['packetization-mode']} is not supported")
        if fmtp.get("sprop-parameter-sets"):
            try:
                sets = tuple(parse_sprop_parameter_sets(fmtp["sprop-parameter-sets"]))
            except H264Error as exc:
                raise RtspError(str(exc)) from None
    base = control_url(session_control, base) if session_control not in (None, "*") else base
    return SdpVideo(codec, pt, clock_rate, control_url(control, base), sets, fmtp)


def parse_session(value: str) -> tuple[str, int]:
    """(the session id, its timeout in seconds) of a ``Session`` header: ``12345678;timeout=60``."""
    ident, *params = value.split(";")
    if not ident.strip():
        raise RtspError(f"bad Session header {value[:60]!r}")
    timeout = DEFAULT_SESSION_TIMEOUT
    for param in params:
        name, _, v = param.strip().partition("=")
        if name.lower() == "timeout":
            seconds = decimal(v)
            if not seconds:
                raise RtspError(f"bad Session timeout {v[:20]!r}")
            timeout = seconds
    return ident.strip(), timeout


def parse_interleaved(transport: str) -> tuple[int, int]:
    """The (RTP, RTCP) channels a SETUP answer's ``Transport`` header gives the track."""
    match = re.search(r"interleaved=([0-9]{1,10})(?:-([0-9]{1,10}))?(?![0-9])", transport)
    if match is None:
        raise RtspError(f"camera did not agree to RTP over the RTSP connection: Transport {transport[:80]!r}")
    rtp = int(match.group(1))
    rtcp = int(match.group(2)) if match.group(2) else rtp + 1
    if max(rtp, rtcp) > MAX_CHANNEL:
        raise RtspError(f"interleaved channel {max(rtp, rtcp)} is over {MAX_CHANNEL}: Transport {transport[:80]!r}")
    return rtp, rtcp


# -- RTP and H.264


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes


def parse_rtp(data: bytes) -> RtpPacket:
    if len(data) < RTP_HEADER.size:
        raise RtspError(f"RTP packet of {len(data)} bytes is shorter than its header")
    b0, b1, seq, ts, ssrc = RTP_HEADER.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        raise RtspError(f"RTP version {b0 >> 6}, not 2")
    offset = RTP_HEADER.size + 4 * (b0 & 0x0F)
    if b0 & 0x10:  # a header extension: 4 bytes, then its length in 32-bit words
        if len(data) < offset + 4:
            raise RtspError("RTP header extension overruns its packet")
        offset += 4 + 4 * int.from_bytes(data[offset + 2 : offset + 4], "big")
    end = len(data)
    if b0 & 0x20:
        end -= data[-1] if data else 0
    if offset > end:
        raise RtspError(f"RTP header of {offset} bytes overruns its packet of {len(data)}")
    return RtpPacket(b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, bytes(data[offset:end]))


@dataclass(frozen=True, slots=True)
class AccessUnit:
    """One H.264 access unit as Annex B, stamped in RTP clock ticks (unwrapped: it never goes back to 0)."""

    data: bytes
    pts: int
    keyframe: bool  # holds an IDR slice
    # The type of each of its NAL units, in order, as the depacketizer took them (``ParameterSets.access_unit``
    # then need not scan the unit for its start codes); None where not known.
    kinds: tuple[int, ...] | None = None
    # Where each of its NAL units begins (its header byte, after a 4-byte start code; each ends where the next one's
    # start code begins), as the depacketizer put them there: the relay packetizes by them (``h264.nal_starts``,
    # ``ipc.Message.nals``) without scanning the unit; None where not known.
    starts: tuple[int, ...] | None = None

    def __bytes__(self) -> bytes:
        return self.data

    @property
    def size(self) -> int:  # as av.Packet's: a reader of either takes both
        return len(self.data)


# NAL unit types that come before an access unit's first slice (SEI, SPS, PPS, access unit delimiter).
NAL_UNIT_HEADS = frozenset({6, 7, 8, 9})
NAL_SLICES = frozenset({1, 5})


def starts_unit(payload: bytes) -> bool:
    """Whether an RTP payload begins an access unit: a NAL unit that heads one, or a picture's first slice
    (its first_mb_in_slice, the slice header's first field, ue(v), is 0: a single 1 bit). For a reader that
    joins a stream inside a unit, whose rest it must not hand on as one."""
    if len(payload) < 2:
        return False
    kind, first = payload[0] & 0x1F, payload[1:]
    if kind == NAL_STAP_A:
        kind, first = (payload[3] & 0x1F, payload[4:]) if len(payload) > 3 else (0, b"")
    elif kind == NAL_FU_A:
        if not payload[1] & 0x80:
            return False
        kind, first = payload[1] & 0x1F, payload[2:]
    if kind in NAL_UNIT_HEADS:
        return True
    return kind in NAL_SLICES and bool(first) and bool(first[0] & 0x80)


class H264Depacketizer:
    """RTP packets of one H.264 stream (RFC 6184, packetization-mode 0 or 1) into access units.

    A unit is handed on at the packet that carries the marker bit (its last), or, for a camera that never
    sets it, when a packet with a new timestamp starts the next one. A sequence gap (packets the camera
    lost) breaks the unit it falls in; that unit and every one after it up to the next IDR is dropped and
    counted: the pictures after a loss refer to the one lost, and a decoder shows them smeared.
    ``push`` raises ``RtspError`` for a packet it cannot read; the unit it was part of is dropped too.
    A new SSRC, or two packets in a row far from the last sequence number (RFC 3550 A.1), is a camera that
    restarted its stream: the depacketizer starts again there, at an IDR (``resyncs``); the packets it
    would not take meanwhile, late, duplicate or stray, are counted (``packets_dropped``).

    A unit is gathered as Annex B in one buffer, each NAL unit's bytes copied there once as its packet comes,
    and joined once at its end. ``push_frames`` takes a playing connection's interleaved frames where they lie
    in what was read: most packets, the next in sequence inside the unit being gathered (an FU-A, a single NAL
    unit), go in with no object of their own; any other goes through ``push``, which decides as it always did.
    """

    def __init__(self, payload_type: int) -> None:
        self.payload_type = payload_type
        self.packets = 0  # of the video's payload type
        self.units = 0  # handed on
        self.packets_lost = 0  # by sequence gaps
        self.units_dropped = 0  # broken, or after a loss and before the next IDR
        self.packets_dropped = 0  # late, duplicate, or far from the sequence before a restart was certain
        self.resyncs = 0  # the camera restarted its stream (a new SSRC, or its sequence numbers jumped)
        self._ssrc: int | None = None
        self._stray: RtpPacket | None = None  # far from the sequence: a restart's first packet if the next follows
        self._unit = bytearray()  # the unit being gathered, Annex B: its whole NAL units, then an FU-A's so far
        self._size = 0  # of its whole NAL units, each with NAL_OVERHEAD
        self._keyframe = False  # one of its whole NAL units is an IDR slice
        self._kinds: list[int] = []  # the type of each NAL unit in it, an FU-A's being gathered too
        self._starts: list[int] = []  # where each NAL unit in it begins (its header byte), beside _kinds
        self._fu: int | None = None  # where the FU-A being gathered starts in _unit (its NAL header), while one is
        self._timestamp: int | None = None  # of the unit being gathered, unwrapped
        self._last_seq: int | None = None
        self._last_ts: int | None = None  # the last packet's, unwrapped
        self._last_raw_ts: int | None = None  # the last packet's, as sent
        self._broken = False  # the unit being gathered lost a part
        self._wait_idr = False
        self._synced = False  # an access unit's first packet seen: a reader may join in the middle of one
        self.c_take = True  # push_frames takes its runs of packets in C where relay/_rtpin.c is built (C_TAKE)

    def push(self, packet: RtpPacket) -> list[AccessUnit]:
        if packet.payload_type != self.payload_type:
            raise RtspError(f"RTP payload type {packet.payload_type}, not the video's {self.payload_type}")
        self.packets += 1
        if self._ssrc is not None and packet.ssrc != self._ssrc:
            self._restart()
        self._ssrc = packet.ssrc
        lost = 0
        if self._last_seq is not None:
            delta = (packet.sequence - self._last_seq) % SEQUENCE_MOD
            if 0 < delta <= MAX_DROPOUT:
                lost = delta - 1
                self.packets_lost += lost
            elif delta == 0 or delta >= SEQUENCE_MOD - MAX_MISORDER:
                self.packets_dropped += 1
                return []  # a duplicate or a late packet: its unit has gone
            elif self._stray is None or packet.sequence != (self._stray.sequence + 1) % SEQUENCE_MOD:
                self._drop_stray()
                self._stray = packet
                return []  # a stray, or the first packet of a restarted stream: the next one says which
            else:
                stray, self._stray = self._stray, None
                self._restart()
                self._last_seq = stray.sequence  # if it cannot be read, the packet after counts this one lost
                out = self._take(stray)
                self._last_seq = packet.sequence
                return out + self._take(packet)
        self._drop_stray()
        self._last_seq = packet.sequence
        return self._take(packet, lost)

    def push_frames(
        self,
        view: memoryview,
        channel: int,
        out: list[AccessUnit],
        errors: list[str],
        others: list[Interleaved] | None = None,
    ) -> int:
        """The whole interleaved frames at the start of ``view`` (RFC 2326 10.12: ``$``, channel, length), up to
        the first that is cut off or is no frame: the RTP packets on ``channel`` into access units, appended to
        ``out``; the other channels' (RTCP, an audio track) appended to ``others``, or passed over without it.
        How many bytes the frames took.

        The bytes are not kept (they may be read into again). A packet that goes on with the unit being
        gathered (the next in sequence, its timestamp: an FU-A, a single NAL unit, within the unit's cap) is
        taken where it lies, with no object made for it, a run of them in one call to ``C_TAKE`` where it is
        built (``c_take``); so is the next in sequence that starts a unit after the last one's marker. Any other
        goes through ``push``, and when that refuses it (``RtspError``) the packet is dropped and why is
        appended to ``errors``."""
        pos, size, unit, kinds, starts, pt = 0, len(view), self._unit, self._kinds, self._starts, self.payload_type
        next_seq, next_ts, next_ssrc = self._expected()
        taken = 0  # packets taken where they lie and not yet counted (self.packets, self._last_seq)
        take = C_TAKE if self.c_take else None
        try:
            while True:
                if take is not None and next_seq >= 0:  # the run of packets the step below would take, in C
                    fu = -1 if self._fu is None else self._fu
                    pos, count, next_seq, next_ts, last_ts, started, fu, size_, keyframe, marker, more = take(
                        view, pos, channel, pt, unit, kinds, starts, next_seq, next_ts, next_ssrc, fu, self._size,
                        self._keyframe, MAX_UNIT_BYTES, self._last_ts,
                    )  # fmt: skip
                    self._fu, self._size, self._keyframe = None if fu < 0 else fu, size_, keyframe
                    if started:  # a new unit, as the step below starts one
                        self._timestamp = self._last_ts = last_ts
                        self._last_raw_ts = next_ts
                    taken += count
                    if marker:  # the unit is whole
                        self.packets, self._last_seq, taken = self.packets + taken, (next_seq - 1) % SEQUENCE_MOD, 0
                        out += self._finish()
                        unit, kinds, starts = self._unit, self._kinds, self._starts
                        continue
                    if not more:
                        break  # nothing whole left: the rest of a frame is still to come
                if size - pos >= FRAME_HEAD.size:
                    dollar, ch, length, b0, b1, seq, ts, ssrc, indicator, fu_header = FRAME_HEAD.unpack_from(view, pos)
                elif size - pos >= INTERLEAVED_HEADER.size:  # a frame too short for the fast way's fields
                    dollar, ch, length = view[pos], view[pos + 1], view[pos + 2] << 8 | view[pos + 3]
                else:
                    break
                end = pos + INTERLEAVED_HEADER.size + length
                if dollar != DOLLAR or end > size:
                    break
                start, pos = pos + INTERLEAVED_HEADER.size, end
                if ch != channel:
                    if others is not None:
                        others.append(Interleaved(ch, bytes(view[start:end])))
                    continue
                if (
                    length > RTP_HEADER.size + 2
                    and seq == next_seq
                    and ts != next_ts
                    and not unit
                    and self._fu is None
                    and b0 == RTP_VERSION << 6
                    and ssrc == next_ssrc
                    and b1 & 0x7F == pt
                ):
                    # The next in sequence, the first of a new unit after the last was finished (at its marker): as
                    # _take starts it (nothing to finish, nothing lost), then taken below or, if not, by push.
                    self._timestamp = self._unwrap(ts)
                    next_ts = ts
                # Long enough for the fields read; version 2 with no padding, extension or CSRC; the video; the next
                # packet of the unit being gathered.
                if (
                    length > RTP_HEADER.size + 2
                    and seq == next_seq
                    and b0 == RTP_VERSION << 6
                    and ts == next_ts
                    and ssrc == next_ssrc
                    and b1 & 0x7F == pt
                ):
                    at, kind, fu = start + RTP_HEADER.size, indicator & 0x1F, self._fu
                    if kind == NAL_FU_A and (fu is None) == bool(fu_header & 0x80):  # a start, or one goes on
                        whole = (len(unit) - fu if fu is not None else 1) + end - at - 2  # the NAL unit's bytes
                        if whole + self._size + (NAL_OVERHEAD if fu_header & 0x40 else 0) <= MAX_UNIT_BYTES:
                            if fu is None:
                                unit += START_CODE
                                self._fu = len(unit)
                                starts.append(len(unit))
                                unit.append((indicator & 0xE0) | fu_header & 0x1F)
                                kinds.append(fu_header & 0x1F)
                            unit += view[at + 2 : end]
                            if fu_header & 0x40:  # its end
                                self._fu = None
                                self._size += whole + NAL_OVERHEAD
                                self._keyframe = self._keyframe or fu_header & 0x1F == NAL_IDR
                            kind = -1
                    elif 1 <= kind <= 23 and fu is None and self._size + end - at + NAL_OVERHEAD <= MAX_UNIT_BYTES:
                        unit += START_CODE
                        starts.append(len(unit))
                        unit += view[at:end]
                        kinds.append(kind)
                        self._size += end - at + NAL_OVERHEAD
                        self._keyframe = self._keyframe or kind == NAL_IDR
                        kind = -1
                    if kind == -1:  # taken
                        taken += 1
                        next_seq = (seq + 1) % SEQUENCE_MOD
                        if b1 & 0x80:  # its marker: the unit is whole
                            self.packets, self._last_seq, taken = self.packets + taken, seq, 0
                            out += self._finish()
                            unit, kinds, starts = self._unit, self._kinds, self._starts
                        continue
                if taken:
                    self.packets, self._last_seq, taken = self.packets + taken, (next_seq - 1) % SEQUENCE_MOD, 0
                try:
                    out += self.push(parse_rtp(bytes(view[start:end])))
                except RtspError as exc:
                    errors.append(str(exc))
                unit, kinds, starts = self._unit, self._kinds, self._starts
                next_seq, next_ts, next_ssrc = self._expected()
        finally:
            if taken:
                self.packets, self._last_seq = self.packets + taken, (next_seq - 1) % SEQUENCE_MOD
        return pos

    def _expected(self) -> tuple[int, int | None, int | None]:
        """(sequence number, timestamp, SSRC) of a packet ``push_frames`` may take where it lies: the next in
        sequence, going on with the unit being gathered; a sequence number of -1 when none may be."""
        if not self._synced or self._stray is not None or self._last_seq is None or self._timestamp != self._last_ts:
            return -1, None, None
        return (self._last_seq + 1) % SEQUENCE_MOD, self._last_raw_ts, self._ssrc

    def _drop_stray(self) -> None:
        if self._stray is not None:
            self._stray = None
            self.packets_dropped += 1

    def _take(self, packet: RtpPacket, lost: int = 0) -> list[AccessUnit]:
        """``packet``, in sequence, ``lost`` packets after the last, into the unit being gathered; the units it
        completes."""
        out: list[AccessUnit] = []
        if not self._synced:
            if not starts_unit(packet.payload):
                return out  # the rest of a unit sent before this reader joined
            self._synced = True
        ts = self._unwrap(packet.timestamp)
        if self._timestamp is not None and ts != self._timestamp and self._unit:
            # A camera that does not set the marker (or whose marker packet was lost): the last unit ended. A
            # loss here may have been its last packets or the next unit's first: neither can be trusted, and
            # the one flag must not be spent on the first alone (the next, an IDR missing its first slice,
            # went out as a keyframe).
            self._broken = self._broken or bool(lost)
            out += self._finish()
        self._broken = self._broken or bool(lost)
        self._timestamp = ts
        try:
            self._add(packet.payload)
        except RtspError:
            self._broken = True
            if packet.marker:
                out += self._finish()
            raise
        if packet.marker:
            out += self._finish()
        return out

    def _restart(self) -> None:
        """The camera restarted its stream: what was gathered of the old one goes, the new one starts at an
        IDR."""
        self.resyncs += 1
        if self._unit:
            self.units_dropped += 1
        self._clear()
        self._broken = False
        self._timestamp, self._last_seq = None, None
        self._wait_idr, self._synced = True, False

    def _unwrap(self, ts: int) -> int:
        self._last_raw_ts = ts
        if self._last_ts is None:
            self._last_ts = ts
            return ts
        delta = (ts - self._last_ts) % TIMESTAMP_MOD
        if delta >= TIMESTAMP_MOD // 2:
            delta -= TIMESTAMP_MOD
        self._last_ts += delta
        return self._last_ts

    def _count(self, length: int, kind: int, fu: int | None = None) -> None:
        """A whole NAL unit of ``length`` bytes and type ``kind`` counted in the unit (an FU-A's, at ``fu`` in
        it, is there already: it goes if the unit would be over its cap)."""
        self._size += length + NAL_OVERHEAD
        if self._size > MAX_UNIT_BYTES:
            if fu is not None:
                del self._unit[fu - len(START_CODE) :]
                self._kinds.pop()
                self._starts.pop()
            raise RtspError(f"access unit over {MAX_UNIT_BYTES} bytes (no marker bit, no new timestamp)")
        self._keyframe = self._keyframe or kind == NAL_IDR

    def _keep(self, nal: bytes | memoryview) -> None:
        self._count(len(nal), nal[0] & 0x1F)
        self._unit += START_CODE
        self._starts.append(len(self._unit))
        self._unit += nal
        self._kinds.append(nal[0] & 0x1F)

    def _fragment(self, payload: memoryview) -> None:
        """An FU-A's fragment (``payload``: its indicator, its header, its bytes), its start already taken."""
        unit, fu = self._unit, self._fu
        assert fu is not None
        unit += payload[2:]
        if len(unit) - fu + self._size > MAX_UNIT_BYTES:
            self._drop_fu()
            raise RtspError(f"access unit over {MAX_UNIT_BYTES} bytes (an FU-A that never ends)")
        if payload[1] & 0x40:  # its end
            self._fu = None
            self._count(len(unit) - fu, payload[1] & 0x1F, fu)

    def _drop_fu(self) -> None:
        """The FU-A being gathered goes (its start and the fragments so far)."""
        assert self._fu is not None
        del self._unit[self._fu - len(START_CODE) :]
        self._kinds.pop()
        self._starts.pop()
        self._fu = None

    def _add(self, payload: bytes) -> None:
        if not payload:
            raise RtspError("empty RTP payload")
        kind = payload[0] & 0x1F
        if self._fu is not None and kind != NAL_FU_A:
            # The unit is one buffer: this NAL unit would land inside the FU-A's bytes. RFC 6184 5.8 wants an
            # FU-A's fragments consecutive, so the unit is broken (dropped, and the stream waits for an IDR).
            self._drop_fu()
            raise RtspError(f"NAL unit (type {kind}) inside an FU-A, before its last fragment")
        if 1 <= kind <= 23:
            self._keep(payload)
        elif kind == NAL_STAP_A:
            pos = 1
            view = memoryview(payload)
            while pos < len(payload):
                if pos + 2 > len(payload):
                    raise RtspError(f"STAP-A size field cut off at byte {pos} of {len(payload)}")
                size = int.from_bytes(payload[pos : pos + 2], "big")
                pos += 2
                if size == 0 or pos + size > len(payload):
                    raise RtspError(f"STAP-A NAL unit of {size} bytes overruns its packet ({len(payload) - pos} left)")
                self._keep(view[pos : pos + size])
                pos += size
        elif kind == NAL_FU_A:
            if len(payload) < 3:
                raise RtspError(f"FU-A of {len(payload)} bytes has no fragment")
            start, nal_kind = payload[1] & 0x80, payload[1] & 0x1F
            if start:
                if self._fu is not None:
                    self._drop_fu()
                    raise RtspError(f"FU-A start (NAL type {nal_kind}) before the last fragment ended")
                self._unit += START_CODE
                self._fu = len(self._unit)
                self._starts.append(self._fu)
                self._unit.append((payload[0] & 0xE0) | nal_kind)
                self._kinds.append(nal_kind)
            elif self._fu is None:
                raise RtspError(f"FU-A fragment without its start (NAL type {nal_kind})")
            self._fragment(memoryview(payload))
        elif kind in NAL_INTERLEAVED_ONLY:
            raise RtspError(f"RTP H.264 {NAL_INTERLEAVED_ONLY[kind]} (type {kind}) is interleaved mode only")
        else:
            raise RtspError(f"RTP H.264 NAL unit type {kind} is undefined")

    def _clear(self) -> None:
        self._unit, self._size, self._keyframe, self._fu = bytearray(), 0, False, None
        self._kinds, self._starts = [], []

    def _finish(self) -> list[AccessUnit]:
        unit, keyframe, whole, kinds, starts = self._unit, self._keyframe, self._size > 0, self._kinds, self._starts
        broken = self._broken or self._fu is not None
        self._clear()
        self._broken = False
        if not whole and not broken:
            return []
        if broken or (self._wait_idr and not keyframe):
            self._wait_idr = True
            self.units_dropped += 1
            return []
        self._wait_idr = False
        self.units += 1
        assert self._timestamp is not None
        return [AccessUnit(bytes(unit), self._timestamp, keyframe, tuple(kinds), tuple(starts))]

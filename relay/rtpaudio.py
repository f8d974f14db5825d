"""RTP audio in: a camera's sound track, from its SDP to coded frames, sans-io.

Plain values in, plain values out, no sockets and no clocks (the capture
thread's driver, ``relay.camera.rtspsource``, does the I/O):

- ``parse_sdp_audio``: the first audio media of a DESCRIBE answer that
  camrelay reads (``SdpAudio``): Opus, AAC (``mpeg4-generic``, RFC 3640
  AAC-hbr; ``MP4A-LATM``, RFC 6416, with ``cpresent=0``), G.711 (PCMU,
  PCMA; static payload types 0 and 8 too). One it does not read is refused
  with an ``RtspError`` that says why (the video goes on alone).
- ``AudioDepacketizer``: RTP packets of that track into ``CodedAudio`` frames,
  each stamped in RTP clock ticks (unwrapped) with its length in ticks. A packet
  it cannot read (a truncated AU header, AU sizes that do not add up, an empty
  payload, a payload type not the track's) is dropped and counted
  (``packets_dropped``, ``last_error``), never raised: a broken audio track
  must never stop the video read beside it. Sequence gaps are counted
  (``packets_lost``); late and duplicate packets dropped and counted.
- ``parse_sender_report`` and ``rtp_at``: an RTCP sender report (RFC 3550
  6.4.1) pairs a track's RTP clock with the camera's NTP clock; two of them,
  the video's and the sound's, say which video RTP time a sound frame was
  captured at, so the sound lands on the video's capture clock (lip sync).
- ``opus_samples``: an Opus packet's length in 48 kHz samples, from its TOC
  byte (RFC 6716 3.1): a camera's packets may be 10, 20, 40 or 60 ms.

Opus frames are passed through as they are; AAC and G.711 are decoded and
encoded once to Opus in the worker (``relay.camera.cameraaudio``).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

from .ipc import MAX_AUDIO_PAYLOAD
from .rtspin import (
    MAX_DROPOUT,
    MAX_MISORDER,
    SEQUENCE_MOD,
    TIMESTAMP_MOD,
    RtspError,
    control_url,
    decimal,
    first_format,
    parse_rtp,
    sdp_media,
)

# Codecs by their SDP encoding name, in FFmpeg's decoders' names.
AUDIO_CODECS = {"opus": "opus", "mpeg4-generic": "aac", "mp4a-latm": "aac", "pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}
# RFC 3551: the static audio payload types cameras use (G.711 at 8 kHz, mono), often with no rtpmap.
STATIC_AUDIO_TYPES = {0: ("pcmu", 8000, 1), 8: ("pcma", 8000, 1)}
# AAC frames hold 1024 samples (AAC-LC; 960-sample frames are for DAB, which cameras do not send).
AAC_FRAME_SAMPLES = 1024
# One coded audio frame as gathered from fragments: AAC at its highest rate is a few KiB a frame; more is a
# camera that never ends one, which must not take the worker's memory.
MAX_FRAME_BYTES = 64 * 1024
OPUS_RATE = 48000  # RFC 7587: Opus's RTP clock is 48 kHz whatever the rate it was encoded at
# An Opus frame's length by its TOC config (RFC 6716 3.1), in 48 kHz samples: SILK 10/20/40/60 ms, hybrid
# 10/20 ms, CELT 2.5/5/10/20 ms.
OPUS_FRAME_SAMPLES = (480, 960, 1920, 2880) * 3 + (480, 960) * 2 + (120, 240, 480, 960) * 4
OPUS_MAX_SAMPLES = 5760  # 120 ms: the longest packet RFC 6716 allows
HEX = re.compile(r"[0-9A-Fa-f]*")
RTCP_SR = 200  # RFC 3550 6.4.1: a sender report's packet type
SR_BYTES = 28  # its header, SSRC, NTP timestamp (64 bits), RTP timestamp, up to the packet count
NTP_FRACTION = 1 << 32


@dataclass(frozen=True, slots=True)
class SenderReport:
    """A camera's word that RTP time ``rtp`` of track ``ssrc`` was NTP time ``ntp`` (seconds) on its clock."""

    ssrc: int
    ntp: float
    rtp: int  # as sent: 32 bits


def parse_sender_report(data: bytes) -> SenderReport | None:
    """The sender report that starts an RTCP (compound) packet; None when it starts with any other report or
    cannot be one (a camera's RTCP is never worth an error: the sound falls back to its own anchoring)."""
    if len(data) < SR_BYTES or data[0] >> 6 != 2 or data[1] != RTCP_SR:
        return None
    ssrc, msw, lsw, rtp = (
        int.from_bytes(data[4:8], "big"),
        *(int.from_bytes(data[i : i + 4], "big") for i in (8, 12, 16)),
    )
    return SenderReport(ssrc, msw + lsw / NTP_FRACTION, rtp)


def signed32(delta: int) -> int:
    """A difference of two 32-bit RTP timestamps, the short way round."""
    delta %= TIMESTAMP_MOD
    return delta - TIMESTAMP_MOD if delta >= TIMESTAMP_MOD // 2 else delta


def rtp_at(ts: int, rate: int, report: SenderReport, other: SenderReport, other_rate: int) -> int:
    """The RTP time (32 bits) of the track ``other`` reports on at the instant RTP time ``ts`` of the track
    ``report`` reports on (clock ``rate``) was captured: both through the camera's NTP clock."""
    ntp = report.ntp + signed32(ts - report.rtp) / rate
    return (other.rtp + round((ntp - other.ntp) * other_rate)) % TIMESTAMP_MOD


@dataclass(frozen=True, slots=True)
class SdpAudio:
    codec: str  # FFmpeg's decoder: opus, aac, pcm_mulaw, pcm_alaw
    payload_type: int
    clock_rate: int  # the RTP clock, which is the sample rate for AAC and G.711
    channels: int
    control: str  # the URL to SETUP
    config: bytes = b""  # AAC's AudioSpecificConfig (fmtp config=), the decoder's extradata
    fmtp: dict[str, str] = field(default_factory=dict)
    size_length: int = 0  # AAC: bits of an AU header's size
    index_length: int = 0  # AAC: bits of the first AU header's index, and of each next one's index delta
    latm: bool = False  # AAC in MP4A-LATM (RFC 6416, cpresent=0): length-prefixed units, no AU headers


@dataclass(frozen=True, slots=True)
class CodedAudio:
    """One coded frame of a camera's sound (an AAC access unit, an Opus packet, a run of G.711 samples)."""

    data: bytes
    pts: int  # RTP clock ticks, unwrapped (never back to 0)
    samples: int  # its length in RTP clock ticks


def parse_sdp_audio(text: str, base: str) -> SdpAudio:
    """The first audio media of a DESCRIBE answer (``base``: Content-Base, else the URL described); an
    ``RtspError`` saying why when there is none, or when it is no codec read here."""
    session_control, media = sdp_media(text)
    pt, rtpmap, fmtp, control = first_format(media, "audio")
    if rtpmap is not None:
        name, _, rest = rtpmap.partition("/")
        rate_text, _, channels_text = rest.partition("/")
        rate = decimal(rate_text)
        channels = decimal(channels_text) if channels_text else 1
        if not rate or not channels:
            raise RtspError(f"bad audio rtpmap {rtpmap[:40]!r}")
        encoding = name.strip().lower()
    elif pt in STATIC_AUDIO_TYPES:
        encoding, rate, channels = STATIC_AUDIO_TYPES[pt]
    else:
        raise RtspError(f"audio payload type {pt} has no rtpmap")
    codec = AUDIO_CODECS.get(encoding)
    if codec is None:
        raise RtspError(f"audio codec {encoding!r} is not read here (Opus, AAC mpeg4-generic, PCMU, PCMA)")
    base = control_url(session_control, base) if session_control not in (None, "*") else base
    url = control_url(control, base)
    if codec == "opus":
        return SdpAudio(codec, pt, OPUS_RATE, 2, url, fmtp=fmtp)  # RFC 7587: always opus/48000/2
    if codec != "aac":
        return SdpAudio(codec, pt, rate, channels, url, fmtp=fmtp)
    if encoding == "mp4a-latm":
        return SdpAudio(codec, pt, rate, channels, url, latm_config(fmtp), fmtp, latm=True)
    mode = fmtp.get("mode", "").lower()
    if mode != "aac-hbr":
        raise RtspError(f"AAC mode {fmtp.get('mode', '(none)')!r} is not read here (AAC-hbr only)")
    config = fmtp.get("config", "")
    if not config or not HEX.fullmatch(config) or len(config) % 2:
        raise RtspError(f"AAC config {config[:40]!r} is not hex")
    size_length = decimal(fmtp.get("sizelength", ""))
    index_length = decimal(fmtp.get("indexlength", ""))
    delta_length = decimal(fmtp.get("indexdeltalength", ""))
    if size_length != 13 or index_length != 3 or delta_length != 3:
        raise RtspError(
            "AAC-hbr AU headers must be sizelength=13 indexlength=3 indexdeltalength=3, not "
            f"{fmtp.get('sizelength')}/{fmtp.get('indexlength')}/{fmtp.get('indexdeltalength')}"
        )
    return SdpAudio(codec, pt, rate, channels, url, binascii.unhexlify(config), fmtp, size_length, index_length)


# StreamMuxConfig (ISO 14496-3 1.7.3) with audioMuxVersion 0: 1 bit of version, 1 of allStreamsSameTimeFraming,
# 6 of numSubFrames, 4 of numProgram, 3 of numLayer, then the AudioSpecificConfig.
LATM_ASC_BIT = 15
AAC_PLAIN_TYPES = (1, 2, 4)  # AAC Main, LC, LTP: an AudioSpecificConfig of fixed fields (GASpecificConfig: 3 bits)


def latm_config(fmtp: dict[str, str]) -> bytes:
    """The AudioSpecificConfig (the decoder's extradata) in an MP4A-LATM SDP's StreamMuxConfig (``config=``,
    with ``cpresent=0``: it is out of band); ``RtspError`` for what is not read here."""
    if fmtp.get("cpresent", "1") != "0":
        raise RtspError("MP4A-LATM with its config in band (cpresent=1) is not read here")
    config = fmtp.get("config", "")
    if not config or not HEX.fullmatch(config) or len(config) % 2:
        raise RtspError(f"MP4A-LATM config {config[:40]!r} is not hex")
    bits = len(config) * 4
    value = int(config, 16)
    if value >> (bits - 1):
        raise RtspError("MP4A-LATM audioMuxVersion 1 is not read here")
    rest = bits - LATM_ASC_BIT

    def field(at: int, width: int) -> int:
        return (value >> (rest - at - width)) & ((1 << width) - 1) if at + width <= rest else -1

    aot, at = field(0, 5), 5
    frequency = field(at, 4)
    at += 4 + (24 if frequency == 15 else 0)
    length = at + 4 + 3 if aot in AAC_PLAIN_TYPES else rest  # channels, GASpecificConfig; else all that is left
    if aot < 0 or length > rest:
        raise RtspError(f"MP4A-LATM config {config[:40]!r} is cut short")
    asc = (value >> (rest - length)) & ((1 << length) - 1)
    padded = (length + 7) // 8 * 8
    return (asc << (padded - length)).to_bytes(padded // 8, "big")


def opus_samples(packet: bytes) -> int:
    """An Opus packet's length in 48 kHz samples (RFC 6716 3.1: its TOC byte, and frame count); ``RtspError``
    when the packet cannot be one."""
    if not packet:
        raise RtspError("empty Opus packet")
    toc = packet[0]
    per_frame = OPUS_FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise RtspError("Opus packet of code 3 has no frame count")
        frames = packet[1] & 0x3F
        if not frames:
            raise RtspError("Opus packet of code 3 with 0 frames")
    if per_frame * frames > OPUS_MAX_SAMPLES:
        raise RtspError(f"Opus packet of {per_frame * frames} samples is over 120 ms")
    return per_frame * frames


class AudioDepacketizer:
    """RTP packets of one audio track (``SdpAudio``) into ``CodedAudio`` frames; every bad packet counted."""

    def __init__(self, track: SdpAudio) -> None:
        self.track = track
        self.packets = 0  # read, of the track's payload type
        self.frames = 0  # handed on
        self.packets_lost = 0  # by sequence gaps
        self.packets_dropped = 0  # late, duplicate, or unreadable (last_error says why)
        self.last_error = ""
        self._last_seq: int | None = None
        self._last_ts: int | None = None  # unwrapped
        self._raw_ts = 0
        self._fragment = bytearray()  # an AAC frame cut over packets (RFC 3640 3.2.3), so far
        self._fragment_size = 0  # its size, from its first packet's AU header
        self._fragment_ts: int | None = None

    def push(self, data: bytes) -> list[CodedAudio]:
        """The frames one RTP packet completes; a packet that cannot be read gives none (counted)."""
        try:
            packet = parse_rtp(data)
            if packet.payload_type != self.track.payload_type:
                raise RtspError(f"RTP payload type {packet.payload_type}, not the audio's {self.track.payload_type}")
            self.packets += 1
            if self._last_seq is not None:
                delta = (packet.sequence - self._last_seq) % SEQUENCE_MOD
                if delta == 0 or delta >= SEQUENCE_MOD - MAX_MISORDER:
                    self.packets_dropped += 1
                    self.last_error = f"late or duplicate RTP packet {packet.sequence}"
                    return []
                if delta <= MAX_DROPOUT:
                    self.packets_lost += delta - 1
                if delta > 1:
                    self._drop_fragment()
            self._last_seq = packet.sequence
            frames = self._frames(packet.payload, self._unwrap(packet.timestamp), packet.marker)
        except RtspError as exc:
            self.packets_dropped += 1
            self.last_error = str(exc)
            return []
        self.frames += len(frames)
        return frames

    def _unwrap(self, ts: int) -> int:
        if self._last_ts is None:
            self._last_ts, self._raw_ts = ts, ts
            return ts
        delta = (ts - self._raw_ts) % TIMESTAMP_MOD
        if delta >= TIMESTAMP_MOD // 2:
            delta -= TIMESTAMP_MOD
        self._raw_ts = ts
        self._last_ts += delta
        return self._last_ts

    def _frames(self, payload: bytes, ts: int, marker: bool) -> list[CodedAudio]:
        codec = self.track.codec
        if not payload:
            raise RtspError("empty RTP payload")
        if codec == "opus":  # passed through: to each viewer as it came, one datagram
            if len(payload) > MAX_AUDIO_PAYLOAD:
                raise RtspError(f"Opus packet of {len(payload)} bytes is over the {MAX_AUDIO_PAYLOAD} a viewer's"
                                " datagram carries")  # fmt: skip
            return [CodedAudio(payload, ts, opus_samples(payload))]
        if codec == "aac" and self.track.latm:
            return self._latm(payload, ts)
        if codec == "aac":
            return self._aac(payload, ts, marker)
        channels = self.track.channels
        if len(payload) % channels:
            raise RtspError(f"G.711 payload of {len(payload)} bytes is not whole samples of {channels} channels")
        return [CodedAudio(payload, ts, len(payload) // channels)]

    def _aac(self, payload: bytes, ts: int, marker: bool) -> list[CodedAudio]:
        """RFC 3640 AAC-hbr: AU-headers-length (16 bits, in bits), 16-bit AU headers (13 bits of size, 3 of
        index or index delta), then the AUs' bytes in order; one AU may be cut over packets, marker on its last."""
        if len(payload) < 2:
            raise RtspError(f"AAC payload of {len(payload)} bytes has no AU-headers-length")
        bits = int.from_bytes(payload[:2], "big")
        header_bits = self.track.size_length + self.track.index_length
        if bits == 0 or bits % header_bits:
            raise RtspError(f"AU-headers-length of {bits} bits is not whole {header_bits}-bit AU headers")
        head_end = 2 + (bits + 7) // 8
        if head_end > len(payload):
            raise RtspError(f"AU headers of {bits} bits overrun the payload of {len(payload)} bytes")
        sizes = []
        for i in range(bits // header_bits):
            header = int.from_bytes(payload[2 + 2 * i : 4 + 2 * i], "big")
            sizes.append(header >> self.track.index_length)
            if i and header & ((1 << self.track.index_length) - 1):
                raise RtspError("AAC AU index delta is not 0 (interleaving is not read here)")
        data = memoryview(payload)[head_end:]
        if self._fragment_ts is not None and (ts != self._fragment_ts or len(sizes) != 1):
            self._drop_fragment()
            raise RtspError("AAC fragment without its end (a new AU came)")
        if len(sizes) == 1 and sizes[0] > len(data):  # a fragment of one AU
            if self._fragment_ts is None:
                self._fragment_ts, self._fragment_size = ts, sizes[0]
            elif sizes[0] != self._fragment_size:
                self._drop_fragment()
                raise RtspError(f"AAC fragment of an AU of {sizes[0]} bytes, its first said {self._fragment_size}")
            self._fragment += data
            if len(self._fragment) > min(self._fragment_size, MAX_FRAME_BYTES):
                self._drop_fragment()
                raise RtspError(f"AAC fragments overrun their AU of {sizes[0]} bytes")
            if not marker:
                return []
            whole = len(self._fragment) == self._fragment_size
            frame = bytes(self._fragment)
            self._drop_fragment()
            if not whole:
                raise RtspError(f"AAC AU of {sizes[0]} bytes ended with {len(frame)}")
            return [CodedAudio(frame, ts, AAC_FRAME_SAMPLES)]
        if sum(sizes) != len(data):
            raise RtspError(f"AAC AU sizes {sizes} do not add up to the {len(data)} bytes after the AU headers")
        out, pos = [], 0
        for i, size in enumerate(sizes):
            if not size:
                raise RtspError("AAC AU of 0 bytes")
            out.append(CodedAudio(bytes(data[pos : pos + size]), ts + i * AAC_FRAME_SAMPLES, AAC_FRAME_SAMPLES))
            pos += size
        return out

    def _latm(self, payload: bytes, ts: int) -> list[CodedAudio]:
        """RFC 6416 (cpresent=0): one or more units, each after its PayloadLengthInfo (bytes of 255, then the
        rest of its length)."""
        out, pos = [], 0
        while pos < len(payload):
            size = 0
            while pos < len(payload) and payload[pos] == 255:
                size += 255
                pos += 1
            if pos == len(payload):
                raise RtspError("MP4A-LATM length cut off")
            size += payload[pos]
            pos += 1
            if not size or pos + size > len(payload):
                raise RtspError(f"MP4A-LATM unit of {size} bytes overruns its packet ({len(payload) - pos} left)")
            out.append(CodedAudio(payload[pos : pos + size], ts + len(out) * AAC_FRAME_SAMPLES, AAC_FRAME_SAMPLES))
            pos += size
        return out

    def _drop_fragment(self) -> None:
        if self._fragment_ts is not None:
            self._fragment_ts, self._fragment_size = None, 0
            self._fragment = bytearray()

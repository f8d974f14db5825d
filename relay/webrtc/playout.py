"""The playout-delay RTP header extension: how soon a browser may show each frame (sans-io).

``http://www.webrtc.org/experiments/rtp-hdrext/playout-delay`` (libwebrtc's
``docs/native-code/rtp-hdrext/playout-delay``): three bytes, the least and the
most delay the receiver may add before rendering a frame, 12 bits each, in
units of 10 ms. Chromium offers it on video. With a minimum of 0 and a
maximum of at most 500 ms it renders each frame as soon as it is decoded
(its "low-latency renderer"), instead of holding it for its jitter buffer's
target; a maximum of 0 also turns off the smoothing of when frames are shown.
aiortc neither negotiates nor sends it: a session adds it to its answer when
the offer has it (``offered_id``, then ``relay.webrtc.borrowed.answer_extension``)
and its sender adds it to every video packet (``add_elements``,
``relay.webrtc.rtpsend``). ``[webrtc] playout_delay`` sets the two values, or
turns it off (``relay.config``).
"""

from __future__ import annotations

from aiortc.rtp import pack_header_extensions, unpack_header_extensions

from ..config import PLAYOUT_DELAY_MAX_MS as MAX_MS
from ..config import PLAYOUT_DELAY_UNIT_MS as UNIT_MS

URI = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"
RTP_FIXED_HEADER = 12  # bytes before the CSRCs
EXTENSION_BIT = 0x10  # in the first byte: a header extension follows the CSRCs


class RtpHeaderError(ValueError):
    """Not an RTP header this module can add to; ``str()`` says why."""


def value(min_ms: int, max_ms: int) -> bytes:
    """The extension's three bytes for a delay of ``min_ms`` to ``max_ms`` (as ``relay.config`` checks them:
    multiples of ``UNIT_MS``, 0 <= min <= max <= ``MAX_MS``)."""
    if not (0 <= min_ms <= max_ms <= MAX_MS and min_ms % UNIT_MS == 0 and max_ms % UNIT_MS == 0):
        raise ValueError(f"playout delay {min_ms},{max_ms} ms is not one the extension carries")
    packed = (min_ms // UNIT_MS) << 12 | (max_ms // UNIT_MS)
    return packed.to_bytes(3, "big")


def read(data: bytes) -> tuple[int, int]:
    """``(min_ms, max_ms)`` from the extension's three bytes."""
    if len(data) != 3:
        raise ValueError(f"a playout delay is 3 bytes, got {len(data)}")
    packed = int.from_bytes(data, "big")
    return (packed >> 12) * UNIT_MS, (packed & 0xFFF) * UNIT_MS


def offered_id(offer: str, mid: str | None) -> int | None:
    """The extmap id the offer gives playout-delay in the media section whose ``a=mid`` is ``mid``; None when it
    offers none there."""
    section_mid, found = None, None
    for raw in offer.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            if section_mid == mid and found is not None:
                return found
            section_mid, found = None, None
        elif line.startswith("a=mid:"):
            section_mid = line[len("a=mid:") :]
        elif line.startswith("a=extmap:"):
            key, _, uri = line[len("a=extmap:") :].partition(" ")
            number = key.split("/")[0]
            if uri.split(" ")[0] == URI and number.isdigit():
                found = int(number)
    return found if section_mid == mid else None


def add_elements(header: bytes, elements: tuple[tuple[int, bytes], ...]) -> bytes:
    """An RTP header (fixed part, CSRCs and any header extension; no payload) with ``elements`` (id, value) added
    to its header extension, which it gains if it had none (RFC 8285: one-byte form while every id fits in 4
    bits, else two-byte)."""
    if len(header) < RTP_FIXED_HEADER or header[0] >> 6 != 2:
        raise RtpHeaderError("not an RTP version 2 header")
    fixed = RTP_FIXED_HEADER + 4 * (header[0] & 0x0F)
    found: list[tuple[int, bytes]] = []
    if header[0] & EXTENSION_BIT:
        if len(header) < fixed + 4:
            raise RtpHeaderError("header extension cut short")
        profile = int.from_bytes(header[fixed : fixed + 2], "big")
        end = fixed + 4 + 4 * int.from_bytes(header[fixed + 2 : fixed + 4], "big")
        if len(header) != end:
            raise RtpHeaderError(f"header is {len(header)} bytes, its extension says {end}")
        found = list(unpack_header_extensions(profile, header[fixed + 4 : end]))
    profile, data = pack_header_extensions(found + list(elements))
    first = bytes([header[0] | EXTENSION_BIT])
    return b"".join((first, header[1:fixed], profile.to_bytes(2, "big"), (len(data) // 4).to_bytes(2, "big"), data))

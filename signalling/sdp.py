"""Checks on a WHEP offer before any peer connection is made.

Sans-io: text in, an ``OfferSummary`` or an ``SdpError`` with a one-line
reason out. aiortc's own parser raises assorted exception types on bad input
(AssertionError, KeyError, ...); these checks turn the common mistakes into
clear 400s and keep garbage away from it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay import h264

MAX_LINES = 2000  # a browser offer is ~100 lines; far more is abuse
# A session's remote candidates, offered and trickled together. A browser gathers fewer than 20 (a host candidate
# per interface and address family, a server-reflexive and a relayed one); aioice re-sorts its whole check list at
# each one added, in the event loop every viewer is fed from: 1,000 candidates stalled it 0.2 s, 3,000 11 s.
MAX_CANDIDATES = 40
# What an offer or a trickled fragment may not hold: every control character but the tab and CR LF line ends, and
# the other characters Python's str.splitlines(), which aiortc's parser splits on, takes for a line's end. Without
# them the lines checked here are exactly the lines aiortc applies ("a=x:1\x0ba=extmap:300 ..." was one harmless
# line here and two lines there).
FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]|\r(?![\r\n])")
# The same two ways apart: a character class alone is scanned fast, a CR's look-ahead alone is a literal search;
# the two at once tried both at every character (62 µs for Chromium's 6 KB offer; apart, 27).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")
_LONE_CR = re.compile(r"\r(?![\r\n])")
_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([A-Za-z0-9_.-]+)/(\d+)")
_FMTP = re.compile(r"^a=fmtp:(\d+) (.*)$")
# <fmt> is a token: payload types for RTP, "webrtc-datachannel" for a data channel (RFC 8841).
_MLINE = re.compile(r"^m=(\w+) (\d+)(?:/\d+)? ([A-Za-z/]+)((?: [0-9A-Za-z._-]+)*)$")
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


# Ranges of the numbers an offer carries, by what they are. Out of range, aiortc
# accepts some of them and fails later, in the viewer's send loop (an extmap id
# of 256 was an AssertionError per packet): they are refused up front instead.
PAYLOAD_TYPE = (0, 127)  # RTP's payload type has 7 bits
EXTMAP_ID = (1, 255)  # RFC 8285: 1-14 one-byte, up to 255 two-byte headers
PORT = (0, 65535)
UINT32 = (0, 2**32 - 1)  # SSRCs, candidate priorities, clock rates
COMPONENT = (1, 256)  # RFC 8445 candidate component ID
CHANNELS = (1, 255)


class SdpError(ValueError):
    """The offer is not one this relay can answer; ``str()`` is the reason."""


def _number(text: str, bounds: tuple[int, int], what: str) -> int:
    """``text`` as a whole number within ``bounds``; ``SdpError`` naming ``what`` otherwise."""
    lo, hi = bounds
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise SdpError(f"{what} {text[:20]!r} is not a number in {lo}..{hi}")
    n = int(text)
    if not lo <= n <= hi:
        raise SdpError(f"{what} {n} is outside {lo}..{hi}")
    return n


def _payload_type(text: str, what: str) -> None:
    if text != "*":  # rtcp-fb:* applies to every payload type
        _number(text, PAYLOAD_TYPE, what)


def check_candidate(value: str) -> None:
    """The numbers of a candidate (the text after ``a=candidate:``): component, priority, ports."""
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise SdpError(
            f"candidate {value[:80]!r} is not 'foundation component transport priority address port typ type'"
        )
    _number(bits[1], COMPONENT, "candidate component")
    _number(bits[3], UINT32, "candidate priority")
    _number(bits[5], PORT, "candidate port")
    for key, value_ in zip(bits[8::2], bits[9::2], strict=False):
        if key == "rport":
            _number(value_, PORT, "candidate rport")
        elif key == "generation":
            _number(value_, UINT32, "candidate generation")


def _check_rtpmap(value: str) -> None:
    pt, _, desc = value.partition(" ")
    _number(pt, PAYLOAD_TYPE, "a=rtpmap payload type")
    parts = desc.split("/")
    if len(parts) > 1:
        _number(parts[1], UINT32, "a=rtpmap clock rate")
    if len(parts) > 2:
        _number(parts[2], CHANNELS, "a=rtpmap channels")


def _check_fmtp(value: str) -> None:
    pt, _, params = value.partition(" ")
    _number(pt, PAYLOAD_TYPE, "a=fmtp payload type")
    for param in params.split(";"):
        key, eq, n = param.strip().partition("=")
        if eq and key == "apt":
            _number(n, PAYLOAD_TYPE, "a=fmtp apt")


def _check_ssrc_group(value: str) -> None:
    for ssrc in value.split()[1:]:
        _number(ssrc, UINT32, "a=ssrc-group ssrc")


def _first(bounds: tuple[int, int], what: str):
    """A check of an attribute's first word (before a space) as a number within ``bounds``."""
    return lambda value: _number(value.split(" ", 1)[0], bounds, what)


# The attributes whose numbers are range-checked, by name: one look-up a line, where a chain of comparisons ran
# a dozen for each attribute that has none (most of an offer's lines).
_ATTRIBUTE_CHECKS = {
    "rtpmap": _check_rtpmap,
    "fmtp": _check_fmtp,
    "rtcp-fb": lambda value: _payload_type(value.split(" ", 1)[0], "a=rtcp-fb payload type"),
    "extmap": lambda value: _number(value.split(" ", 1)[0].split("/")[0], EXTMAP_ID, "a=extmap id"),
    "ssrc": _first(UINT32, "a=ssrc"),
    "ssrc-group": _check_ssrc_group,
    "rtcp": _first(PORT, "a=rtcp port"),
    "sctp-port": _first(PORT, "a=sctp-port port"),
    "sctpmap": _first(PORT, "a=sctpmap port"),
    "max-message-size": lambda value: _number(value, UINT32, "a=max-message-size"),
    "candidate": check_candidate,
}


# The commonest lines whose numbers are in range, in the shapes browsers write them (a Chromium offer has ~150 of
# them): matched by one pattern instead of checked number by number. A sufficient test only: a line it does not
# match is checked as any other (and may well pass). Each number's pattern admits only values within its bounds.
_PT = r"(?:[0-9]|[1-9][0-9]|1[01][0-9]|12[0-7])"  # PAYLOAD_TYPE, no leading zeros
_ID = r"(?:[1-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])"  # EXTMAP_ID and CHANNELS
_IN_RANGE = re.compile(
    rf"a=(?:rtcp-fb:(?:{_PT}|\*)(?: |$)"
    rf"|rtpmap:{_PT} [A-Za-z0-9_.-]+/[0-9]{{1,9}}(?:/{_ID})?$"  # clock rate: 9 digits are within UINT32
    rf"|fmtp:{_PT} (?:(?!.*apt).*|apt={_PT})$"  # an apt is checked; any other parameter is not
    rf"|extmap:{_ID}(?:[/ ]|$))"
)


# The lines that carry numbers to check: media lines and the attributes above.
_NUMBERED = re.compile(r"m=|a=(?:" + "|".join(map(re.escape, _ATTRIBUTE_CHECKS)) + r")(?::|$)")


def _check_numbers(line: str) -> None:
    """Range-check the numbers of one offer line; other lines pass."""
    if _IN_RANGE.match(line) is not None or _NUMBERED.match(line) is None:
        return  # two patterns tried, where most lines took a dozen steps in Python
    if line.startswith("a="):
        attr, _, value = line[2:].partition(":")
        _ATTRIBUTE_CHECKS[attr](value)
    else:
        bits = line[2:].split()
        if len(bits) >= 2:
            _number(bits[1].split("/")[0], PORT, "media port")
        if bits and bits[0] in ("audio", "video"):
            for pt in bits[3:]:
                _number(pt, PAYLOAD_TYPE, "media payload type")


@dataclass(frozen=True, slots=True)
class OfferSummary:
    video_sections: int
    h264_payload_types: tuple[int, ...]
    direction: str
    served: int  # index of the m-section the relay answers; every other one is rejected


def _lines(text: str) -> list[str]:
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _split(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """(session-level lines, the lines of each m-section, its m= line first)."""
    session: list[str] = []
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            session.append(line)
    return session, sections


# The texts split last, kept: an offer is split by check_offer and then find_audio, the offer as aiortc sees it by
# fit_h264 and then offer_for_aiortc, one straight after the other in the same request (each split was ~35 µs
# of a Chromium offer's). A text is at most signalling.whep's MAX_OFFER_BYTES (64 KiB) and, once kept, at most
# MAX_LINES lines (an offer of more is refused before it is kept: ``check_offer``): about 1 MiB held at most.
SPLITS_KEPT = 4


@functools.lru_cache(maxsize=SPLITS_KEPT)
def _parsed(text: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(its lines, the session-level ones, each m-section's): ``_lines`` and ``_split``, as tuples (shared by
    every caller: none changes them)."""
    lines = _lines(text)
    session, sections = _split(lines)
    return tuple(lines), tuple(session), tuple(map(tuple, sections))


def _mid(section: list[str]) -> str | None:
    return next((line[len("a=mid:") :] for line in section if line.startswith("a=mid:")), None)


def check_text(text: str, what: str) -> None:
    """``SdpError`` naming the line and the character when ``text`` (an offer or a fragment) holds a ``FORBIDDEN``
    character."""
    found = min(
        (m for m in (_CONTROL.search(text), _LONE_CR.search(text)) if m is not None), key=re.Match.start, default=None
    )  # the first, as FORBIDDEN.search finds it
    if found is not None:
        line = text.count("\n", 0, found.start()) + 1
        raise SdpError(f"{what} line {line} holds the control character U+{ord(found.group()[0]):04X}")


def check_offer(text: str) -> OfferSummary:
    """Validate a WHEP offer; raises ``SdpError`` with the reason.

    The relay serves the first video m-section that can receive H.264; the
    offer may hold anything else besides (audio, a data channel, more video),
    which the answer rejects, but for the audio a stream with sound sends to
    (``find_audio``). With no such video section the reason is the first video
    section's.
    """
    check_text(text, "offer")
    # Counted before it is kept (``_parsed``): fewer line breaks than MAX_LINES make at most MAX_LINES lines.
    if text.count("\n") >= MAX_LINES and len(many := _lines(text)) > MAX_LINES:
        raise SdpError(f"offer has {len(many)} lines, more than {MAX_LINES}")
    lines, session, sections = _parsed(text)
    if not lines:
        raise SdpError("offer is empty")
    if lines[0] != "v=0":
        raise SdpError("offer does not start with v=0")
    for number, line in enumerate(lines, 1):
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise SdpError(f"line {number} is not of the form x=value")
        try:
            _check_numbers(line)
        except SdpError as exc:
            raise SdpError(f"line {number}: {exc}") from None

    if not sections:
        raise SdpError("offer has no media section")
    video = []
    for index, section in enumerate(sections):
        m = _MLINE.match(section[0])
        if m is None:
            raise SdpError(f"malformed media line {section[0][:80]!r}")
        if m.group(1) == "video" and m.group(2) != "0":
            video.append(index)
    if not video:
        raise SdpError("offer has no video section")
    candidates = candidate_count(lines)
    if candidates > MAX_CANDIDATES:
        raise SdpError(f"offer has {candidates} candidates, more than {MAX_CANDIDATES}")
    reasons = []
    for index in video:
        try:
            h264, direction = _check_video(session, sections[index])
        except SdpError as exc:
            reasons.append(exc)
        else:
            return OfferSummary(len(video), h264, direction, index)
    raise reasons[0]


def _check_video(session: list[str], section: list[str]) -> tuple[tuple[int, ...], str]:
    """(usable H.264 payload types, direction) of a video m-section."""
    attrs = "\n" + "\n".join(session + section)  # a line starts with key where "\n" + key is found
    for key, what in (
        ("a=ice-ufrag:", "ICE username fragment"),
        ("a=ice-pwd:", "ICE password"),
        ("a=fingerprint:", "DTLS fingerprint"),
    ):
        if "\n" + key not in attrs:
            raise SdpError(f"offer has no {what} ({key[:-1]})")

    direction = "sendrecv"
    for a in section:
        if a[2:] in _DIRECTIONS:
            direction = a[2:]
    if direction not in ("recvonly", "sendrecv"):
        raise SdpError(f"video section is {direction}; a viewer must offer recvonly or sendrecv")

    h264: list[int] = []
    fmtp: dict[int, str] = {}
    for a in section:
        if not a.startswith(("a=rtpmap:", "a=fmtp:")):
            continue  # neither pattern can match: not tried
        if (r := _RTPMAP.match(a)) and r.group(2).upper() == "H264":
            h264.append(int(r.group(1)))
        elif f := _FMTP.match(a):
            fmtp[int(f.group(1))] = f.group(2)
    if not h264:
        raise SdpError("offer cannot receive H.264 video (no H264 rtpmap in the video section)")
    usable = tuple(pt for pt in h264 if "packetization-mode=1" in fmtp.get(pt, "").replace(" ", ""))
    if not usable:
        raise SdpError("offer's H.264 lacks packetization-mode=1")
    return usable, direction


def find_audio(offer: str) -> int | None:
    """The index of the offer's first audio m-section that can receive Opus (48000/2, recvonly or sendrecv), which
    a stream with sound sends to; None when there is none (the answer rejects any audio, the video plays alone).
    Call it on an offer ``check_offer`` passed."""
    for index, section in enumerate(_parsed(offer)[2]):
        m = _MLINE.match(section[0])
        if m is None or m.group(1) != "audio" or (m.group(2) == "0" and "a=bundle-only" not in section):
            continue
        direction = next((a[2:] for a in reversed(section) if a[2:] in _DIRECTIONS), "sendrecv")
        opus = any((r := _RTPMAP.match(a)) and r.group(2).lower() == "opus" and a.endswith("/48000/2") for a in section)
        if opus and direction in ("recvonly", "sendrecv"):
            return index
    return None


def _kept(served: int, audio: int | None) -> list[int]:
    """The m-sections the relay answers, in the offer's order: the video it serves, and the audio it sends to."""
    return sorted({served} if audio is None else {served, audio})


def served_only(offer: str, served: int, audio: int | None = None) -> str:
    """The offer as the relay's peer connection sees it: its m-section ``served`` alone (and ``audio``, the audio
    section a stream with sound sends to: ``find_audio``).

    aiortc answers every m-section it is given: it accepts a data channel (an
    SCTP association per viewer), takes audio with a receiver of its own
    (answered inactive, or recvonly when the browser offers to send), and fails
    the whole offer on an m-section whose codecs it lacks. So it is shown only
    the sections it sends to, in a BUNDLE group of their own if the offer bundled
    them; ``answer_all`` answers the rest.
    """
    _, session, sections = _parsed(offer)
    kept = _kept(served, audio)
    mids = [mid for index in kept if (mid := _mid(sections[index])) is not None]
    head = []
    for line in session:
        if line.startswith("a=group:"):
            bundled = [mid for mid in line.split()[1:] if mid in mids] if line.startswith("a=group:BUNDLE ") else []
            if bundled:
                head.append(f"a=group:BUNDLE {' '.join(bundled)}")
        else:
            head.append(line)
    return "\r\n".join(head + [line for index in kept for line in sections[index]]) + "\r\n"


def answer_all(offer: str, served: int, answer: str, audio: int | None = None) -> str:
    """The answer to the whole ``offer``, from aiortc's answer to ``served_only(offer, served, audio)``.

    RFC 3264 §6: one m-section per offered one, in the offer's order. Each one
    but ``served`` (and ``audio``) is rejected: port 0, ``a=inactive`` for RTP
    media (nothing is sent nor received), its mid kept and left out of the
    BUNDLE group (RFC 9143 §7.3.3). The sections served are the only ones in
    the group, so one of them is the tagged one even where the offer tagged a
    section rejected here (§7.3.1). No group at all when the offer did not
    bundle the video (§7.3).
    """
    _, offer_session, offered = _parsed(offer)
    session, sections = _split(_lines(answer))
    mid = _mid(offered[served])
    bundled = any(
        line.startswith("a=group:BUNDLE ") and mid in line.split()[1:] for line in offer_session if mid is not None
    )
    lines = [line for line in session if bundled or not line.startswith("a=group:")]
    answered = dict(zip(_kept(served, audio), sections, strict=True))
    for index, section in enumerate(offered):
        lines += answered.get(index) or _rejected(section)
    return "\r\n".join(lines) + "\r\n"


def _rejected(section: list[str]) -> list[str]:
    """The answer's m-section that rejects an offered one (RFC 3264 §6, RFC 8829 §5.3.1)."""
    m = _MLINE.match(section[0])
    assert m is not None  # check_offer matched every m= line
    media, _, proto, formats = m.groups()
    # The formats of a rejected m-section are ignored, but SDP wants one: the offer's first.
    lines = [f"m={media} 0 {proto}{' ' + formats.split()[0] if formats else ''}", "c=IN IP4 0.0.0.0"]
    mid = _mid(section)
    if mid is not None:
        lines.append(f"a=mid:{mid}")
    if "RTP" in proto:
        lines.append("a=inactive")
    return lines


def is_ice_restart(fragment: str, offer: str) -> bool:
    """Whether a trickle fragment (RFC 8840) asks for an ICE restart: it names an ICE ufrag the offer did not."""
    return bool(_ice_ufrags(fragment) - _ice_ufrags(offer))


def _ice_ufrags(text: str) -> set[str]:
    return {line[len("a=ice-ufrag:") :].strip() for line in text.splitlines() if line.startswith("a=ice-ufrag:")}


def unusable_candidate(line: str, from_loopback: bool) -> bool:
    """An ``a=candidate`` line (``line`` stripped) the relay would not use: an address that is not a unicast IP
    address (an mDNS ``<uuid>.local`` name or any other name, multicast, unspecified, broadcast), or a loopback
    one from a viewer not on this machine (``from_loopback``: the client's address is loopback).

    Browsers hide their addresses behind ``.local`` names. Resolving them would
    send multicast queries on the LAN for nothing: the viewer's own ICE checks
    reach the relay's host candidates, which then learns the viewer's real
    address as a peer-reflexive candidate. The others are no viewer's: checks
    to them would be STUN sent where a viewer points it (the relay's own
    loopback services, multicast groups).
    """
    if not line.startswith("a=candidate:"):
        return False  # before the split: most lines are not candidates
    parts = line.split()
    if len(parts) < 5:
        return False
    try:
        address = ipaddress.ip_address(parts[4])
    except ValueError:
        return True  # a name
    if address.is_multicast or address.is_unspecified or address == ipaddress.IPv4Address("255.255.255.255"):
        return True
    return address.is_loopback and not from_loopback


def usable_candidates(text: str, from_loopback: bool) -> str:
    """An offer or a trickled fragment with each line stripped of white space and without the candidate lines
    ``unusable_candidate`` names: what is checked is what is applied (a line " a=candidate:..." passed the checks
    that look for "a=candidate:" and was applied stripped)."""
    lines = (line.strip() for line in text.splitlines())
    return "".join(f"{line}\r\n" for line in lines if not unusable_candidate(line, from_loopback))


def candidate_count(lines: Iterable[str]) -> int:
    """The ``a=candidate`` lines among ``lines`` (an offer's, or ``usable_candidates``' text split)."""
    return sum(1 for line in lines if line.startswith("a=candidate:"))


# -- H.264 profiles: the answer says what is sent (RFC 6184 8.1, 8.2.2)

# profile_idc, a mask of the constraint byte and the bits it must have there, and the profile that makes:
# RFC 6184 Table 5, as browsers classify an offer's profile-level-id.
H264_PROFILE_PATTERNS = (
    (0x42, 0x4F, 0x40, "Constrained Baseline"),  # constraint_set1: Main-decodable Baseline
    (0x4D, 0x8F, 0x80, "Constrained Baseline"),
    (0x58, 0xCF, 0xC0, "Constrained Baseline"),
    (0x42, 0x4F, 0x00, "Baseline"),
    (0x58, 0xCF, 0x80, "Baseline"),
    (0x4D, 0xAF, 0x00, "Main"),
    (0x64, 0xFF, 0x00, "High"),
    (0x64, 0xFF, 0x0C, "Constrained High"),
    (0x64, 0xFF, 0x08, "High"),  # Progressive High: a High decoder takes it
    (0xF4, 0xFF, 0x00, "High 4:4:4 Predictive"),  # what Chromium on Linux offers instead of High
)
# Which offered profiles decode which stream (H.264 A.2: a High decoder decodes Main and Constrained Baseline,
# a High 4:4:4 Predictive one High too). Baseline proper (FMO, ASO) needs Baseline. A stream without B-frames and
# progressive (every stream a relay passes through or encodes) is Constrained High as much as it is High or Main.
DECODES = {
    "Constrained Baseline": (
        "Constrained Baseline", "Baseline", "Main", "Constrained High", "High", "High 4:4:4 Predictive",
    ),
    "Baseline": ("Baseline",),
    "Main": ("Main", "High", "Constrained High", "High 4:4:4 Predictive"),
    "High": ("High", "Constrained High", "High 4:4:4 Predictive"),
    "Constrained High": ("Constrained High", "High", "High 4:4:4 Predictive"),
}  # fmt: skip
AIORTC_PROFILE = "42e01f"  # what aiortc itself offers and answers: it matches an offer's payload type on it
_CODEC_ATTRIBUTES = ("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")  # a payload type's lines
_CODEC_LINE = re.compile(r"^a=(?:rtpmap|fmtp|rtcp-fb):(\d+) ")
_PROFILE_LEVEL_ID = re.compile(r"profile-level-id=[0-9A-Fa-f]*")


def h264_profile(profile_level_id: str) -> tuple[str, int]:
    """(profile, level_idc) of a ``profile-level-id``; ``SdpError`` for one that is not 6 hex digits of a known
    profile."""
    if not re.fullmatch(r"[0-9A-Fa-f]{6}", profile_level_id):
        raise SdpError(f"profile-level-id {profile_level_id[:20]!r} is not 6 hex digits")
    idc, constraints, level = (int(profile_level_id[i : i + 2], 16) for i in (0, 2, 4))
    for p_idc, mask, bits, name in H264_PROFILE_PATTERNS:
        if idc == p_idc and constraints & mask == bits:
            return name, level
    raise SdpError(f"profile-level-id {profile_level_id} is no profile a browser decodes")


def _fmtp_params(text: str) -> dict[str, str]:
    params = {}
    for part in text.split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            params[key.lower()] = value.strip()
    return params


@dataclass(frozen=True, slots=True)
class H264Fit:
    """The offer's H.264 payload type that can take the stream, and what the answer says about it."""

    payload_type: int
    profile_level_id: str  # for the answer: the offered profile at the stream's level

    def offer_for_aiortc(self, offer: str) -> str:
        """``offer`` with this payload type as its video's only codec (and its RTX), labelled with the one profile
        aiortc knows: aiortc matches codecs by profile, and answers with its own ``profile-level-id``. The others
        (a browser's VP8, VP9, AV1, other H.264s, RED, FEC: 34 payload types in Chromium's) are never answered
        (the relay prefers only H.264 and RTX), but aiortc parsed and matched each: ~1 ms of the relay's ~4 ms
        per browser answer, in a burst of joiners all on its event loop."""
        _, session, sections = _parsed(offer)
        out = list(session)
        for section in sections:
            out += self._narrow(section)
        return "\r\n".join(out) + "\r\n"

    def _narrow(self, section: list[str]) -> list[str]:
        rtpmaps = [a for a in section if a.startswith("a=rtpmap:")]
        h264 = {int(r.group(1)) for a in rtpmaps if (r := _RTPMAP.match(a)) and r.group(2).upper() == "H264"}
        if self.payload_type not in h264:
            return section
        formats = {int(pt) for pt in section[0].split(" ")[3:] if pt.isdigit()}
        fmtps = [f for a in section if a.startswith("a=fmtp:") and (f := _FMTP.match(a))]
        rtx = {int(f.group(1)) for f in fmtps if _fmtp_params(f.group(2)).get("apt") == str(self.payload_type)}
        drop = formats - {self.payload_type} - rtx
        out = []
        for a in section:
            if a.startswith("m="):
                head, formats = a.split(" ")[:3], a.split(" ")[3:]
                a = " ".join(head + [pt for pt in formats if not pt.isdigit() or int(pt) not in drop])
            elif not a.startswith(_CODEC_ATTRIBUTES):
                pass  # no payload type's line: kept as it is, no pattern tried
            elif (m := _CODEC_LINE.match(a)) and int(m.group(1)) in drop:
                continue
            elif (f := _FMTP.match(a)) and int(f.group(1)) == self.payload_type:
                a = _PROFILE_LEVEL_ID.sub(f"profile-level-id={AIORTC_PROFILE}", a)
            out.append(a)
        return out

    def answer(self, answer: str) -> str:
        """aiortc's answer with this payload type's ``profile-level-id`` the one the stream's SPS makes."""
        return h264.with_profile_level_id(answer, self.payload_type, self.profile_level_id)


def fit_h264(offer: str, stream_profile_level_id: str) -> H264Fit:
    """The first H.264 payload type (packetization-mode 1) of ``offer``'s video that decodes a stream whose SPS
    makes ``stream_profile_level_id``; ``SdpError`` naming what the offer lacks."""
    stream_profile, level = h264_profile(stream_profile_level_id)
    offered = []
    for section in _parsed(offer)[2]:
        if not section[0].startswith("m=video"):
            continue
        fmtp = {int(f.group(1)): f.group(2) for a in section if a.startswith("a=fmtp:") and (f := _FMTP.match(a))}
        for a in section:
            if a.startswith("a=rtpmap:") and (r := _RTPMAP.match(a)) and r.group(2).upper() == "H264":
                params = _fmtp_params(fmtp.get(int(r.group(1)), ""))  # an H.264's alone: not every codec's
                if params.get("packetization-mode") == "1":
                    offered.append((int(r.group(1)), params))
    refused, fits = [], []
    for pt, params in offered:
        pli = params.get("profile-level-id", AIORTC_PROFILE)  # absent: Constrained Baseline 3.1 (RFC 6184 8.1)
        try:
            profile, offered_level = h264_profile(pli)
        except SdpError:
            continue
        if profile not in DECODES[stream_profile]:
            refused.append(f"{pli} ({profile})")
        elif offered_level < level and params.get("level-asymmetry-allowed") != "1":
            refused.append(f"{pli} (level {_level(offered_level)} below the stream's {_level(level)})")
        else:
            fits.append((profile != stream_profile, H264Fit(pt, f"{pli[:4].lower()}{level:02x}")))
    if fits:
        return min(fits, key=lambda f: f[0])[1]  # the stream's own profile first, else the first that decodes it
    raise SdpError(
        f"offer cannot take the stream's H.264 {stream_profile} {_level(level)} ({stream_profile_level_id});"
        f" it offers {', '.join(refused) or 'no H.264 with a profile-level-id'}"
    )


def _level(level_idc: int) -> str:
    return f"{level_idc // 10}.{level_idc % 10}"

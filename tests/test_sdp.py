"""The WHEP offer checks, with plain strings: one case per bad offer, exact reasons."""

import re
from pathlib import Path

import pytest

from signalling.sdp import SdpError, check_offer

CHROMIUM = (Path(__file__).parent / "data" / "chromium_offer.sdp").read_text()


def without(pattern: str, sdp: str = CHROMIUM) -> str:
    return "".join(line for line in sdp.splitlines(keepends=True) if not re.search(pattern, line))


def h264_payload_types(sdp: str) -> set[str]:
    return set(re.findall(r"a=rtpmap:(\d+) H264/90000", sdp))


def vp8_only(sdp: str) -> str:
    pts = h264_payload_types(sdp)
    return without(r"^a=(rtpmap|fmtp|rtcp-fb):(" + "|".join(pts) + r") ", sdp)


def test_a_real_chromium_offer_passes():
    summary = check_offer(CHROMIUM)
    assert summary.video_sections == 1
    assert summary.direction == "recvonly"
    assert set(map(str, summary.h264_payload_types)) <= h264_payload_types(CHROMIUM)
    assert summary.h264_payload_types


def test_lf_only_line_endings_pass():
    assert check_offer(CHROMIUM.replace("\r\n", "\n")).video_sections == 1


@pytest.mark.parametrize(
    ("offer", "reason"),
    [
        ("", "offer is empty"),
        ("\r\n\r\n", "offer is empty"),
        ("hello", "offer does not start with v=0"),
        ("v=1\r\n", "offer does not start with v=0"),
        ("v=0\r\nnonsense\r\n", "line 2 is not of the form x=value"),
        ("v=0\x00\r\n", "offer contains a NUL byte"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "offer has no media section"),
        ("v=0\r\n" + "a=x\r\n" * 2001, "offer has 2002 lines, more than 2000"),
        ("v=0\r\nm=video\r\n", "malformed media line 'm=video'"),
        (CHROMIUM.replace("m=video 9", "m=audio 9"), "offer has no video section"),
        (CHROMIUM.replace("m=video 9", "m=video 0"), "offer has no video section"),
        (without(r"^a=ice-ufrag"), "offer has no ICE username fragment (a=ice-ufrag)"),
        (without(r"^a=ice-pwd"), "offer has no ICE password (a=ice-pwd)"),
        (without(r"^a=fingerprint"), "offer has no DTLS fingerprint (a=fingerprint)"),
        (
            CHROMIUM.replace("a=recvonly", "a=sendonly"),
            "video section is sendonly; a viewer must offer recvonly or sendrecv",
        ),
        (
            CHROMIUM.replace("a=recvonly", "a=inactive"),
            "video section is inactive; a viewer must offer recvonly or sendrecv",
        ),
        (vp8_only(CHROMIUM), "offer cannot receive H.264 video (no H264 rtpmap in the video section)"),
        (CHROMIUM.replace("packetization-mode=1", "packetization-mode=0"), "offer's H.264 lacks packetization-mode=1"),
    ],
)
def test_bad_offers_have_exact_reasons(offer, reason):
    with pytest.raises(SdpError) as info:
        check_offer(offer)
    assert str(info.value) == reason


def test_mdns_candidates_are_dropped_and_nothing_else():
    from signalling.sdp import drop_mdns_candidates

    assert CHROMIUM.count(".local ") == 2
    stripped = drop_mdns_candidates(CHROMIUM)
    assert ".local" not in stripped
    assert len(stripped.splitlines()) == len(CHROMIUM.splitlines()) - 2
    assert check_offer(stripped).video_sections == 1
    real = "a=candidate:1 1 udp 2113937151 192.168.1.20 51355 typ host generation 0\r\n"
    assert drop_mdns_candidates(real) == real

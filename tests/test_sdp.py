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


def line_of(prefix: str, sdp: str = CHROMIUM) -> tuple[int, str]:
    """(1-based number, text) of the first line starting with ``prefix``."""
    for number, line in enumerate(sdp.splitlines(), 1):
        if line.startswith(prefix):
            return number, line
    raise AssertionError(prefix)


def replace_line(prefix: str, new: str) -> tuple[str, int]:
    number, line = line_of(prefix)
    return CHROMIUM.replace(line + "\n", new + "\n", 1), number


H264_PT = min(h264_payload_types(CHROMIUM), key=int)


@pytest.mark.parametrize(
    ("prefix", "new", "reason"),
    [
        ("a=extmap:", "a=extmap:256 urn:ietf:params:rtp-hdrext:sdes:mid", "a=extmap id 256 is outside 1..255"),
        ("a=extmap:", "a=extmap:0 urn:ietf:params:rtp-hdrext:sdes:mid", "a=extmap id 0 is outside 1..255"),
        ("a=extmap:", "a=extmap:4096/sendrecv urn:x", "a=extmap id 4096 is outside 1..255"),
        ("a=extmap:", "a=extmap:x urn:x", "a=extmap id 'x' is not a number in 1..255"),
        ("m=video", "m=video 70000 UDP/TLS/RTP/SAVPF 96", "media port 70000 is outside 0..65535"),
        ("m=video", "m=video 9 UDP/TLS/RTP/SAVPF 96 200", "media payload type 200 is outside 0..127"),
        (
            f"a=rtpmap:{H264_PT} ",
            f"a=rtpmap:{H264_PT} H264/99999999999",
            "a=rtpmap clock rate 99999999999 is outside 0..4294967295",
        ),
        (f"a=rtpmap:{H264_PT} ", "a=rtpmap:128 H264/90000", "a=rtpmap payload type 128 is outside 0..127"),
        (f"a=fmtp:{H264_PT} ", "a=fmtp:1000 packetization-mode=1", "a=fmtp payload type 1000 is outside 0..127"),
        ("a=fmtp:", "a=fmtp:97 apt=300", "a=fmtp apt 300 is outside 0..127"),
        ("a=rtcp-fb:", "a=rtcp-fb:-1 nack", "a=rtcp-fb payload type '-1' is not a number in 0..127"),
        ("a=rtcp:", "a=rtcp:99999 IN IP4 0.0.0.0", "a=rtcp port 99999 is outside 0..65535"),
        ("a=mid:", "a=ssrc:4294967296 cname:x", "a=ssrc 4294967296 is outside 0..4294967295"),
        ("a=mid:", "a=ssrc-group:FID 1 99999999999", "a=ssrc-group ssrc 99999999999 is outside 0..4294967295"),
        ("a=mid:", "a=max-message-size:1e9", "a=max-message-size '1e9' is not a number in 0..4294967295"),
        (
            "a=candidate:",
            "a=candidate:1 1 udp 2113937151 192.168.1.20 65536 typ host",
            "candidate port 65536 is outside 0..65535",
        ),
        (
            "a=candidate:",
            "a=candidate:1 0 udp 2113937151 192.168.1.20 5000 typ host",
            "candidate component 0 is outside 1..256",
        ),
        (
            "a=candidate:",
            "a=candidate:1 1 udp 99999999999 192.168.1.20 5000 typ host",
            "candidate priority 99999999999 is outside 0..4294967295",
        ),
        (
            "a=candidate:",
            "a=candidate:1 1 udp 1 10.0.0.1 5000 typ srflx raddr 0.0.0.0 rport 70000",
            "candidate rport 70000 is outside 0..65535",
        ),
        (
            "a=candidate:",
            "a=candidate:1 1 udp 1 10.0.0.1 5000",
            "candidate '1 1 udp 1 10.0.0.1 5000' is not"
            " 'foundation component transport priority address port typ type'",
        ),
    ],
)
def test_numbers_out_of_range_are_refused_with_the_line(prefix, new, reason):
    offer, number = replace_line(prefix, new)
    with pytest.raises(SdpError) as info:
        check_offer(offer)
    assert str(info.value) == f"line {number}: {reason}"


def test_mdns_candidates_are_dropped_and_nothing_else():
    from signalling.sdp import drop_mdns_candidates

    assert CHROMIUM.count(".local ") == 2
    stripped = drop_mdns_candidates(CHROMIUM)
    assert ".local" not in stripped
    assert len(stripped.splitlines()) == len(CHROMIUM.splitlines()) - 2
    assert check_offer(stripped).video_sections == 1
    real = "a=candidate:1 1 udp 2113937151 192.168.1.20 51355 typ host generation 0\r\n"
    assert drop_mdns_candidates(real) == real

"""The WHEP offer checks, with plain strings: one case per bad offer, exact reasons."""

import re
from pathlib import Path

import pytest

from signalling.sdp import (
    SdpError,
    answer_all,
    check_offer,
    find_audio,
    fit_h264,
    is_ice_restart,
    served_only,
)

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
    assert check_offer(CHROMIUM.replace("\n", "\r\r\n")).video_sections == 1  # CRs before a line's end: its end


@pytest.mark.parametrize(
    ("offer", "reason"),
    [
        ("", "offer is empty"),
        ("\r\n\r\n", "offer is empty"),
        ("hello", "offer does not start with v=0"),
        ("v=1\r\n", "offer does not start with v=0"),
        ("v=0\r\nnonsense\r\n", "line 2 is not of the form x=value"),
        ("v=0\x00\r\n", "offer line 1 holds the control character U+0000"),
        ("v=0\r\na=x:1\x0ba=extmap:300 urn:x\r\n", "offer line 2 holds the control character U+000B"),
        ("v=0\r\na=x:1\x0ca=y\r\n", "offer line 2 holds the control character U+000C"),
        ("v=0\r\na=x:1\ra=y\r\n", "offer line 2 holds the control character U+000D"),
        ("v=0\r\na=x:1\x1ea=y\r\n", "offer line 2 holds the control character U+001E"),
        ("v=0\r\na=x:1\x85a=y\r\n", "offer line 2 holds the control character U+0085"),
        ("v=0\r\na=x:1\u2029a=y\r\n", "offer line 2 holds the control character U+2029"),
        ("v=0\r\n\x1b[2J\r\n", "offer line 2 holds the control character U+001B"),
        (
            CHROMIUM.replace("a=mid:0", "a=mid:0" + "\na=candidate:1 1 udp 1 10.0.0.1 9 typ host" * 39),
            "offer has 41 candidates, more than 40",  # 2 of its own
        ),
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


# Numbers at their bounds, in the shapes browsers write (which one pattern takes at once) and in others (checked
# number by number): the pattern must pass only what the checks pass, and refuse nothing they pass.
@pytest.mark.parametrize(
    ("prefix", "new", "reason"),
    [
        ("a=rtcp-fb:", "a=rtcp-fb:127 nack", None),
        ("a=rtcp-fb:", "a=rtcp-fb:128 nack", "a=rtcp-fb payload type 128 is outside 0..127"),
        ("a=rtcp-fb:", "a=rtcp-fb:0127 nack", None),  # a leading zero: not the browsers' shape, still a number
        ("a=rtcp-fb:", "a=rtcp-fb:* nack", None),
        ("a=rtcp-fb:", "a=rtcp-fb:12\tnack", "a=rtcp-fb payload type '12\\tnack' is not a number in 0..127"),
        (
            "a=rtcp-fb:",
            "a=rtcp-fb:\u0661\u0662 nack",
            "a=rtcp-fb payload type '\u0661\u0662' is not a number in 0..127",
        ),
        ("a=extmap:", "a=extmap:255 urn:x", None),
        ("a=extmap:", "a=extmap:255/recvonly urn:x", None),
        ("a=extmap:", "a=extmap:1", None),
        ("a=extmap:", "a=extmap:256/recvonly urn:x", "a=extmap id 256 is outside 1..255"),
        ("a=extmap:", "a=extmap:010 urn:x", None),
        (f"a=rtpmap:{H264_PT} ", "a=rtpmap:127 H264/4294967295", None),  # ten digits: checked one by one
        (
            f"a=rtpmap:{H264_PT} ",
            "a=rtpmap:127 H264/4294967296",
            "a=rtpmap clock rate 4294967296 is outside 0..4294967295",
        ),
        (f"a=rtpmap:{H264_PT} ", "a=rtpmap:127 opus/48000/255", None),
        (f"a=rtpmap:{H264_PT} ", "a=rtpmap:127 opus/48000/256", "a=rtpmap channels 256 is outside 1..255"),
        (f"a=rtpmap:{H264_PT} ", "a=rtpmap:127 opus/48000/0", "a=rtpmap channels 0 is outside 1..255"),
        (f"a=rtpmap:{H264_PT} ", "a=rtpmap:127 opus/48000/2/x", None),  # a fourth part is not checked
        ("a=fmtp:", "a=fmtp:97 apt=127", None),
        ("a=fmtp:", "a=fmtp:97 apt=128", "a=fmtp apt 128 is outside 0..127"),
        ("a=fmtp:", "a=fmtp:97 x=1;apt=128", "a=fmtp apt 128 is outside 0..127"),
        ("a=fmtp:", "a=fmtp:97 aptx=1000;apt=9", None),
        ("a=fmtp:", "a=fmtp:128 apt=1", "a=fmtp payload type 128 is outside 0..127"),
    ],
)
def test_numbers_at_their_bounds_pass_or_are_refused_as_checked(prefix, new, reason):
    offer, number = replace_line(prefix, new)
    if reason is None:
        check_offer(offer)
        return
    with pytest.raises(SdpError) as info:
        check_offer(offer)
    assert str(info.value) == f"line {number}: {reason}"


@pytest.mark.parametrize(
    ("offer", "reason"),
    [
        ("v=0\r\na=x:1\ra=y\x01\r\n", "offer line 2 holds the control character U+000D"),
        ("v=0\r\na=x:1\x01a=y\ra\r\n", "offer line 2 holds the control character U+0001"),
        ("v=0\r\na=x\r\na=y\u2028\r\na=z\r", "offer line 3 holds the control character U+2028"),
        ("v=0\r\na=x\r\na=y\r", "offer line 3 holds the control character U+000D"),
    ],
)
def test_the_first_forbidden_character_is_the_one_named(offer, reason):
    with pytest.raises(SdpError) as info:
        check_offer(offer)
    assert str(info.value) == reason


def test_an_offer_is_split_once_for_its_checks_and_once_as_aiortc_sees_it(monkeypatch):
    """What signalling.whep does with an offer before aiortc takes it splits each text into lines once: the offer
    for check_offer and find_audio, the offer narrowed to what is served for fit_h264 and offer_for_aiortc."""
    import signalling.sdp as sdp

    offer = CHROMIUM.replace("o=- ", "o=- 1")  # a text no other test split
    split: list[int] = []
    lines = sdp._lines
    monkeypatch.setattr(sdp, "_lines", lambda text: split.append(len(text)) or lines(text))
    summary = check_offer(offer)
    find_audio(offer)
    served = served_only(sdp.usable_candidates(offer, from_loopback=False), summary.served)  # as signalling.whep
    fit = fit_h264(served, "42e01f")
    fit.offer_for_aiortc(served)
    assert split == [len(offer), len(served)]


def test_an_offer_of_too_many_lines_is_refused_before_its_lines_are_kept():
    """The texts split last are kept (``SPLITS_KEPT``); an offer of more than ``MAX_LINES`` lines, refused, is not:
    four of 64 KiB of two-character lines held ~10 MiB."""
    import signalling.sdp as sdp

    sdp._parsed.cache_clear()
    text = "v=0\n" + "m=\n" * 21_000
    with pytest.raises(SdpError, match="^offer has 21001 lines, more than 2000$"):
        check_offer(text)
    assert sdp._parsed.cache_info().currsize == 0
    with pytest.raises(SdpError, match="^offer has 2001 lines, more than 2000$"):  # 2000 line breaks, 2001 lines
        check_offer("v=0\n" + "a=x\n" * 1999 + "a=x")


def test_mdns_candidates_are_dropped_and_nothing_else():
    from signalling.sdp import usable_candidates

    assert CHROMIUM.count(".local ") == 2
    stripped = usable_candidates(CHROMIUM, from_loopback=False)
    assert ".local" not in stripped
    assert len(stripped.splitlines()) == len(CHROMIUM.splitlines()) - 2
    assert check_offer(stripped).video_sections == 1
    real = "a=candidate:1 1 udp 2113937151 192.168.1.20 51355 typ host generation 0\r\n"
    assert usable_candidates(real, from_loopback=False) == real


@pytest.mark.parametrize(
    ("address", "remote_kept", "local_kept"),
    [
        ("192.168.1.20", True, True),
        ("10.0.0.1", True, True),
        ("fe80::1", True, True),  # link-local: a LAN viewer's IPv6
        ("2001:db8::1", True, True),
        ("127.0.0.1", False, True),  # a viewer's own loopback is on this machine only when it is
        ("::1", False, True),
        ("0.0.0.0", False, False),
        ("::", False, False),
        ("224.0.0.251", False, False),
        ("ff02::1", False, False),
        ("255.255.255.255", False, False),
        ("deadbeef.local", False, False),
        ("camera.example.org", False, False),  # a name: no lookups a viewer sets off
    ],
)
def test_candidates_the_relay_would_not_use_are_dropped(address, remote_kept, local_kept):
    from signalling.sdp import candidate_count, usable_candidates

    line = f"a=candidate:1 1 udp 2113937151 {address} 51355 typ host"
    for from_loopback, kept in ((False, remote_kept), (True, local_kept)):
        text = usable_candidates(f"a=mid:0\r\n  {line}\t\r\na=end-of-candidates\n", from_loopback)
        assert text == "a=mid:0\r\n" + (line + "\r\n" if kept else "") + "a=end-of-candidates\r\n"
        assert candidate_count(text.splitlines()) == int(kept)


def recorded(name: str) -> str:
    """An offer of tests/data as the browser wrote it (CRLF line ends)."""
    return (Path(__file__).parent / "data" / f"offer_{name}.sdp").read_bytes().decode()


# (file, index of its video m-section, number of m-sections): see tests/data/README.md
BROWSER_OFFERS = [("chromium_156", 0, 3), ("firefox_153", 0, 3), ("firefox_99_audio_first", 1, 2), ("safari_16", 0, 3)]


@pytest.mark.parametrize(("name", "video", "count"), BROWSER_OFFERS)
def test_offers_as_browsers_write_them_pass_and_their_video_section_is_served(name, video, count):
    offer = recorded(name)
    summary = check_offer(offer)
    assert (summary.video_sections, summary.served) == (1, video)
    assert offer.count("\r\nm=") == count
    # Every number is still range-checked, in the sections the relay rejects too.
    for old, new, reason in (
        ("a=sctp-port:5000", "a=sctp-port:70000", "a=sctp-port port 70000 is outside 0..65535"),
        ("m=audio 9 ", "m=audio 99999 ", "media port 99999 is outside 0..65535"),
        ("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/99999999999", "a=rtpmap clock rate 99999999999 is outside"),
    ):
        if old in offer:
            number = offer[: offer.index(old)].count("\n") + 1
            with pytest.raises(SdpError) as info:
                check_offer(offer.replace(old, new, 1))
            assert str(info.value).startswith(f"line {number}: {reason}")


def test_the_first_video_section_that_can_receive_h264_is_served():
    vp8 = vp8_only(CHROMIUM).replace("a=mid:0", "a=mid:9")
    first = vp8[vp8.index("m=video") :]
    assert check_offer(CHROMIUM.replace("m=video", first + "m=video", 1)).served == 1
    # None can: the first one's reason.
    with pytest.raises(SdpError) as info:
        check_offer(vp8 + first.replace("a=mid:9", "a=mid:8"))
    assert str(info.value) == "offer cannot receive H.264 video (no H264 rtpmap in the video section)"


# What aiortc answers to served_only(): the served section alone (shortened here).
AIORTC_ANSWER = (
    "v=0\r\no=- 3 3 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE {mid}\r\na=msid-semantic:WMS *\r\n"
    "m=video 40000 UDP/TLS/RTP/SAVPF 102 103\r\nc=IN IP4 127.0.0.1\r\na=sendonly\r\na=mid:{mid}\r\n"
)


def test_the_answer_has_every_offered_m_section_and_rejects_all_but_the_video():
    offer = recorded("chromium_156")
    aiortc_sees = served_only(offer, 0)
    assert aiortc_sees.count("m=") == 1 and "m=video 9 " in aiortc_sees and "\r\na=group:BUNDLE 0\r\n" in aiortc_sees
    assert answer_all(offer, 0, AIORTC_ANSWER.format(mid="0")) == (
        "v=0\r\no=- 3 3 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\na=msid-semantic:WMS *\r\n"
        "m=video 40000 UDP/TLS/RTP/SAVPF 102 103\r\nc=IN IP4 127.0.0.1\r\na=sendonly\r\na=mid:0\r\n"
        "m=audio 0 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=inactive\r\n"
        "m=application 0 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n"
    )
    # The offer's BUNDLE tag (audio, first) is rejected: the video section is the only one, and the tag, in the group.
    offer = recorded("firefox_99_audio_first")
    assert "a=group:BUNDLE 0 1" in offer
    assert answer_all(offer, 1, AIORTC_ANSWER.format(mid="1")).split("m=")[1:] == [
        "audio 0 UDP/TLS/RTP/SAVPF 109\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=inactive\r\n",
        "video 40000 UDP/TLS/RTP/SAVPF 102 103\r\nc=IN IP4 127.0.0.1\r\na=sendonly\r\na=mid:1\r\n",
    ]
    assert "a=group:BUNDLE 1\r\n" in answer_all(offer, 1, AIORTC_ANSWER.format(mid="1"))
    # An offer that bundles nothing gets no group back (RFC 9143 §7.3).
    unbundled = offer.replace("a=group:BUNDLE 0 1\r\n", "")
    assert "a=group:" not in served_only(unbundled, 1)
    assert "a=group:" not in answer_all(unbundled, 1, AIORTC_ANSWER.format(mid="1"))


# What aiortc answers to served_only() with audio: the video and the audio, in the offer's order (shortened here).
AIORTC_AV_ANSWER = (
    "v=0\r\no=- 3 3 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE {group}\r\na=msid-semantic:WMS *\r\n{sections}"
)
VIDEO_SECTION = "m=video 40000 UDP/TLS/RTP/SAVPF 102 103\r\nc=IN IP4 127.0.0.1\r\na=sendonly\r\na=mid:{mid}\r\n"
AUDIO_SECTION = "m=audio 40000 UDP/TLS/RTP/SAVPF {pt}\r\nc=IN IP4 127.0.0.1\r\na=sendonly\r\na=mid:{mid}\r\n"


@pytest.mark.parametrize(("name", "audio"), [("chromium_156", 1), ("firefox_153", 1), ("firefox_99_audio_first", 0),
                                             ("safari_16", 1)])  # fmt: skip
def test_the_audio_section_that_can_receive_opus_is_found(name, audio):
    assert find_audio(recorded(name)) == audio


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("a=rtpmap:111 opus/48000/2\r\n", ""),  # no Opus: PCMU and the rest only
        ("m=audio 9 ", "m=audio 0 "),  # rejected by the viewer itself
        ("a=recvonly", "a=sendonly"),  # a microphone, with nothing to receive
        ("a=recvonly", "a=inactive"),
    ],
)
def test_no_audio_section_is_served_where_none_can_receive_opus(old, new):
    offer = recorded("chromium_156")
    audio = offer.index("m=audio")
    assert old in offer[audio:]
    assert find_audio(offer[:audio] + offer[audio:].replace(old, new, 1)) is None


def test_a_stream_with_sound_answers_the_video_and_the_audio_and_rejects_the_rest():
    offer = recorded("chromium_156")  # video 0, audio 1, data channel 2
    aiortc_sees = served_only(offer, 0, 1)
    assert [line.split()[0] for line in aiortc_sees.splitlines() if line.startswith("m=")] == ["m=video", "m=audio"]
    assert "\r\na=group:BUNDLE 0 1\r\n" in aiortc_sees and "m=application" not in aiortc_sees
    answer = AIORTC_AV_ANSWER.format(
        group="0 1", sections=VIDEO_SECTION.format(mid="0") + AUDIO_SECTION.format(pt=111, mid="1")
    )
    assert answer_all(offer, 0, answer, 1).split("m=")[1:] == [
        "video 40000 UDP/TLS/RTP/SAVPF 102 103\r\nc=IN IP4 127.0.0.1\r\na=sendonly\r\na=mid:0\r\n",
        "audio 40000 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 127.0.0.1\r\na=sendonly\r\na=mid:1\r\n",
        "application 0 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n",
    ]
    # Audio first (its BUNDLE tag): both served, in the offer's order, the tag answered too.
    offer = recorded("firefox_99_audio_first")
    aiortc_sees = served_only(offer, 1, 0)
    assert [line.split()[0] for line in aiortc_sees.splitlines() if line.startswith("m=")] == ["m=audio", "m=video"]
    answer = AIORTC_AV_ANSWER.format(
        group="0 1", sections=AUDIO_SECTION.format(pt=109, mid="0") + VIDEO_SECTION.format(mid="1")
    )
    whole = answer_all(offer, 1, answer, 0)
    assert "a=group:BUNDLE 0 1\r\n" in whole and whole.count("m=") == 2 and " 0 UDP" not in whole


def test_a_new_ice_ufrag_in_a_trickle_fragment_is_an_ice_restart():
    offer = recorded("chromium_156")  # a=ice-ufrag:bvp1
    assert not is_ice_restart("a=ice-ufrag:bvp1\r\na=ice-pwd:x\r\na=mid:0\r\na=end-of-candidates\r\n", offer)
    assert not is_ice_restart("a=mid:0\r\na=candidate:1 1 udp 1 127.0.0.1 9 typ host\r\n", offer)
    assert is_ice_restart("a=ice-ufrag:n3wU\r\na=ice-pwd:n3wpasswordn3wpassword\r\n", offer)


# -- the answer's H.264 profile: what the stream sends, or a 400 naming what the offer lacks

DATA = Path(__file__).parent / "data"
SAFARI = (DATA / "offer_safari_16.sdp").read_text()
FIREFOX = (DATA / "offer_firefox_153.sdp").read_text()


def fmtp_of(sdp: str, pt: int) -> str:
    return next(line for line in sdp.splitlines() if line.startswith(f"a=fmtp:{pt} "))


CHROMIUM_156 = (DATA / "offer_chromium_156.sdp").read_text()


@pytest.mark.parametrize(
    ("offer", "stream", "pt", "answered"),
    [
        # Chromium on Linux offers no High: its High 4:4:4 Predictive decoder decodes High, at the stream's level.
        ("chromium", "640028", "f4001f", "f40028"),
        ("chromium", "4d401f", "4d001f", "4d001f"),
        ("chromium", "42c01e", "42e01f", "42e01e"),  # Constrained Baseline: the offer's CB, not its Baseline
        ("safari", "640028", "640c1f", "640c28"),  # Safari offers Constrained High: a High stream without B-frames
        ("safari", "4d401f", "640c1f", "640c1f"),
        ("safari", "42c01f", "42e01f", "42e01f"),
        ("firefox", "42c01f", "42e01f", "42e01f"),
    ],
)
def test_the_answer_takes_the_offered_h264_that_decodes_the_stream_at_its_level(offer, stream, pt, answered):
    text = {"chromium": CHROMIUM_156, "safari": SAFARI, "firefox": FIREFOX}[offer]
    fit = fit_h264(text, stream)
    assert f"profile-level-id={pt}" in fmtp_of(text, fit.payload_type)
    assert "packetization-mode=1" in fmtp_of(text, fit.payload_type)
    assert fit.profile_level_id == answered


def test_aiortc_sees_only_the_chosen_h264_and_the_answer_names_the_streams_profile():
    fit = fit_h264(CHROMIUM, "4d401f")
    offer = fit.offer_for_aiortc(CHROMIUM)
    assert h264_payload_types(offer) == {str(fit.payload_type)}
    assert "profile-level-id=42e01f" in fmtp_of(offer, fit.payload_type)  # what aiortc matches on
    assert check_offer(offer).h264_payload_types == (fit.payload_type,)
    # Its RTX and nothing else: VP8, VP9, AV1, RED, FEC and their RTX are never answered, and aiortc would parse them
    (rtx,) = [p for p, a in re.findall(r"a=fmtp:(\d+) apt=(\d+)", CHROMIUM) if a == str(fit.payload_type)]
    mline = next(line for line in offer.splitlines() if line.startswith("m=video"))
    assert mline.split()[3:] == [str(fit.payload_type), rtx]
    assert set(re.findall(r"^a=(?:rtpmap|fmtp|rtcp-fb):(\d+) ", offer, re.M)) == {str(fit.payload_type), rtx}
    answer = f"a=fmtp:{fit.payload_type} level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n"
    assert fit.answer(answer) == answer.replace("42e01f", "4d001f")


@pytest.mark.parametrize(
    ("offer", "stream", "reason"),
    [
        (FIREFOX, "640028", "stream's H.264 High 4.0 (640028); it offers 42e01f (Constrained Baseline)"),
        (SAFARI, "42001f", "Baseline 3.1 (42001f); it offers 640c1f (Constrained High), 42e01f (Constrained Base"),
        (
            CHROMIUM_156.replace("level-asymmetry-allowed=1;", ""),
            "640033",
            "High 5.1 (640033); it offers 42001f (Baseline), 42e01f (Constrained Baseline), 4d001f (Main),"
            " f4001f (level 3.1 below the stream's 5.1)",
        ),
        (vp8_only(CHROMIUM), "42c01f", "it offers no H.264 with a profile-level-id"),
    ],
    ids=["firefox-high", "safari-baseline-proper", "level", "no-h264"],
)
def test_an_offer_that_cannot_take_the_streams_profile_is_refused_with_the_reason(offer, stream, reason):
    with pytest.raises(SdpError, match=re.escape(reason)):
        fit_h264(offer, stream)

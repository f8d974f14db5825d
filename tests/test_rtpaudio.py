"""A camera's sound track, sans-io (relay/rtpaudio.py): its SDP, and its RTP packets into coded frames.

Every bad packet is its own fixture: it is dropped and counted with the reason, never raised (a broken
audio track must not stop the video read beside it), and the good packets after it still come out.
"""

from __future__ import annotations

import pytest

from relay.ipc import MAX_AUDIO_PAYLOAD
from relay.rtpaudio import (
    AAC_FRAME_SAMPLES,
    AudioDepacketizer,
    CodedAudio,
    SenderReport,
    opus_samples,
    parse_sdp_audio,
    parse_sender_report,
    rtp_at,
    signed32,
)
from relay.rtspin import RtspError

from .test_rtspin import rtp, sdp

BASE = "rtsp://cam/live/"
H264 = "m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=control:trackID=0\r\n"
AAC_FMTP = "profile-level-id=1;mode=AAC-hbr;sizelength=13;indexlength=3;indexdeltalength=3;config=1188"
AAC = f"m=audio 0 RTP/AVP 97\r\na=rtpmap:97 mpeg4-generic/48000/1\r\na=fmtp:97 {AAC_FMTP}\r\na=control:trackID=1\r\n"
OPUS = "m=audio 0 RTP/AVP 111\r\na=rtpmap:111 opus/48000/2\r\na=control:trackID=1\r\n"
PCMU = "m=audio 0 RTP/AVP 0\r\na=control:trackID=1\r\n"
LATM = (
    "m=audio 0 RTP/AVP 96\r\na=rtpmap:96 MP4A-LATM/48000/1\r\n"
    "a=fmtp:96 profile-level-id=1;bitrate=64000;cpresent=0;object=2;config=400023103fc0\r\na=control:trackID=1\r\n"
)
PCMA = "m=audio 0 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=control:trackID=1\r\n"


def aac_payload(*units: bytes, sizes: list[int] | None = None) -> bytes:
    """RFC 3640 AAC-hbr: AU-headers-length in bits, a 16-bit header per AU (13 bits of size, 3 of index)."""
    sizes = [len(u) for u in units] if sizes is None else sizes
    headers = b"".join((size << 3).to_bytes(2, "big") for size in sizes)
    return (16 * len(sizes)).to_bytes(2, "big") + headers + b"".join(units)


@pytest.mark.parametrize(
    ("media", "codec", "pt", "rate", "channels", "config"),
    [
        (AAC, "aac", 97, 48000, 1, bytes.fromhex("1188")),
        (OPUS, "opus", 111, 48000, 2, b""),
        (PCMU, "pcm_mulaw", 0, 8000, 1, b""),  # a static payload type, no rtpmap
        (PCMA, "pcm_alaw", 8, 8000, 1, b""),
        (LATM, "aac", 96, 48000, 1, bytes.fromhex("1188")),  # the AudioSpecificConfig in its StreamMuxConfig
    ],
)
def test_the_sdp_gives_the_sound_a_camera_sends_beside_its_video(media, codec, pt, rate, channels, config):
    track = parse_sdp_audio(sdp(H264, media), BASE)
    assert (track.codec, track.payload_type, track.clock_rate, track.channels) == (codec, pt, rate, channels)
    assert track.config == config and track.control == BASE + "trackID=1"


@pytest.mark.parametrize(
    ("media", "error"),
    [
        ("", "SDP has no audio media"),
        ("m=audio 0 RTP/AVP 14\r\na=rtpmap:14 MPA/90000\r\n", "audio codec 'mpa' is not read here"),
        ("m=audio 0 RTP/AVP 97\r\n", "audio payload type 97 has no rtpmap"),
        ("m=audio 0 RTP/AVP 97\r\na=rtpmap:97 PCMU/x\r\n", "bad audio rtpmap 'PCMU/x'"),
        (AAC.replace("mode=AAC-hbr", "mode=CELP-cbr"), "AAC mode 'CELP-cbr' is not read here"),
        (AAC.replace("config=1188", "config=11g8"), "AAC config '11g8' is not hex"),
        (AAC.replace("sizelength=13", "sizelength=6"), "AAC-hbr AU headers must be sizelength=13"),
        (LATM.replace("cpresent=0", "cpresent=1"), "MP4A-LATM with its config in band (cpresent=1) is not read here"),
        (LATM.replace("config=400023103fc0", "config=c00023103fc0"), "MP4A-LATM audioMuxVersion 1 is not read here"),
        (LATM.replace("config=400023103fc0", "config=4000"), "MP4A-LATM config '4000' is cut short"),
    ],
)
def test_a_sound_track_that_is_not_read_here_is_refused_exactly(media, error):
    with pytest.raises(RtspError) as info:
        parse_sdp_audio(sdp(H264, media) if media else sdp(H264), BASE)
    assert str(info.value).startswith(error)


def depacketizer(media: str = AAC) -> AudioDepacketizer:
    return AudioDepacketizer(parse_sdp_audio(sdp(H264, media), BASE))


def test_aac_access_units_come_out_each_with_its_own_timestamp_and_length():
    d = depacketizer()
    assert d.push(rtp(aac_payload(b"one", b"two!"), 7, 4096, True, pt=97)) == [
        CodedAudio(b"one", 4096, AAC_FRAME_SAMPLES),
        CodedAudio(b"two!", 4096 + AAC_FRAME_SAMPLES, AAC_FRAME_SAMPLES),
    ]
    assert (d.packets, d.frames, d.packets_dropped, d.packets_lost) == (1, 2, 0, 0)


def test_an_aac_access_unit_cut_over_packets_comes_out_whole_at_its_marker():
    d = depacketizer()
    unit = bytes(range(200))
    assert d.push(rtp(aac_payload(unit[:120], sizes=[200]), 1, 0, False, pt=97)) == []
    assert d.push(rtp(aac_payload(unit[120:], sizes=[200]), 2, 0, True, pt=97)) == [
        CodedAudio(unit, 0, AAC_FRAME_SAMPLES)
    ]


def test_timestamps_run_on_across_the_rtp_clocks_wrap():
    d = depacketizer(PCMU)
    first = d.push(rtp(bytes(160), 1, 2**32 - 80, False, pt=0))
    second = d.push(rtp(bytes(160), 2, 80, False, pt=0))
    assert [(f.pts, f.samples) for f in first + second] == [(2**32 - 80, 160), (2**32 + 80, 160)]


@pytest.mark.parametrize(
    ("toc", "samples"),
    [
        (bytes([0xF0]), 480),  # CELT 10 ms (config 30), one frame
        (bytes([0x78]), 960),  # hybrid fullband 20 ms (config 15)
        (bytes([0xF8]), 960),  # CELT 20 ms (config 31), one frame
        (bytes([0xF9]), 1920),  # CELT 20 ms, two frames: 40 ms
        (bytes([0x03, 0x03]), 1440),  # SILK 10 ms (config 0), code 3: three frames
        (bytes([0x18]), 2880),  # SILK 60 ms (config 3)
    ],
)
def test_an_opus_packets_length_is_read_from_its_toc(toc, samples):
    assert opus_samples(toc + b"\x00" * 10) == samples


@pytest.mark.parametrize(
    ("packet", "error"),
    [(b"", "empty Opus packet"), (b"\x03", "Opus packet of code 3 has no frame count"),
     (b"\x03\x00", "Opus packet of code 3 with 0 frames"), (b"\x1b\x03", "Opus packet of 8640 samples is over 120 ms")],
)  # fmt: skip
def test_an_opus_packet_that_cannot_be_one_is_refused_exactly(packet, error):
    with pytest.raises(RtspError) as info:
        opus_samples(packet)
    assert str(info.value) == error


def test_opus_packets_pass_through_untouched_whatever_their_length():
    d = depacketizer(OPUS)
    packet = bytes([0xF9]) + b"opus bytes"  # 40 ms
    assert d.push(rtp(packet, 1, 960, True, pt=111)) == [CodedAudio(packet, 960, 1920)]


def test_an_opus_packet_over_one_viewer_datagram_is_dropped_and_counted_and_the_next_comes_out():
    d = depacketizer(OPUS)
    largest = bytes([0xF8]) + b"o" * (MAX_AUDIO_PAYLOAD - 1)  # 20 ms
    assert d.push(rtp(largest + b"x", 1, 960, True, pt=111)) == []
    assert (d.packets_dropped, d.last_error) == (1, "Opus packet of 1401 bytes is over the 1400 a viewer's datagram"
                                                    " carries")  # fmt: skip
    assert d.push(rtp(largest, 2, 1920, True, pt=111)) == [CodedAudio(largest, 1920, 960)]


GOOD = rtp(aac_payload(b"good"), 11, 1024 * 11, True, pt=97)
BAD_PACKETS = {
    "truncated AU header": (
        rtp(b"\x00\x10\x00", 10, 10240, True, pt=97),
        "AU headers of 16 bits overrun the payload of 3 bytes",
    ),
    "no AU-headers-length": (rtp(b"\x00", 10, 10240, True, pt=97), "AAC payload of 1 bytes has no AU-headers-length"),
    "AU-headers-length not whole headers": (
        rtp(b"\x00\x0c\x00\x20abcd", 10, 10240, True, pt=97),
        "AU-headers-length of 12 bits is not whole 16-bit AU headers",
    ),
    "AU sizes that do not add up": (
        rtp(aac_payload(b"abc", b"de", sizes=[3, 4]), 10, 10240, True, pt=97),
        "AAC AU sizes [3, 4] do not add up to the 5 bytes after the AU headers",
    ),
    "an AU of 0 bytes": (rtp(aac_payload(b"", b"x"), 10, 10240, True, pt=97), "AAC AU of 0 bytes"),
    "an empty payload": (rtp(b"", 10, 10240, True, pt=97), "empty RTP payload"),
    "another payload type": (rtp(aac_payload(b"x"), 10, 10240, True, pt=96), "RTP payload type 96, not the audio's 97"),
    "no RTP at all": (b"\x80\x61", "RTP packet of 2 bytes is shorter than its header"),
}


@pytest.mark.parametrize("name", BAD_PACKETS)
def test_a_bad_packet_is_dropped_and_counted_with_why_and_the_next_good_one_comes_out(name):
    packet, error = BAD_PACKETS[name]
    d = depacketizer()
    assert d.push(packet) == []
    assert (d.packets_dropped, d.last_error) == (1, error)
    assert d.push(GOOD) == [CodedAudio(b"good", 1024 * 11, AAC_FRAME_SAMPLES)]
    assert (d.frames, d.packets_dropped) == (1, 1)


def test_an_aac_fragment_whose_end_was_lost_is_dropped_and_the_next_unit_comes_out():
    d = depacketizer()
    assert d.push(rtp(aac_payload(b"x" * 50, sizes=[100]), 1, 0, False, pt=97)) == []
    # Its last fragment (seq 2) lost: the next packet, a new unit, counts the loss and drops the part gathered.
    assert d.push(rtp(aac_payload(b"next"), 3, 1024, True, pt=97)) == [CodedAudio(b"next", 1024, AAC_FRAME_SAMPLES)]
    assert (d.packets_lost, d.frames) == (1, 1)


def test_sequence_gaps_are_counted_and_late_or_duplicate_packets_dropped():
    d = depacketizer(PCMU)
    frames = [d.push(rtp(bytes(160), seq, seq * 160, False, pt=0)) for seq in (1, 2, 5, 5, 4, 6)]
    assert [len(f) for f in frames] == [1, 1, 1, 0, 0, 1]
    assert (d.packets_lost, d.packets_dropped, d.last_error) == (2, 2, "late or duplicate RTP packet 4")


def sender_report(ssrc: int, ntp: float, rtp_time: int) -> bytes:
    whole = int(ntp)
    fraction = round((ntp - whole) * 2**32)
    body = b"".join(v.to_bytes(4, "big") for v in (ssrc, whole, fraction, rtp_time, 0, 0))
    return bytes([0x80, 200]) + (len(body) // 4).to_bytes(2, "big") + body


def test_a_sender_report_pairs_the_rtp_clock_with_the_cameras_ntp_clock():
    report = parse_sender_report(sender_report(7, 3_900_000_000.25, 123456) + b"\x81\xca\x00\x00")  # then SDES
    assert report == SenderReport(7, 3_900_000_000.25, 123456)
    assert parse_sender_report(bytes([0x81, 201, 0, 1]) + bytes(24)) is None  # a receiver report
    assert parse_sender_report(sender_report(7, 1.0, 0)[:20]) is None  # cut short


def test_two_sender_reports_say_which_video_time_a_sound_frame_was_captured_at():
    video, audio = SenderReport(1, 1000.0, 2**32 - 9000), SenderReport(2, 999.5, 100)
    # Sound at 0.1 s after its report (4800 at 48 kHz) is NTP 999.6: 0.4 s before the video's report, across
    # the video clock's wrap.
    assert rtp_at(100 + 4800, 48000, audio, video, 90000) == (2**32 - 9000 - 36000) % 2**32
    assert rtp_at(2**32 - 9000 + 9000, 90000, video, audio, 48000) == 100 + 24000 + 4800
    assert signed32(5) == 5 and signed32(2**32 - 5) == -5


def test_mp4a_latm_units_come_out_after_their_length_and_a_bad_length_is_dropped():
    d = depacketizer(LATM)
    unit = bytes(300)
    assert d.push(rtp(b"\xff\x2d" + unit + b"\x02ab", 1, 0, True, pt=96)) == [
        CodedAudio(unit, 0, AAC_FRAME_SAMPLES),
        CodedAudio(b"ab", AAC_FRAME_SAMPLES, AAC_FRAME_SAMPLES),
    ]
    assert d.push(rtp(b"\x05abc", 2, 2048, True, pt=96)) == []
    assert d.push(rtp(b"\xff\xff", 3, 3072, True, pt=96)) == []
    assert (d.packets_dropped, d.last_error) == (2, "MP4A-LATM length cut off")

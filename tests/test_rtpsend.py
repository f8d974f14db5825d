"""The send path (``relay.webrtc.rtpsend``): each sender's header made once, and what a viewer gets from it.

A frame's header is the sender's template (``HeaderTemplate``) with its
timestamp and abs-send-time put in; each packet's sequence number and marker
are set where it is protected (``borrowed.SrtpFrameWriter``). Judged against
aiortc's own serializer (and ``playout.add_elements`` for the extension aiortc
does not know), for a video sender (mid, abs-send-time, playout-delay) and an
audio one (mid alone); then end to end, by one real viewer's decrypted packets
and sender reports, counted against what the stream published.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from itertools import pairwise

import pytest
from aiortc import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtcpPacket, RtcpSrPacket, RtpPacket, unpack_header_extensions

from benchmarks.borrowed import tap_decrypted
from relay.webrtc import playout
from relay.webrtc.rtpsend import (
    ABS_SEND_TIME_PROBE,
    NTP_UNIX_OFFSET,
    HeaderTemplate,
    HeaderTemplateError,
    payloads_for,
)
from relay.webrtc.whepclient import WhepViewer

from .conftest import make_config, start_relay
from .test_players import sections

MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
PLAYOUT = ((5, playout.value(0, 0)),)  # Chromium's id for it


def _map(*uris: str) -> HeaderExtensionsMap:
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[RTCRtpHeaderExtensionParameters(id=i + 1, uri=u) for i, u in enumerate(uris)]
        )
    )
    return extensions


def _aiortc(extensions, mid, abs_send_time, timestamp=0, extra=()) -> bytes:
    """What aiortc serializes for a sender's packet header (sequence number 0, no marker: the writer sets both)."""
    packet = RtpPacket(payload_type=96, timestamp=timestamp, ssrc=0x11223344)
    packet.extensions.mid = mid
    packet.extensions.abs_send_time = abs_send_time
    header = packet.serialize(extensions)
    return playout.add_elements(header, extra) if extra else header


@pytest.mark.parametrize(
    "uris, extra",
    [((MID, ABS_SEND_TIME), ()), ((MID, ABS_SEND_TIME), PLAYOUT), ((MID,), ()), ((), ())],
    ids=["video", "video with playout-delay", "audio", "no extensions"],
)
def test_a_frames_header_is_what_aiortc_serializes_for_it(uris, extra):
    extensions = _map(*uris)
    template = HeaderTemplate(
        _aiortc(extensions, "0", 0, extra=extra), _aiortc(extensions, "0", ABS_SEND_TIME_PROBE, extra=extra)
    )
    assert (template.abs_send_time_at is not None) == (ABS_SEND_TIME in uris)
    for timestamp, abs_send_time in [(0, 0), (1234, 0x123456), (0xFFFFFFFF, 0xFFFFFF), (90_000, 0x1_000_001)]:
        expected = _aiortc(extensions, "0", abs_send_time & 0xFFFFFF, timestamp, extra)
        assert bytes(template.header(timestamp, abs_send_time)) == expected, (timestamp, abs_send_time)


def test_each_frame_gets_a_header_of_its_own():
    extensions = _map(MID, ABS_SEND_TIME)
    template = HeaderTemplate(_aiortc(extensions, "1", 0), _aiortc(extensions, "1", ABS_SEND_TIME_PROBE))
    first = template.header(1, 1)
    second = template.header(2, 2)
    assert first != second and template.header(1, 1) == first  # the template itself is never changed


ZERO = _aiortc(_map(MID, ABS_SEND_TIME), "0", 0)


@pytest.mark.parametrize(
    "zero, probe, why",
    [
        (b"\x90\x60", b"\x90\x60", "not an RTP version 2 header"),
        (b"\x40" + ZERO[1:], b"\x40" + ZERO[1:], "not an RTP version 2 header"),
        (ZERO, ZERO + bytes(4), "differ in length"),
        (ZERO, ZERO[:4] + b"\xff" + ZERO[5:], r"differ at bytes \[4\]"),  # in the timestamp, not an extension
        (ZERO, ZERO[:-4] + b"\xff\xff" + ZERO[-2:], "differ at bytes"),  # two bytes, not three
        (ZERO[:-4] + b"\xff\xff\xff" + ZERO[-1:], ZERO[:-4] + b"\x00\x00\x00" + ZERO[-1:], "is not 0"),
    ],
    ids=["too short", "version 1", "lengths", "fixed header", "two bytes", "swapped"],
)
def test_two_headers_that_cannot_be_a_template_are_refused(zero, probe, why):
    with pytest.raises(HeaderTemplateError, match=why):
        HeaderTemplate(zero, probe)


# -- what a viewer gets: every packet's header, and the sender reports that count them

DEADLINE = 40.0  # seconds the test waits for what it counts: a guard, not a measurement
AUDIO_PACKETS = 150  # 3 s of 20 ms Opus packets
LIVE_FRAMES = 30  # the last pictures judged against those published (a keyframe's catch-up is long over by then)
VIDEO_FRAMES = 60  # pictures received before those
REPORTS = 3  # sender reports of each track
M32 = 0xFFFFFFFF


@dataclass
class Packet:
    ssrc: int
    sequence: int
    timestamp: int
    marker: bool
    payload_type: int
    elements: dict[int, bytes]
    payload_bytes: int


def _packet(data: bytes) -> Packet:
    packet = RtpPacket.parse(data)
    start = 12 + 4 * (data[0] & 0x0F)
    profile, words = int.from_bytes(data[start : start + 2], "big"), int.from_bytes(data[start + 2 : start + 4], "big")
    elements = dict(unpack_header_extensions(profile, data[start + 4 : start + 4 + 4 * words]))
    return Packet(
        packet.ssrc, packet.sequence_number, packet.timestamp, bool(packet.marker), packet.payload_type, elements,
        len(packet.payload),
    )  # fmt: skip


def _section(answer: str, kind: str) -> tuple[str, dict[str, int], int]:
    """The answer's ``kind`` section: its mid, its header extensions' ids by URI, its first payload type."""
    section = next(s for s in sections(answer) if s[0].startswith(f"m={kind}"))
    mid = next(x for x in section if x.startswith("a=mid:"))[len("a=mid:") :]
    ids = {x.split()[1]: int(x.split()[0][len("a=extmap:") :]) for x in section if x.startswith("a=extmap:")}
    return mid, ids, int(section[0].split()[3])


def _drain(subscription) -> list:
    out = []
    while (frame := subscription.get_nowait()) is not None:
        out.append(frame)
    return out


async def test_a_viewers_packets_are_numbered_stamped_and_counted_exactly_in_both_tracks(http):
    """Per track, one viewer's RTP as it decrypts it: sequence numbers one after the other, none missing; the mid,
    and nothing else, in every packet; the marker on each frame's last packet; the audio's RTP
    clock, through its sender reports, the pts of the very packets the stream published, in order, none skipped;
    the video's live frames those the stream published (their pts steps, their packet counts); and each sender
    report counting exactly the packets and payload bytes sent before it, its RTP timestamp the last one's."""
    runner, relay = await start_relay(make_config())
    stream = relay.relay.streams["cam0"]
    audio_tap = stream.audio.subscribe("test-tap-audio", max_frames=10_000)  # before the viewer's: it misses none
    video_tap = stream.hub.subscribe("test-tap-video", max_frames=10_000)
    viewer = WhepViewer(relay.whep(), http, audio=True)
    events: list[Packet | RtcpSrPacket] = []  # in the order the viewer decrypted them
    release = None

    def reports(ssrc: int) -> list[RtcpSrPacket]:
        return [e for e in events if isinstance(e, RtcpSrPacket) and e.ssrc == ssrc]

    try:
        await viewer.connect()
        assert viewer.answer is not None
        (video_mid, video_ids, _), (audio_mid, audio_ids, opus) = (
            _section(viewer.answer, k) for k in ("video", "audio")
        )
        release = tap_decrypted(
            viewer.pc,
            lambda data: events.append(_packet(data)),
            lambda data: events.extend(p for p in RtcpPacket.parse(data) if isinstance(p, RtcpSrPacket)),
        )
        deadline = time.monotonic() + DEADLINE
        while True:
            audio = [e for e in events if isinstance(e, Packet) and e.payload_type == opus]
            video = [e for e in events if isinstance(e, Packet) and e.payload_type != opus]
            if (
                len(audio) >= AUDIO_PACKETS
                and len({p.timestamp for p in video}) > VIDEO_FRAMES + LIVE_FRAMES
                and all(len(reports(t[0].ssrc)) > REPORTS for t in (audio, video))
            ):
                break
            assert time.monotonic() < deadline, (len(audio), len(video), len(events))
            await asyncio.sleep(0.1)
        published_audio, published_video = _drain(audio_tap), _drain(video_tap)
    finally:
        if release is not None:
            release()
        audio_tap.close()
        video_tap.close()
        await viewer.close()
        await runner.cleanup()

    assert len({p.ssrc for p in audio}) == 1 and len({p.ssrc for p in video}) == 1  # no RTX: nothing was NACKed
    for track in (audio, video):  # one after the other, none missing, none twice
        assert [(p.sequence - track[0].sequence) & 0xFFFF for p in track] == list(range(len(track)))
    assert all(p.elements == {audio_ids[MID]: audio_mid.encode()} for p in audio)
    # The video: the mid alone too. The answer named no abs-send-time nor goog-remb (the relay ignores bandwidth
    # estimates: sessions.UNUSED_EXTENSIONS), so nothing else rides on the packets, and no REMB comes back.
    assert ABS_SEND_TIME not in video_ids and "goog-remb" not in viewer.answer
    assert all(p.elements == {video_ids[MID]: video_mid.encode()} for p in video)
    assert all(p.marker for p in audio)  # each Opus packet a frame of its own

    # The audio: a sender report pairs the last packet's RTP timestamp with its capture time (its pts: 48 kHz
    # ticks of the wall clock), which gives the sender's origin; less it, the timestamps are the pts of the
    # packets the stream published, in order, every one from the viewer's first.
    report = reports(audio[0].ssrc)[0].sender_info
    seconds = (report.ntp_timestamp >> 32) - NTP_UNIX_OFFSET + (report.ntp_timestamp & M32) / 2**32
    origin = (report.rtp_timestamp - round(seconds * 48_000)) & M32
    got = [(p.timestamp - origin) & M32 for p in audio]
    pts = [f.pts & M32 for f in published_audio]
    assert got[0] in pts, (got[0], pts[:3])
    first = pts.index(got[0])
    assert got == pts[first : first + len(got)]
    assert [p.payload_bytes for p in audio] == [len(f.data) for f in published_audio[first : first + len(got)]]

    # The video: frames of consecutive packets, the marker on each one's last packet alone, and its live frames
    # those the stream published one after the other (their pts steps), each in as many packets.
    frames: list[list[Packet]] = []
    for p in video:
        if not frames or frames[-1][0].timestamp != p.timestamp:
            frames.append([])
        frames[-1].append(p)
    complete = frames[:-1]  # the last may still be arriving
    assert all([q.marker for q in frame] == [False] * (len(frame) - 1) + [True] for frame in complete)
    live = complete[-LIVE_FRAMES:]
    shape = ([(b[0].timestamp - a[0].timestamp) & M32 for a, b in pairwise(live)], [len(f) for f in live])
    published = [
        ([(b.pts - a.pts) & M32 for a, b in pairwise(run)], [len(payloads_for(f)) for f in run])
        for run in (published_video[i : i + LIVE_FRAMES] for i in range(len(published_video) - LIVE_FRAMES + 1))
    ]
    assert shape in published, shape

    # Each sender report counts what was sent before it: the packets and payload bytes the viewer got before it
    # (less those sent before it listened: the same for every report), its RTP timestamp the last one's.
    for track in (audio, video):
        ssrc, count, octets, last, seen = track[0].ssrc, 0, 0, None, []
        for e in events:
            if isinstance(e, Packet) and e.ssrc == ssrc:
                count, octets, last = count + 1, octets + e.payload_bytes, e.timestamp
            elif isinstance(e, RtcpSrPacket) and e.ssrc == ssrc and last is not None:
                info = e.sender_info
                seen.append((info.packet_count - count, info.octet_count - octets, info.rtp_timestamp == last))
        assert len(seen) >= REPORTS and len(set(seen)) == 1 and seen[0][2], seen

"""One C call a published frame for every live viewer (``_fastsend.send_batch``, ``rtpsend.push_batch``) against
each viewer's own send, which it stands in for: the same SRTP datagrams byte for byte for each viewer of the batch,
on real sockets (IPv4 and IPv6), across a sequence wrap, the marker on each frame's last packet; a viewer that cannot
take the frame now declined with nothing sent and nothing changed; one that fails mid-frame leaving the batch while
the others get their frames, its frame sent again alone only where none of its packets was protected; and, with real
aiortc viewers set up as a session's, real H.264 decoded (each picture's pixel clock read back), the sender reports'
counts and NACKs of batched frames, each packet once and numbered on while a viewer moves between the batch and its
own path, and a viewer whose socket backs up.
Without the extension built, every test here is skipped (the per-viewer paths are in test_fastsend.py)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import os
import socket
import struct
import time
import types

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import HeaderExtensionsMap, RtcpPacket, RtpPacket

from relay.camera import pixelclock
from relay.hub import EncodedFrame, PacketHub
from relay.webrtc import borrowed, rtpsend, udpbatch
from relay.webrtc.resend import ResendBudget
from relay.webrtc.rtpsend import (
    NTP_UNIX_OFFSET,
    HeaderTemplate,
    HubTrack,
    attach_to_sender,
    h264_preferences,
    ntp_at,
    payloads_for,
    push_batch,
)
from relay.webrtc.udpbatch import MAX_GSO_BYTES, MAX_SEGMENTS, batcher_for

from .conftest import frame_clock
from .netns import loopback_namespace, run
from .test_aiortc_hooks import _srtp_pair
from .test_fastsend import RCVBUF, SO_RCVBUFFORCE, received_on
from .test_udpbatch import _Sending

pytestmark = pytest.mark.skipif(not borrowed.C_SEND_BUILT, reason="relay.webrtc._fastsend is not built here")

CLOCK = 90_000
ABS_SEND_TIME = 0x123456  # the same abs-send-time for every viewer of a call, so the bytes can be compared
MID, ABS = "urn:ietf:params:rtp-hdrext:sdes:mid", "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
# A keyframe's packets: a STAP-A, full-size FU-As and a short last; then a P-frame of a few.
FRAMES = [[bytes([0x78]) * 30] + [bytes([0x7C, i]) * 600 for i in range(12)] + [b"\x7c\x45" * 250], [b"p" * 1100] * 3]
DEADLINE = 20.0  # seconds for what a test waits on: a guard, not a measurement


def _template(ssrc: int, abs_send_time: bool) -> HeaderTemplate:
    """A sender's header as FrameSender makes its template: aiortc's serializer, with mid (and abs-send-time)."""
    uris = [MID, ABS] if abs_send_time else [MID]
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[RTCRtpHeaderExtensionParameters(id=i + 1, uri=u) for i, u in enumerate(uris)]
        )
    )

    def serialize(value: int) -> bytes:
        packet = RtpPacket(payload_type=102)
        packet.ssrc = ssrc
        packet.extensions.mid = "0"
        packet.extensions.abs_send_time = value
        return packet.serialize(extensions)

    return HeaderTemplate(serialize(0), serialize(0xFFFFFF) if abs_send_time else serialize(0))


class _Viewer:
    """A viewer's receiving socket and the relay's sending socket to it (a real asyncio datagram transport and its
    batcher), and a lane bound to them as ``FrameSender.lane_ready`` binds one."""

    def __init__(self, family: int, origin: int, sequence: int, offset: int, abs_send_time: bool) -> None:
        self.family, self.origin, self.offset = family, origin, offset
        self.first_sequence = sequence
        self.template = _template(0x1000 + origin % 997, abs_send_time)
        self.session, self.receiver = _srtp_pair()
        self.lane = borrowed.new_lane(origin, sequence, CLOCK, 128)
        self.lane.set_header(self.template.template, self.template.abs_send_time_at)
        self.lane.timeline = (None, offset)
        self.fell: list[tuple[bytes, int, bool]] = []

    async def open(self) -> _Viewer:
        host = "::1" if self.family == socket.AF_INET6 else "127.0.0.1"
        self.rx = socket.socket(self.family, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        self.rx.bind((host, 0))
        self.rx.setblocking(False)
        tx = socket.socket(self.family, socket.SOCK_DGRAM)
        tx.bind((host, 0))
        self.transport, self.protocol = await asyncio.get_running_loop().create_datagram_endpoint(_Sending, sock=tx)
        self.batcher = batcher_for(self.protocol)
        self.addr = self.rx.getsockname()
        fd, family, gso = self.batcher.c_route()
        assert borrowed.route_lane(
            self.lane, self.session, fd, family, self.addr, gso, self.transport, self.fallback,
            self.batcher.lane_guards(gso), self.batcher.c_written,
        )  # fmt: skip
        return self

    def fallback(self, data, segment: int, blocked: bool) -> None:
        self.fell.append((bytes(data), segment, blocked))

    def received(self) -> list[bytes]:
        return received_on(self.rx)

    def expected(self, payloads: list[bytes], pts: int, sequence: int) -> list[bytes]:
        """What this viewer's own send makes of the frame (``FrameSender.send``: the template's header with the
        timestamp and abs-send-time, then ``protect_frame``), from a fresh session with the same key."""
        header = self.template.header((self.origin + pts + self.offset) & 0xFFFFFFFF, ABS_SEND_TIME)
        runs: list[bytes] = []
        borrowed.SrtpFrameWriter().protect_frame(
            self.python_session, bytes(header), payloads, sequence,
            lambda data, segment: runs.extend(bytes(data[i : i + segment]) for i in range(0, len(data), segment)),
            MAX_SEGMENTS, MAX_GSO_BYTES,
        )  # fmt: skip
        return runs

    def close(self) -> None:
        self.lane.unbind()
        self.transport.close()
        self.rx.close()


async def _viewers(*specs) -> list[_Viewer]:
    viewers = [await _Viewer(*spec).open() for spec in specs]
    for v in viewers:
        v.python_session = _srtp_pair()[0]
    return viewers


def _send(viewers, payloads, pts, published_at=None):
    return borrowed.send_batch(
        borrowed.SrtpFrameWriter(), [v.lane for v in viewers], payloads, pts,
        time.time() if published_at is None else published_at, MAX_SEGMENTS, MAX_GSO_BYTES, ABS_SEND_TIME,
    )  # fmt: skip


SPECS = [
    (socket.AF_INET, 1_000_000, 65530, 0, True),  # wraps within the first frame
    (socket.AF_INET, 0xFFFFFF00, 100, 0, False),  # its timestamps wrap at 2^32; no abs-send-time (audio's header)
    (socket.AF_INET6, 77, 40_000, 3003, True),  # IPv6; a viewer whose catch-up ended late: its offset
]


async def test_one_call_sends_each_viewer_the_datagrams_its_own_send_makes():
    """Three viewers in one call, two frames: each gets byte for byte what its own send makes (its header, origin,
    offset and sequence numbers, its session), over IPv4 and IPv6; every packet decrypts, numbered on across the
    wrap, the marker on each frame's last alone; what aiortc's sender reports and a NACK need is kept per viewer."""
    viewers = await _viewers(*SPECS)
    try:
        pts0, sent_packets = 90_000 * 1000, 0
        for k, payloads in enumerate(FRAMES):
            pts = pts0 + k * 3000
            declined, failed, delays = _send(viewers, payloads, pts)
            assert (declined, failed, len(delays)) == ([], [], 3)
            for v in viewers:
                sequence = (v.first_sequence + sent_packets) & 0xFFFF
                got = v.received()
                assert got == v.expected(payloads, pts, sequence) and v.fell == []
                packets = [RtpPacket.parse(v.receiver.unprotect(d)) for d in got]
                assert [p.sequence_number for p in packets] == [(sequence + i) & 0xFFFF for i in range(len(payloads))]
                assert [p.marker for p in packets] == [0] * (len(payloads) - 1) + [1]
                assert {p.timestamp for p in packets} == {(v.origin + pts + v.offset) & 0xFFFFFFFF}
                assert [p.payload for p in packets] == payloads
                # sender reports: the RTP timestamp sent last, paired with the capture time of its pts
                ntp, rtp, octets, count, protected = v.lane.take_counts()
                assert (ntp, rtp) == (ntp_at(pts * 1_000_000_000 // CLOCK), (v.origin + pts + v.offset) & 0xFFFFFFFF)
                assert (octets, count, protected) == (sum(map(len, payloads)), len(payloads), sum(map(len, got)))
                assert v.lane.take_counts() is None  # taken: nothing more until the next frame
                assert v.lane.timeline == (pts + v.offset, v.offset) and v.lane.frames == k + 1
                # a NACK for the frame's second packet: its payload, timestamp, no marker
                middle = (sequence + 1) & 0xFFFF
                assert v.lane.find(middle) == ((v.origin + pts + v.offset) & 0xFFFFFFFF, False, payloads[1], 102)
            sent_packets += len(payloads)
        assert all(v.lane.sequence == (v.first_sequence + sent_packets) & 0xFFFF for v in viewers)
        assert all(v.batcher.c_frames == 2 and v.batcher.datagrams == sent_packets for v in viewers)
    finally:
        for v in viewers:
            v.close()


async def test_a_viewer_that_cannot_take_the_frame_now_is_declined_with_nothing_sent_or_changed():
    """Declined (its index returned, for its own path to take the frame): a lane unbound; one whose batcher holds
    datagrams (they go first: never reordered); one whose transport is closing; one whose timestamp would not
    advance (a catch-up ended on a later timestamp). Nothing reaches its socket, its sequence number, counts and
    history stay; the others in the call get the frame."""
    viewers = await _viewers(*[(socket.AF_INET, 1000 * i, 10 * i, 0, True) for i in range(5)])
    try:
        viewers[1].lane.unbind()
        viewers[2].batcher.send(b"rtcp", viewers[2].addr)  # held for the end of the loop's pass
        viewers[3].transport.close()
        viewers[4].lane.timeline = (5000, 0)  # sent timestamp 5000 already; this frame's pts is 3000
        declined, failed, delays = _send(viewers, FRAMES[1], 3000)
        assert (declined, failed, len(delays)) == ([1, 2, 3, 4], [], 1)
        assert len(viewers[0].received()) == 3
        for v in viewers[1:]:
            assert v.received() == [] and v.fell == []
            assert v.lane.sequence == v.first_sequence and v.lane.frames == 0 and v.lane.take_counts() is None
            assert v.lane.find(v.first_sequence) is None
        assert viewers[4].lane.timeline == (5000, 0)
        await asyncio.sleep(0)  # the batcher's pass ends: it holds nothing, and viewer 2 is taken again
        assert _send(viewers[2:3], FRAMES[1], 3000)[0] == []
        got = viewers[2].received()
        assert got[0] == b"rtcp" and len(got) == 4  # what it held went first
    finally:
        for v in viewers:
            v.close()


async def test_a_viewer_whose_send_fails_mid_frame_leaves_the_batch_and_the_others_get_the_frame(caplog):
    """A lane whose writes fail (its descriptor is a pipe, not a socket) hands them to its fallback, which raises
    here: that lane is named in ``failed`` with the exception, unbound (so declined from then on), and the lanes
    after it in the same call get their frames. Through ``push_batch``: the viewer leaves the batch (its
    subscription's lane cleared), and one log line a second says so. Its packets were protected before the write
    failed (their sequence numbers spent), so the frame is taken, not offered again (it would reach the viewer
    twice); one that fails before any is protected (an SRTP error at its first packet) is offered its own way."""
    viewers = await _viewers(*[(socket.AF_INET, 1000 * i, 10 * i, 0, True) for i in range(3)])
    read_end, write_end = os.pipe()
    broken = viewers[1]

    def raising(data, segment, blocked):
        raise RuntimeError("the fallback's own")

    def break_it() -> None:
        borrowed.route_lane(
            broken.lane, broken.session, write_end, socket.AF_INET, broken.addr, True, broken.transport, raising, (),
            broken.batcher.c_written,
        )  # fmt: skip

    try:
        hub = PacketHub("cam0", lambda: None)
        subs = [types.SimpleNamespace(lane=v.lane, name=f"viewer{i}") for i, v in enumerate(viewers)]
        frames = [
            EncodedFrame(b"\x00\x00\x00\x01\x41" + b"p" * 3000, k * 3000, False, 0.0, time.time()) for k in (1, 2, 3)
        ]
        with caplog.at_level(logging.WARNING, logger="relay.webrtc.rtpsend"):
            break_it()
            sequence = broken.lane.sequence
            assert push_batch(hub, frames[0], subs) == []  # taken: its packets' numbers spent
            assert subs[1].lane is None and not broken.lane.bound and broken.lane.frames == 1
            assert broken.lane.sequence == (sequence + len(frames[0].payloads)) & 0xFFFF
            assert broken.lane.find(sequence) is not None  # a NACK of what did not leave is answered
            assert [len(v.received()) > 0 for v in viewers] == [True, False, True]
            subs[1].lane = broken.lane  # as if it had joined again, unbound: declined
            assert push_batch(hub, frames[1], subs) == [1] and subs[1].lane is broken.lane
            # bound again, and failing before any packet is protected (a number spent already: libsrtp refuses it
            # as a replay), within the second: offered its own way, said once
            fd, family, gso = broken.batcher.c_route()
            assert borrowed.route_lane(
                broken.lane, broken.session, fd, family, broken.addr, gso, broken.transport, broken.fallback, (),
                broken.batcher.c_written,
            )  # fmt: skip
            broken.lane.sequence = sequence
            assert push_batch(hub, frames[2], subs) == [1] and subs[1].lane is None
            assert broken.received() == [] and broken.lane.frames == 1
        lines = [r.getMessage() for r in caplog.records if "left the batch" in r.getMessage()]
        assert len(lines) == 1 and "stream=cam0 viewers=1" in lines[0] and "the fallback's own" in lines[0]
        assert "taken=True" in lines[0]
        assert len(hub.fanout_delay) == 6  # two viewers, three frames
        assert [v.lane.frames for v in viewers] == [3, 1, 3]
    finally:
        os.close(read_end)
        os.close(write_end)
        for v in viewers:
            v.close()


@pytest.mark.parametrize("raised", ["before", "after"])
async def test_a_batch_call_that_raises_takes_the_frame_for_those_it_reached_and_offers_it_to_the_rest(
    raised, monkeypatch, caplog
):
    """``push_batch`` never raises: where the C call does (a MemoryError in C, a failure in what follows it), the
    viewers it had already sent the frame to are not offered it again (it would reach them twice: a repeated
    P-frame corrupts the picture until the next keyframe), the others are; said once a second a stream."""
    viewers = await _viewers(*[(socket.AF_INET, 1000 * i, 10 * i, 0, True) for i in range(3)])
    real = borrowed.send_batch

    def failing(writer, lanes, *args):
        if raised == "after":
            real(writer, lanes[:2], *args)  # the first two sent, then it fails
        raise MemoryError

    monkeypatch.setattr(borrowed, "send_batch", failing)
    try:
        hub = PacketHub("cam0", lambda: None)
        subs = [types.SimpleNamespace(lane=v.lane, name=f"viewer{i}") for i, v in enumerate(viewers)]
        frames = [EncodedFrame(b"\x00\x00\x00\x01\x41" + b"p" * 3000, k * 3000, False, 0.0, 0.0) for k in (1, 2)]
        with caplog.at_level(logging.WARNING, logger="relay.webrtc.rtpsend"):
            expected = [0, 1, 2] if raised == "before" else [2]
            assert push_batch(hub, frames[0], subs) == expected
            assert push_batch(hub, frames[1], subs) == expected
        sent = 2 * len(payloads_for(frames[0]))
        assert [len(v.received()) for v in viewers] == ([0, 0, 0] if raised == "before" else [sent, sent, 0])
        lines = [r.getMessage() for r in caplog.records if "batch send failed" in r.getMessage()]
        assert lines == [f"stream=cam0 viewers=3 batch send failed, not sent to viewers={len(expected)}: MemoryError()"]
    finally:
        for v in viewers:
            v.close()


async def test_the_per_viewer_c_path_sends_over_ipv6():
    """``send_frame`` (one C call a viewer-frame) to an IPv6 peer: byte for byte what the Python path makes."""
    (v,) = await _viewers((socket.AF_INET6, 5, 65533, 0, False))
    try:
        header = bytes(v.template.header(5 + 3000, 0))
        fd, family, gso = v.batcher.c_route()
        assert family == socket.AF_INET6
        done = borrowed.SrtpFrameWriter().send_frame(
            v.session, header, FRAMES[0], 65533, fd, family, v.addr, gso, v.fallback, MAX_SEGMENTS, MAX_GSO_BYTES
        )
        got = v.received()
        assert done is not None and done[1] == len(FRAMES[0]) and v.fell == []
        runs: list[bytes] = []
        borrowed.SrtpFrameWriter().protect_frame(
            v.python_session, header, FRAMES[0], 65533,
            lambda data, segment: runs.extend(bytes(data[i : i + segment]) for i in range(0, len(data), segment)),
            MAX_SEGMENTS, MAX_GSO_BYTES,
        )  # fmt: skip
        assert got == runs
    finally:
        v.close()


async def test_what_c_wrote_before_a_failure_mid_frame_is_counted(monkeypatch):
    """``rtpsend.send_frame`` (the per-viewer C call) whose frame fails after C wrote a run (the next run is
    refused, more datagrams than one segmented write takes, and the batcher's writer it falls back to raises):
    the batcher counts the datagrams and system call C wrote all the same (they were lost with the exception)."""
    (v,) = await _viewers((socket.AF_INET, 5, 0, 0, False))
    try:
        monkeypatch.setattr(rtpsend, "C_SEND", True)
        monkeypatch.setattr(rtpsend, "MAX_SEGMENTS", 300)  # a run of 300 datagrams: the kernel refuses it (EINVAL)

        def raising(data, segment, addr, blocked=False):
            raise RuntimeError("the writer's own")

        monkeypatch.setattr(v.batcher, "write_run", raising)
        payloads = [b"a" * 100] + [b"b" * 80] * 300
        with pytest.raises(RuntimeError, match="the writer's own"):
            rtpsend.send_frame(
                borrowed.SrtpFrameWriter(), v.session, bytes(v.template.header(0, 0)), payloads, 0,
                udpbatch.send_run_at_once, v.protocol, v.addr,
            )  # fmt: skip
        got = v.received()  # the first run: the 100-byte payload's packet and a shorter one after it
        assert len(got) == 2 and (v.batcher.datagrams, v.batcher.syscalls, v.batcher.c_frames) == (2, 1, 0)
    finally:
        v.close()


# -- real aiortc viewers

WIDTH, HEIGHT = 320, 240  # the pixel clock's narrowest frame
CLOCK0_MS = 1_700_000_000_000  # the first frame's pixel clock; each next one 33 ms on


async def _connect(hub: PacketHub, n: int):
    """``n`` viewers of ``hub``: camrelay's sender (the shared packer, the per-frame send) on one side of each, set up
    as a session's (``ViewerSession._set_up``: the transceiver added and H.264 preferred before the offer is applied,
    so the answer labels it H.264), a receiving aiortc peer on the other, on loopback."""
    pairs = []
    release = borrowed.restrict_host_addresses(["127.0.0.1"])
    try:
        for i in range(n):
            relay, viewer = RTCPeerConnection(), RTCPeerConnection()
            viewer.addTransceiver("video", direction="recvonly")
            await viewer.setLocalDescription(await viewer.createOffer())
            transceiver = relay.addTransceiver(HubTrack(hub, f"viewer{i}"), direction="sendonly")
            transceiver.setCodecPreferences(h264_preferences())
            attach_to_sender(transceiver.sender, hub)
            await relay.setRemoteDescription(viewer.localDescription)
            await relay.setLocalDescription(await relay.createAnswer())
            await viewer.setRemoteDescription(relay.localDescription)
            pairs.append((relay, viewer))
        deadline = time.monotonic() + DEADLINE
        while not all(r.connectionState == "connected" for r, _ in pairs):
            assert time.monotonic() < deadline, [r.connectionState for r, _ in pairs]
            await asyncio.sleep(0.05)
    finally:
        release()
    return pairs


def _encode(count: int) -> list[tuple[bytes, bool, int]]:
    """``count`` pictures of real H.264 (a keyframe every ``KEYFRAME_EVERY``, P-frames between), each with its pixel
    clock (``CLOCK0_MS`` + 33 ms a picture) and a block of noise (a few kB a frame): (access unit, keyframe,
    clock)."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    codec.time_base = fractions.Fraction(1, 30)
    codec.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline", "g": "1000"}
    rng = np.random.default_rng(7)
    out = []
    for k in range(count):
        planes = np.full((HEIGHT * 3 // 2, WIDTH), 128, np.uint8)
        planes[HEIGHT - NOISE : HEIGHT, :NOISE] = rng.integers(40, 200, (NOISE, NOISE), np.uint8)
        clock = CLOCK0_MS + 33 * k
        pixelclock.draw(planes[:HEIGHT], clock)
        picture = av.VideoFrame.from_ndarray(planes, format="yuv420p")
        picture.pts = k
        if k % KEYFRAME_EVERY == 0:
            picture.pict_type = av.video.frame.PictureType.I
        (packet,) = codec.encode(picture)
        out.append((bytes(packet), packet.is_keyframe, clock))
    return out


KEYFRAME_EVERY = 15
NOISE = 80  # pixels square: ~6 kB a frame, 2.4 Mbit/s at the tests' pace
PICTURES = _encode(32)


class _Decoded:
    """The pixel clocks of the pictures a viewer's aiortc receiver decodes, in order."""

    def __init__(self, viewer: RTCPeerConnection) -> None:
        self.clocks: list[int | None] = []
        self._task = asyncio.ensure_future(self._read(viewer.getTransceivers()[0].receiver.track))

    async def _read(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                self.clocks.append(frame_clock(await track.recv()))

    def close(self) -> None:
        self._task.cancel()


@pytest.fixture
def held():
    """The patches a relay's process holds for the send path: udpbatch's, the synced counts, the C batch on."""
    releases = [udpbatch.PATCH.hold(), borrowed.SYNCED_COUNTS.hold(), rtpsend.use_c_send(True, True)]
    yield
    for release in reversed(releases):
        release()


def _tracks(pairs) -> list[HubTrack]:
    return [r.getTransceivers()[0].sender.track for r, _ in pairs]


async def _all_waiting(pairs) -> None:
    """Until every viewer's send loop waits for the hub's next frame with nothing queued (its track subscribed):
    a frame published then is pushed to each (alone, or in the batch), whatever the scheduling."""
    await asyncio.sleep(0)  # a pass of its own: only the first frame of a pass is pushed
    deadline = time.monotonic() + DEADLINE
    while not all(t.subscription is not None and t.subscription.push and t.subscription._waiting()
                  and not len(t.subscription) for t in _tracks(pairs)):  # fmt: skip
        assert time.monotonic() < deadline, "a viewer's send loop never waited for a frame"
        await asyncio.sleep(0.005)


async def _publish(hub: PacketHub, pairs, pictures, first: int = 0, pts0: int = 0) -> list[EncodedFrame]:
    """``pictures`` published, each once every viewer waits for it (``_all_waiting``); pts 3000 apart from
    ``pts0`` + ``first`` * 3000."""
    sent = []
    for k, (data, keyframe, clock) in enumerate(pictures, start=first):
        await _all_waiting(pairs)
        frame = EncodedFrame(data, pts0 + k * 3000, keyframe, clock / 1000, time.time())
        hub.publish(frame)
        sent.append(frame)
    return sent


async def _received_all(pairs, packets: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while [await _packets_received(v) for _, v in pairs] != [packets] * len(pairs):
        assert time.monotonic() < deadline, [await _packets_received(v) for _, v in pairs]
        await asyncio.sleep(0.05)


async def test_batched_frames_decode_and_sender_reports_and_stats_count_them(held):
    """Three real aiortc viewers, each frame published once every viewer waits for it, so it is pushed to each (in
    the batch after a viewer's first two): each viewer decodes every picture, in order, labelled H.264 (its pixel
    clock read back); each sender's getStats and the sender reports its viewer receives count every packet and
    byte sent, and the report's NTP time is the capture time of the last frame's pts (the batch's counts are
    brought in when aiortc reads them)."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 3)
    decoded = [_Decoded(v) for _, v in pairs]
    try:
        frames = await _publish(hub, pairs, PICTURES[:20], pts0=90_000 * 1_700_000_000)
        packets = sum(len(payloads_for(f)) for f in frames)
        octets = sum(sum(map(len, payloads_for(f))) for f in frames)
        await _received_all(pairs, packets)
        assert all(t.pushed == 20 for t in _tracks(pairs))  # each frame pushed: alone or in the batch
        assert all(rtpsend.lane_of(r.getTransceivers()[0].sender).frames > 0 for r, _ in pairs)  # the batch's
        for relay, _ in pairs:
            stats = await relay.getTransceivers()[0].sender.getStats()
            out = next(s for s in stats.values() if s.type == "outbound-rtp")
            assert (out.packetsSent, out.bytesSent) == (packets, octets)
        # aiortc's receiver hands a picture to its decoder once the next one's packets come: all but the last
        deadline = time.monotonic() + DEADLINE
        while any(len(d.clocks) < 19 for d in decoded):
            assert time.monotonic() < deadline, [d.clocks for d in decoded]
            await asyncio.sleep(0.05)
        assert all(d.clocks == [c for _, _, c in PICTURES[:19]] for d in decoded)
        capture = ntp_at(frames[-1].pts * 1_000_000_000 // CLOCK)
        deadline = time.monotonic() + DEADLINE
        for _, viewer in pairs:  # the viewer's view of the sender's reports (one every 0.5 to 1.5 s)
            while True:
                stats = await viewer.getTransceivers()[0].receiver.getStats()
                remote = [s for s in stats.values() if s.type == "remote-outbound-rtp"]
                if remote and remote[0].packetsSent == packets:
                    break
                assert time.monotonic() < deadline, remote
                await asyncio.sleep(0.1)
            assert remote[0].bytesSent == octets
            captured = (capture >> 32) - NTP_UNIX_OFFSET + (capture & 0xFFFFFFFF) / (1 << 32)  # Unix seconds
            assert abs(remote[0].remoteTimestamp.timestamp() - captured) < 2e-6  # aiortc's datetime: microseconds
    finally:
        for d in decoded:
            d.close()
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()


async def test_a_nack_for_a_batched_packet_is_answered_with_its_payload(held, monkeypatch):
    """A NACK naming a packet of a frame the batch sent (its lane's frame count went up on that publish): the
    sender retransmits that packet's payload, its sequence number (in the RTX packet, as aiortc wraps it) and its
    frame's timestamp."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 2)
    sent: list[bytes] = []

    async def capture(self, data: bytes) -> None:
        sent.append(data)

    try:
        sender = pairs[1][0].getTransceivers()[0].sender
        lane = rtpsend.lane_of(sender)
        await _publish(hub, pairs, PICTURES[:2])
        for k in range(2, len(PICTURES)):  # until a frame goes through the batch (one declined goes alone)
            before = lane.frames
            (last,) = await _publish(hub, pairs, PICTURES[k : k + 1], first=k)
            if lane.frames == before + 1:
                break
        assert lane.frames == before + 1, "no frame went through the batch"
        first = (lane.sequence - len(last.payloads)) & 0xFFFF  # the last frame's first packet
        monkeypatch.setattr(borrowed.SenderFields, "send_rtp", capture)
        await rtpsend._retransmit(sender, (first + len(last.payloads) - 1) & 0xFFFF)
        await rtpsend._retransmit(sender, (first + 60_000) & 0xFFFF)  # long gone: nothing sent
        assert len(sent) == 1
        packet = RtpPacket.parse(sent[0])
        number = (first + len(last.payloads) - 1) & 0xFFFF
        assert packet.payload[:2] == number.to_bytes(2, "big")  # RTX: the original number first
        assert packet.payload[2:] == last.payloads[-1] and packet.marker
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()


async def test_a_viewer_moving_between_the_batch_and_its_own_path_gets_each_packet_once_numbered_on(held):
    """One viewer's packets as its peer decrypts them, while its frames go through the batch, alone (taken out of
    the batch, as a catch-up does), in the batch again, and alone for good once its lane fails mid-frame in C (its
    socket made a pipe, whose fallback raises): every sequence number comes once, numbered on from frame to frame
    and packet to packet, with its frame's timestamp (3000 ticks a frame) and the marker on each frame's last.
    The failed frame's packets were protected (their numbers spent): they are not sent again under new numbers;
    they are the gap a NACK names, and the lane's history answers it. The lane stays out of the batch."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 2)
    got: list[RtpPacket] = []
    track = _tracks(pairs)[0]
    sender = pairs[0][0].getTransceivers()[0].sender

    def keep(transport, data: bytes) -> None:
        if transport is pairs[0][1].getTransceivers()[0].receiver.transport:
            got.append(RtpPacket.parse(data))

    release = borrowed.divert_decrypted_rtp(keep)
    read_end, write_end = os.pipe()
    try:
        lane = rtpsend.lane_of(sender)
        frames = await _publish(hub, pairs, PICTURES[:6])  # the recv path, alone, then the batch
        batched = lane.frames
        assert batched > 0
        track.subscription.lane = None  # out of the batch for a frame: it rejoins after it
        frames += await _publish(hub, pairs, PICTURES[6:7], first=6)
        assert lane.frames == batched and track.subscription.lane is lane
        frames += await _publish(hub, pairs, PICTURES[7:10], first=7)
        assert lane.frames > batched
        protocol = borrowed.nominated_pair(sender.transport).protocol

        def raising(data, segment, blocked):
            raise RuntimeError("the fallback's own")

        counts = batcher_for(protocol).c_written
        assert borrowed.route_lane(
            lane, sender.transport._tx_srtp, write_end, socket.AF_INET, borrowed.nominated_pair(sender.transport)
            .remote_addr, True, protocol.transport, raising, (), counts,
        )  # fmt: skip
        failed_at = len(frames)
        before = lane.frames
        frames += await _publish(hub, pairs, PICTURES[10:11], first=10)
        assert lane.frames == before + 1 and not lane.bound and track.subscription.lane is None  # taken, then left
        frames += await _publish(hub, pairs, PICTURES[11:16], first=11)
        assert lane.frames == before + 1 and not lane.bound and track.subscription.lane is None
        assert rtpsend.lane_of(sender) is lane and track.pushed == 16
        total = sum(len(payloads_for(f)) for f in frames)
        lost = len(frames[failed_at].payloads)
        deadline = time.monotonic() + DEADLINE
        while len(got) < total - lost:
            assert time.monotonic() < deadline, (len(got), total - lost)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # anything sent twice would have come by now
        video = [p for p in got if p.payload_type == got[0].payload_type]
        numbers = [p.sequence_number for p in video]
        assert len(set(numbers)) == len(numbers) == total - lost  # each once
        first = numbers[0]
        expected = []
        k = 0
        for i, f in enumerate(frames):
            for j in range(len(payloads_for(f))):
                if i != failed_at:
                    expected.append(((first + k) & 0xFFFF, j == len(payloads_for(f)) - 1, f.pts, payloads_for(f)[j]))
                k += 1
        base = (video[0].timestamp - frames[0].pts) & 0xFFFFFFFF
        assert [(p.sequence_number, bool(p.marker), (p.timestamp - base) & 0xFFFFFFFF, p.payload) for p in video] == (
            expected
        )
        # the failed frame's packets: the gap, answered from the lane's history
        gap = (first + sum(len(payloads_for(f)) for f in frames[:failed_at])) & 0xFFFF
        found = lane.find(gap)
        assert found is not None and found[2] == frames[failed_at].payloads[0]
    finally:
        release()
        os.close(read_end)
        os.close(write_end)
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()


async def test_a_lane_that_cannot_be_bound_leaves_its_viewer_on_its_own_path_with_each_frame_sent_once(
    held, monkeypatch, caplog
):
    """Binding a viewer's lane raises (after a frame it was pushed alone): that frame is not sent again through its
    queue, the viewer keeps being pushed its frames alone (every packet once, none lost), the batch is not tried
    for it again, and it is said once. The other viewer is batched as before."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 2)
    bad = pairs[0][0].getTransceivers()[0].sender
    real = borrowed.bind_lane
    tries = []

    def bind_lane(lane, sender, *args):
        if sender is bad:
            tries.append(sender)
            raise OSError("no lane here")
        return real(lane, sender, *args)

    monkeypatch.setattr(borrowed, "bind_lane", bind_lane)
    try:
        with caplog.at_level(logging.WARNING, logger="relay.webrtc.rtpsend"):
            frames = await _publish(hub, pairs, PICTURES[:12])
        packets = sum(len(payloads_for(f)) for f in frames)
        await _received_all(pairs, packets)
        await asyncio.sleep(0.2)  # a frame sent twice would have come by now
        assert [await _packets_received(v) for _, v in pairs] == [packets, packets]
        tracks = _tracks(pairs)
        assert [t.pushed for t in tracks] == [12, 12]  # each frame pushed: none went through a queue
        assert tracks[0].subscription.push is not None and tracks[0].subscription.lane is None
        assert len(tries) == 1 and rtpsend.lane_of(bad).frames == 0
        assert rtpsend.lane_of(pairs[1][0].getTransceivers()[0].sender).frames > 0  # the other: batched
        said = [r for r in caplog.records if "cannot join the batch" in r.getMessage()]
        assert len(said) == 1 and "no lane here" in said[0].getMessage()
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()


def _nack(media_ssrc: int, pid: int, entries: int) -> bytes:
    """An RTCP generic NACK naming ``pid`` and the 16 after it, ``entries`` times over (one crafted packet)."""
    fci = struct.pack("!HH", pid, 0xFFFF) * entries
    length = (8 + len(fci)) // 4  # 32-bit words after the first, less one: 2 ssrc words + FCIs
    return struct.pack("!BBHII", 0x80 | 1, 205, length, 1, media_ssrc) + fci


async def test_a_crafted_nack_sends_each_packet_it_names_once(held, monkeypatch):
    """One NACK of 340 entries naming the same 17 packets (5,780 in aiortc's reading of it), handled by aiortc's own
    sender on a real connection whose frames were sent: each of the 17 packets is sent again once, the rest refused
    (a frozen clock: nothing becomes due again while it is handled)."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 1)
    numbers: list[int] = []
    release = borrowed.divert_decrypted_rtp(
        lambda transport, data: numbers.append(RtpPacket.parse(data).sequence_number)
    )
    sent: list[bytes] = []

    async def capture(self, data: bytes) -> None:
        sent.append(data)

    try:
        sender = pairs[0][0].getTransceivers()[0].sender
        frames = await _publish(hub, pairs, PICTURES[:8])
        deadline = time.monotonic() + DEADLINE
        while len(numbers) < sum(len(f.payloads) for f in frames):  # the viewer decrypted each (diverted to here)
            assert time.monotonic() < deadline, len(numbers)
            await asyncio.sleep(0.05)
        assert len(numbers) > 17
        budget = rtpsend.resend_budget(sender, ResendBudget(clock=lambda: 100.0))
        monkeypatch.setattr(borrowed.SenderFields, "send_rtp", capture)
        (packet,) = RtcpPacket.parse(_nack(borrowed.SenderFields(sender).ssrc, numbers[0], 340))
        assert len(packet.lost) == 340 * 17
        await sender._handle_rtcp_packet(packet)
        assert len(sent) == 17 and (budget.allowed, budget.refused) == (17, 340 * 17 - 17)
        assert sorted(int.from_bytes(RtpPacket.parse(d).payload[:2], "big") for d in sent) == numbers[:17]  # RTX
    finally:
        release()
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()


# -- a viewer whose socket backs up: a network namespace whose loopback shapes that viewer's datagrams alone

SLOW_RATE = "300kbit"  # what the slow viewer's datagrams get a second: far less than the frames' 1.2 Mbit/s
SLOW_SNDBUF = 4096  # its socket's buffer (the kernel doubles it): full within a keyframe
FRAMES_SHAPED = 30  # a second of frames, two keyframes among them


@pytest.fixture
def namespace():
    """A network namespace with its loopback up, this thread inside it (its new sockets live there)."""
    with loopback_namespace("cr-batch") as name:
        yield name


def _shape_source_port(netns: str, port: int) -> None:
    """Datagrams from UDP port ``port`` leave the namespace's loopback at ``SLOW_RATE``; all others as they come
    (an HTB class of their own, the rest in a class far faster than the test sends)."""
    tc = ("tc", "-n", netns)
    run(*tc, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
    run(*tc, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit")
    run(
        *tc, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:30", "htb", "rate", SLOW_RATE, "ceil", SLOW_RATE
    )
    run(*tc, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
        "match", "ip", "sport", str(port), "0xffff", "flowid", "1:30")  # fmt: skip


async def _packets_received(viewer: RTCPeerConnection) -> int:
    stats = await viewer.getTransceivers()[0].receiver.getStats()
    return sum(s.packetsReceived for s in stats.values() if s.type == "inbound-rtp")


async def test_a_viewer_whose_socket_backs_up_leaves_the_batch_and_the_others_keep_every_frame(held, namespace):
    """Three real aiortc viewers; the middle one's datagrams are shaped far below the stream's rate and its socket's
    buffer is small, so it backs up within a keyframe. Its lane is declined while its socket holds anything back,
    and it gets the per-viewer path's behaviour (its frames wait in its own bounded backlog, none lost by the
    socket); the other two stay in the batch and receive every packet of every frame."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 3)
    try:
        first = await _publish(hub, pairs, PICTURES[:2])  # every viewer live, and in the batch after its second frame
        await _received_all(pairs, sum(len(payloads_for(f)) for f in first))
        senders = [r.getTransceivers()[0].sender for r, _ in pairs]
        slow = borrowed.nominated_pair(senders[1].transport).protocol
        slow.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SLOW_SNDBUF)
        _shape_source_port(namespace, slow.transport.get_extra_info("sockname")[1])
        subs = [s.track.subscription for s in senders]
        assert all(sub.lane is not None for sub in subs)
        before = [await _packets_received(v) for _, v in pairs]
        batched_before = [rtpsend.lane_of(s).frames for s in senders]
        backed_up = queued = 0
        sent = 0
        for k in range(FRAMES_SHAPED):
            data, keyframe, clock = PICTURES[k + 2]
            frame = EncodedFrame(data, (k + 2) * 3000, keyframe, clock / 1000, time.time())
            hub.publish(frame)
            sent += len(payloads_for(frame))
            backed_up += bool(rtpsend._backlog(slow))
            queued = max(queued, len(subs[1]))
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + DEADLINE  # the fast viewers' last packets read off their sockets
        while [await _packets_received(pairs[i][1]) - before[i] for i in (0, 2)] != [sent, sent]:
            assert time.monotonic() < deadline, (
                sent, [await _packets_received(v) - b for (_, v), b in zip(pairs, before, strict=True)],
                [(len(s), s.dropped, s.delivered) for s in subs],
            )  # fmt: skip
            await asyncio.sleep(0.05)
        batched = [rtpsend.lane_of(s).frames - b for s, b in zip(senders, batched_before, strict=True)]
        # Every packet received, nothing dropped, in the batch to the end. (Not every frame: one published while
        # the viewer's batcher holds an RTCP datagram of the same pass is declined, and sent alone after it.)
        assert subs[0].dropped == subs[2].dropped == 0 and subs[0].lane is not None and subs[2].lane is not None
        # the slow one: backed up, out of the batch meanwhile, its frames waiting in its own backlog
        assert backed_up > 0 and queued > 0 and min(batched[0], batched[2]) > 0
        # each frame published is sent, still queued, or counted dropped (the slow one's lag limit): none lost unseen
        published = 2 + FRAMES_SHAPED
        assert [sub.delivered + sub.dropped + len(sub) for sub in subs] == [published] * 3
        assert batcher_for(slow).dropped == 0  # what its socket could not take yet was queued, not lost
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()

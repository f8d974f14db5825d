"""One C call a published frame for every live viewer (``_fastsend.send_batch``, ``rtpsend.push_batch``) against
each viewer's own send, which it stands in for: the same SRTP datagrams byte for byte for each viewer of the batch,
on real sockets (IPv4 and IPv6), across a sequence wrap, the marker on each frame's last packet; a viewer that cannot
take the frame now declined with nothing sent and nothing changed; one that fails mid-frame leaving the batch while
the others get their frames; and, with real aiortc viewers, the sender reports' counts and NACKs of batched frames.
Without the extension built, every test here is skipped (the per-viewer paths are in test_fastsend.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import types

import pytest
from aiortc import RTCPeerConnection, RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from relay.hub import EncodedFrame, PacketHub
from relay.webrtc import borrowed, rtpsend, udpbatch
from relay.webrtc.rtpsend import (
    NTP_UNIX_OFFSET,
    HeaderTemplate,
    HubTrack,
    attach_to_sender,
    h264_preferences,
    ntp_at,
    push_batch,
)
from relay.webrtc.udpbatch import MAX_GSO_BYTES, MAX_SEGMENTS, batcher_for

from .netns import loopback_namespace, run
from .test_aiortc_hooks import _srtp_pair
from .test_udpbatch import _Sending

pytestmark = pytest.mark.skipif(not borrowed.C_SEND_BUILT, reason="relay.webrtc._fastsend is not built here")

RCVBUF = 8 << 20  # a receiving socket's buffer: every datagram of a test's frames held until read
SO_RCVBUFFORCE = 33  # root may size a socket's buffer past net.core.rmem_max
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
        got = []
        while True:
            try:
                got.append(self.rx.recv(1 << 16))
            except BlockingIOError:
                return got

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
    subscription's lane cleared), its frame is offered its own way, and one log line a second says so."""
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
            assert push_batch(hub, frames[0], subs) == [1]
            assert subs[1].lane is None and not broken.lane.bound
            assert [len(v.received()) > 0 for v in viewers] == [True, False, True]
            subs[1].lane = broken.lane  # as if it had joined again, unbound: declined
            assert push_batch(hub, frames[1], subs) == [1] and subs[1].lane is broken.lane
            break_it()  # and failing again within the second: said once
            assert push_batch(hub, frames[2], subs) == [1] and subs[1].lane is None
        lines = [r.getMessage() for r in caplog.records if "left the batch" in r.getMessage()]
        assert len(lines) == 1 and "stream=cam0 viewers=1" in lines[0] and "the fallback's own" in lines[0]
        assert len(hub.fanout_delay._values) == 6  # two viewers, three frames
        assert [v.lane.frames for v in viewers] == [3, 0, 3]
    finally:
        os.close(read_end)
        os.close(write_end)
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


async def _connect(hub: PacketHub, n: int):
    """``n`` viewers of ``hub``: camrelay's sender (the shared packer, the per-frame send) on one side of each, a
    receiving aiortc peer on the other, on loopback."""
    pairs = []
    release = borrowed.restrict_host_addresses(["127.0.0.1"])
    try:
        for i in range(n):
            relay, viewer = RTCPeerConnection(), RTCPeerConnection()
            viewer.addTransceiver("video", direction="recvonly")
            await viewer.setLocalDescription(await viewer.createOffer())
            await relay.setRemoteDescription(viewer.localDescription)
            transceiver = relay.getTransceivers()[0]
            transceiver.sender.replaceTrack(HubTrack(hub, f"viewer{i}"))
            transceiver.direction = "sendonly"
            transceiver.setCodecPreferences(h264_preferences())
            attach_to_sender(transceiver.sender, hub)
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


SPS_PPS = bytes.fromhex("000000016742e01f8c8d40501e900f08846a0000000168ce3c80")


def _unit(k: int) -> bytes:
    body = bytes([k % 200 + 1]) * (20_000 if k == 0 else 3_000)
    return (SPS_PPS if k == 0 else b"") + b"\x00\x00\x00\x01" + (b"\x65" if k == 0 else b"\x41") + body


@pytest.fixture
def held():
    """The patches a relay's process holds for the send path: udpbatch's, the synced counts, the C batch on."""
    releases = [udpbatch.PATCH.hold(), borrowed.SYNCED_COUNTS.hold(), rtpsend.use_c_send(True, True)]
    yield
    for release in reversed(releases):
        release()


async def _publish(hub: PacketHub, frames: int, pts0: int = 0) -> list[EncodedFrame]:
    sent = []
    for k in range(frames):
        frame = EncodedFrame(_unit(k), pts0 + k * 3000, k == 0, time.time())
        hub.publish(frame)
        sent.append(frame)
        await asyncio.sleep(0.02)
    return sent


async def test_sender_reports_and_stats_count_the_batched_frames(held):
    """Three real aiortc viewers, their frames sent in the batch after the first: each sender's getStats and the
    sender reports its viewer receives count every packet and byte sent, and the report's NTP time is the capture
    time of the last frame's pts (the batch's counts are brought in when aiortc reads them)."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 3)
    try:
        frames = await _publish(hub, 20, pts0=90_000 * 1_700_000_000)
        packets = sum(len(f.payloads) for f in frames)
        octets = sum(sum(map(len, f.payloads)) for f in frames)
        tracks = [r.getTransceivers()[0].sender.track for r, _ in pairs]
        assert all(t.pushed == 20 for t in tracks)
        assert all(rtpsend.lane_of(r.getTransceivers()[0].sender).frames >= 15 for r, _ in pairs)  # the batch's
        for relay, _ in pairs:
            stats = await relay.getTransceivers()[0].sender.getStats()
            out = next(s for s in stats.values() if s.type == "outbound-rtp")
            assert (out.packetsSent, out.bytesSent) == (packets, octets)
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
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()


async def test_a_nack_for_a_batched_packet_is_answered_with_its_payload(held, monkeypatch):
    """A NACK naming a packet the batch sent: the sender retransmits that packet's payload, its sequence number
    (in the RTX packet, as aiortc wraps it) and its frame's timestamp."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 2)
    sent: list[bytes] = []

    async def capture(self, data: bytes) -> None:
        sent.append(data)

    try:
        frames = await _publish(hub, 5)
        sender = pairs[1][0].getTransceivers()[0].sender
        lane = rtpsend.lane_of(sender)
        assert lane.frames >= 3
        last = frames[-1]
        first = (lane.sequence - len(last.payloads)) & 0xFFFF  # the last frame's first packet
        monkeypatch.setattr(borrowed.SenderFields, "send_rtp", capture)
        await sender._retransmit((first + 1) & 0xFFFF)
        await sender._retransmit((first + 60_000) & 0xFFFF)  # long gone: nothing sent
        assert len(sent) == 1
        packet = RtpPacket.parse(sent[0])
        assert packet.payload[:2] == ((first + 1) & 0xFFFF).to_bytes(2, "big")  # RTX: the original number first
        assert packet.payload[2:] == last.payloads[1] and not packet.marker
    finally:
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
        await _publish(hub, 2)  # every viewer live, and in the batch after its first frame
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
            frame = EncodedFrame(_unit(k), (k + 2) * 3000, k % 15 == 0, time.time())
            hub.publish(frame)
            sent += len(frame.payloads)
            backed_up += bool(rtpsend._backlog(slow))
            queued = max(queued, len(subs[1]))
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + DEADLINE  # the fast viewers' last packets read off their sockets
        while [await _packets_received(pairs[i][1]) - before[i] for i in (0, 2)] != [sent, sent]:
            assert time.monotonic() < deadline, [
                await _packets_received(v) - b for (_, v), b in zip(pairs, before, strict=True)
            ]
            await asyncio.sleep(0.05)
        batched = [rtpsend.lane_of(s).frames - b for s, b in zip(senders, batched_before, strict=True)]
        # Every packet received, nothing dropped, in the batch to the end. (Not every frame: one published while
        # the viewer's batcher holds an RTCP datagram of the same pass is declined, and sent alone after it.)
        assert subs[0].dropped == subs[2].dropped == 0 and subs[0].lane is not None and subs[2].lane is not None
        # the slow one: backed up, out of the batch meanwhile, its frames waiting in its own backlog
        assert backed_up > 0 and queued > 0 and batched[1] < FRAMES_SHAPED // 2 < min(batched[0], batched[2])
        assert batcher_for(slow).dropped == 0  # what its socket could not take yet was queued, not lost
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()

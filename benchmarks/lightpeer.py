"""The light WebRTC peer: a real viewer that counts frames from RTP headers and decrypts no media.

aiortc does ICE (and answers the relay's consent checks), DTLS and RTCP as
for any viewer; each RTP datagram is taken off the socket before SRTP
(``benchmarks.borrowed.divert_rtp``): SRTP encrypts the payload only, so the
header's sequence number, timestamp, marker and SSRC are there to read. Per
packet that is a few byte reads, where a full aiortc viewer unprotects,
parses, buffers and reassembles, so one core of load generator holds
hundreds of these. The peer sends RTCP receiver reports itself, about once
a second as aiortc does (aiortc's receiver reports only on streams it parsed):
the relay sees a live viewer.

``RtpCounter`` is the sans-io core: datagrams in, counts out.

- A frame is one RTP timestamp. It ends at its marker bit, or when the next
  timestamp starts (a lost marker).
- Frames missing are gaps in RTP time (``benchmarks.peers.frames_missing``);
  a frame with a sequence gap inside it (or a lost tail, or a lost head right
  after the previous frame) is damaged: both count as lost, not as frames.
  A gap between two frames with frames missing between them is put down to
  those frames.
- Packets out of order or repeated (a sequence number before the next
  expected) are counted ``late`` and otherwise ignored; packets of another
  SSRC (RTX) ``foreign``; RTP datagrams too short for a header ``malformed``.

A peer that offers audio too (``PeerPlan.audio``) counts the Opus packets
apart, by the payload type its answer gave them (``AUDIO_CLOCK``, 50 packets
a second), and its receiver reports have a block for each.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import struct
import time
from dataclasses import asdict, dataclass

from benchmarks import borrowed
from benchmarks.peers import CONNECT_TIMEOUT, RTP_CLOCK, PeerPlan, PeerResult, frames_missing

RTP_HEADER = 12  # bytes: the fixed RTP header
RTP_MARKER = 0x80  # in the header's second byte
RTP_FIRST_BYTE = range(128, 192)  # RFC 7983: RTP and RTCP (version 2); STUN is 0-3, DTLS 20-63
RTCP_SECOND_BYTE = range(192, 224)  # RFC 5761: RTCP packet types 192-223, never an RTP marker and payload type
SEQUENCE_HALF = 0x8000  # a sequence number this far or more behind the next expected is late, not ahead
AUDIO_CLOCK = 48_000  # Opus's RTP clock
AUDIO_PACKETS_PER_SECOND = 50  # 20 ms frames, one a packet
REPORT_INTERVAL = 1.0  # seconds between receiver reports, randomised over 0.5-1.5 times it as aiortc does
LIGHT_SSRC_BITS = 32
_HEADER = struct.Struct("!BBHII")  # the fixed header's first and second bytes, sequence, timestamp, SSRC


@dataclass(frozen=True)
class RtpCounts:
    """What a counter has seen so far; ``minus`` gives a window's."""

    frames: int = 0  # complete frames
    frames_lost: int = 0  # missing (RTP-time gaps) and damaged (sequence gaps)
    packets: int = 0
    packets_lost: int = 0  # sequence gaps
    bytes: int = 0  # datagram bytes, SRTP overhead included
    late: int = 0
    foreign: int = 0
    malformed: int = 0

    def minus(self, earlier: RtpCounts) -> RtpCounts:
        return RtpCounts(*(a - b for a, b in zip(asdict(self).values(), asdict(earlier).values(), strict=True)))


@dataclass(frozen=True)
class ReportFigures:
    """One report block of an RTCP receiver report (RFC 3550 6.4.2); jitter, LSR and DLSR go as 0."""

    ssrc: int
    fraction_lost: int  # since the previous report, of 256
    packets_lost: int  # cumulative
    highest_sequence: int  # extended: cycles in the upper 16 bits


class RtpCounter:
    """Frames and losses of one RTP stream from its packets' headers (plain bytes in, counts out)."""

    def __init__(self, fps: float, timestamps: list[int] | None = None, clock: int = RTP_CLOCK) -> None:
        self.fps = fps
        self.clock = clock  # the RTP clock rate: 90 kHz (H.264), 48 kHz (Opus)
        self.timestamps = timestamps  # when a list: each complete frame's RTP timestamp is added to it
        self.ssrc: int | None = None  # the first RTP packet's; others are foreign
        self.next_sequence = 0  # extended: the sequence number expected next, cycles included
        self.timestamp: int | None = None  # the current frame's
        self.closed = True  # the current frame ended at its marker
        self.damaged = False  # the current frame lost a packet
        self.frames = self.frames_lost = self.packets = self.packets_lost = self.bytes = 0
        self.late = self.foreign = self.malformed = 0
        self._reported_expected = self._reported_packets = 0  # at the previous receiver report

    def take(self, data: bytes) -> bool:
        """Count ``data`` if it is an RTP packet (True); anything else (STUN, DTLS, RTCP) is not ours (False)."""
        if len(data) < RTP_HEADER:
            if not data or data[0] not in RTP_FIRST_BYTE or (len(data) > 1 and data[1] in RTCP_SECOND_BYTE):
                return False
            self.malformed += 1
            return True
        first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        if not 128 <= first < 192 or 192 <= second < 224:  # RTP_FIRST_BYTE, RTCP_SECOND_BYTE
            return False
        if self.ssrc is None:
            self.ssrc, self.next_sequence = ssrc, sequence
        elif ssrc != self.ssrc:
            self.foreign += 1
            return True
        gap = (sequence - self.next_sequence) & 0xFFFF
        if gap >= SEQUENCE_HALF:
            self.late += 1
            return True
        self.next_sequence += gap + 1
        self.packets += 1
        self.packets_lost += gap
        self.bytes += len(data)
        if timestamp != self.timestamp:
            head_lost = gap > 0
            if self.timestamp is not None:
                if not self.closed:  # its marker never came: the gap is put down to its tail, marker included
                    self.damaged = self.damaged or gap > 0
                    self._close()
                    head_lost = False
                missing = frames_missing(self.timestamp, timestamp, self.fps, self.clock)
                self.frames_lost += missing
                head_lost = head_lost and not missing  # else the gap is put down to the frames missing
            self.timestamp, self.closed = timestamp, False
            self.damaged = head_lost  # right after a complete frame, what was lost was this one's head
        elif gap:
            self.damaged = True
        if second & RTP_MARKER and not self.closed:
            self._close()
        return True

    def _close(self) -> None:
        if self.damaged:
            self.frames_lost += 1
        else:
            self.frames += 1
            if self.timestamps is not None:
                self.timestamps.append(self.timestamp)
        self.closed = True

    def counts(self) -> RtpCounts:
        return RtpCounts(
            self.frames, self.frames_lost, self.packets, self.packets_lost, self.bytes,
            self.late, self.foreign, self.malformed,
        )  # fmt: skip

    def report(self) -> ReportFigures | None:
        """The receiver report block for now (None before the first packet); the next one's fraction lost
        counts from here."""
        if self.ssrc is None:
            return None
        expected = self.packets + self.packets_lost
        expected_interval = expected - self._reported_expected
        lost_interval = expected_interval - (self.packets - self._reported_packets)
        self._reported_expected, self._reported_packets = expected, self.packets
        fraction = (lost_interval << 8) // expected_interval if expected_interval > 0 and lost_interval > 0 else 0
        return ReportFigures(self.ssrc, min(fraction, 255), self.packets_lost, (self.next_sequence - 1) & 0xFFFFFFFF)


class LightPeer:
    """One WHEP viewer counting its stream with an ``RtpCounter``. ``connect()``, then read ``counter``;
    ``close()`` ends the session."""

    def __init__(self, url: str, http, fps: float, timestamps: list[int] | None = None, audio: bool = False) -> None:
        from relay.webrtc.whepclient import WhepViewer

        self.viewer = WhepViewer(url, http, audio=audio)
        self.counter = RtpCounter(fps, timestamps)
        # Offering audio: its packets, told apart by the payload type the answer gave Opus (None: no audio)
        self.audio = RtpCounter(AUDIO_PACKETS_PER_SECOND, clock=AUDIO_CLOCK) if audio else None
        self._audio_type: int | None = None
        self.first_frame_at: float | None = None  # monotonic, when its first complete frame ended
        self.reports = 0  # receiver reports sent
        self._ssrc = random.getrandbits(LIGHT_SSRC_BITS)
        self._release = None
        self._reporting: asyncio.Task | None = None

    @property
    def pc(self):
        return self.viewer.pc

    @property
    def connected_at(self) -> float | None:
        return self.viewer.stats.connected_at

    async def connect(self) -> None:
        """Offer, answer, and the RTP diversion in place before ICE starts (aiortc connects in a task of its
        own after the answer), so no media packet reaches aiortc."""
        await self.viewer.connect()
        if self.audio is not None:
            from benchmarks.lipsync import opus_payload_type

            self._audio_type = opus_payload_type(self.viewer.answer or "")
        self._release = borrowed.divert_rtp(self.viewer.pc, self._datagram)
        self._reporting = asyncio.create_task(self._report_loop(), name="lightpeer-reports")

    def _datagram(self, data: bytes) -> bool:
        if (
            self._audio_type is not None
            and len(data) > 1
            and data[0] in RTP_FIRST_BYTE
            and data[1] & 0x7F == self._audio_type
            and data[1] not in RTCP_SECOND_BYTE
        ):
            return self.audio.take(data)  # type: ignore[union-attr]
        taken = self.counter.take(data)
        if self.first_frame_at is None and self.counter.frames:
            self.first_frame_at = time.monotonic()
        return taken

    async def _report_loop(self) -> None:
        from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket

        while True:
            await asyncio.sleep(REPORT_INTERVAL * (0.5 + random.random()))
            counters = [self.counter] if self.audio is None else [self.counter, self.audio]
            blocks = [
                # jitter, LSR and DLSR go as 0
                RtcpReceiverInfo(f.ssrc, f.fraction_lost, f.packets_lost, f.highest_sequence, 0, 0, 0)
                for f in (c.report() for c in counters)
                if f is not None
            ]
            if not blocks:
                continue
            try:
                await borrowed.send_rtcp(self.viewer.pc, bytes(RtcpRrPacket(ssrc=self._ssrc, reports=blocks)))
            except ConnectionError:
                continue
            self.reports += 1

    async def close(self) -> None:
        if self._reporting is not None:
            self._reporting.cancel()
            try:
                await self._reporting
            except asyncio.CancelledError:
                pass
        if self._release is not None:
            self._release()
        await self.viewer.close()


async def light_peers(plan: PeerPlan, ready: mp.Queue, start: mp.Event) -> list[dict]:
    """A worker process's light peers (``PeerPlan`` kind ``webrtc-light``): connect every one, report ready
    once each has a complete frame, then count ``plan.duration`` seconds from ``start``."""
    import aiohttp

    from relay.webrtc.borrowed import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])  # loopback only
    async with aiohttp.ClientSession() as http:
        peers = [LightPeer(url, http, plan.fps, audio=plan.audio) for url in plan.targets]
        try:
            await asyncio.gather(*(p.connect() for p in peers))
            t0 = time.monotonic()
            while not all(p.first_frame_at for p in peers):
                if time.monotonic() - t0 > CONNECT_TIMEOUT:
                    raise TimeoutError(f"not every peer had a frame within {CONNECT_TIMEOUT:g} s")
                await asyncio.sleep(0.05)
            ready.put(("ready", len(peers)))
            while not start.is_set():
                await asyncio.sleep(0.01)
            before, t0 = [(p.counter.counts(), _audio_counts(p)) for p in peers], time.monotonic()
            await asyncio.sleep(plan.duration)
            after, elapsed = [(p.counter.counts(), _audio_counts(p)) for p in peers], time.monotonic() - t0
            results = []
            for p, (b, ab), (a, aa) in zip(peers, before, after, strict=True):
                window, sound = a.minus(b), aa.minus(ab)
                r = PeerResult(plan.probe, p.viewer.url, window.frames, window.bytes + sound.bytes, window.frames_lost)
                r.fps = window.frames / elapsed
                r.packets_lost = window.packets_lost
                r.audio_packets, r.audio_packets_lost = sound.packets, sound.packets_lost
                if p.connected_at is not None and p.first_frame_at is not None:
                    r.first_frame_ms = (p.first_frame_at - p.connected_at) * 1000
                if p.pc.connectionState != "connected":
                    r.error = f"connection {p.pc.connectionState}"
                results.append(asdict(r))
            return results
        finally:
            await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)


def _audio_counts(peer: LightPeer) -> RtpCounts:
    return peer.audio.counts() if peer.audio is not None else RtpCounts()

"""The send path: a hub's frames onto an aiortc sender, sent per frame.

A viewer's (or a WHIP publisher's) track yields the hub's already-encoded
frames (``HubTrack``), so aiortc never encodes for it: its sender packs with
``SharedPacker``, which splits each access unit into RTP payloads once per
frame for everyone; its PLI and FIR go to the shared encoder; and it runs
the per-frame send loop below instead of aiortc's per-packet one.

aiortc's ``RTCRtpSender._run_rtp`` builds an ``RtpPacket`` object for every
packet, reads the NTP clock twice for it, serializes its header extensions,
and passes it down four coroutines to the socket: ~14 µs of Python per
packet. A 720p keyframe is ~40 packets; for 30 viewers the last one waits for
1,200 of those, and the frame before each keyframe waits too (a receiver's
jitter buffer hands a frame on when the next one starts), so keyframes set
the 95th percentile of latency.

Here each viewer's sender serializes one header per frame with aiortc's own
serializer, then for each payload patches the sequence number and marker
bit, SRTP-protects it and hands it to the socket batcher (relay.webrtc.udpbatch),
or straight to the socket with batching off: no per-packet objects, clock
reads or awaits. RTCP sender reports keep their counts (updated once per
frame) and NACKed packets are rebuilt from a history of (sequence,
timestamp, marker, payload) on demand.

The sender's private fields are reached through ``relay.webrtc.borrowed``;
tests/test_aiortc_hooks.py fails if an aiortc upgrade moves them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import dataclass

from aiortc import MediaStreamError, MediaStreamTrack, RTCRtpCodecCapability, RTCRtpSender, clock
from aiortc.rtcrtpsender import random_sequence_number
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket, wrap_rtx
from aiortc.utils import random32, uint16_add, uint32_add

from ..hub import EncodedFrame, HubClosed, PacketHub, Subscription
from . import borrowed
from .catchup import ViewerTiming
from .udpbatch import send_direct, send_now

log = logging.getLogger(__name__)

# The profile every browser decodes in hardware or software: constrained baseline, level 3.1.
PREFERRED_PROFILES = ("42e01f", "42001f")

_HISTORY = "camrelay_history"
RETRANSMITS = "camrelay_retransmits"  # NACKed packets sent again, per sender
_SEND = "camrelay_send"  # how a sender's datagrams leave: batched (udpbatch.send_now) or one by one


@dataclass(slots=True)
class OutgoingFrame:
    """A hub frame as one viewer sends it: with that viewer's RTP timestamp (``HubTrack``)."""

    frame: EncodedFrame
    timestamp: int  # 90 kHz, before the sender's random origin


class SharedPacker:
    """Stands in for aiortc's per-sender H.264 encoder: packs, never encodes."""

    def pack(self, item: OutgoingFrame) -> tuple[list[bytes], int]:
        return payloads_for(item.frame), item.timestamp


def payloads_for(frame: EncodedFrame) -> list[bytes]:
    """RTP payloads (single NAL, STAP-A, FU-A) for one frame, computed once."""
    if frame.payloads is None:
        frame.payloads = borrowed.packetize(frame.data)
    return frame.payloads


class HubTrack(MediaStreamTrack):
    """A video track whose frames are the hub's encoded access units, each with this viewer's RTP timestamp.

    It subscribes on the first ``recv()``, which aiortc makes only once DTLS
    is up: the join keyframe is asked for when the viewer can take it, and no
    queue fills (and overflows) while ICE is still connecting.

    A viewer that starts from the hub's GOP cache (it joined, or fell behind,
    a stream with ``join = "cached_gop"``) catches up (``ViewerTiming``): its
    frames leave paced, stamped with the live clock, until it has nothing
    left behind; then it is live, and each frame carries its own pts. The
    pacing is this viewer's own wait in its own send loop: the hub and every
    other viewer go on meanwhile.
    """

    kind = "video"

    def __init__(self, hub: PacketHub, name: str) -> None:
        super().__init__()
        self.hub = hub
        self.name = name
        self.subscription: Subscription | None = None
        self.timing = ViewerTiming()

    async def recv(self) -> OutgoingFrame:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        timing = self.timing
        try:
            if self.subscription is None:
                self.subscription = self.hub.subscribe(self.name)
            sub = self.subscription
            if timing.catching_up or sub.replaying:
                delay = timing.wait(sub.replaying, self.hub.bitrate.bps(), time.monotonic())
                await asyncio.sleep(delay)  # 0 too: the other viewers' frames go first
            frame = await sub.get()
        except HubClosed:
            self.stop()
            raise MediaStreamError from None
        now, pacer = time.time(), timing.pacer
        if pacer is None:  # live: how long the fan-out took (a catch-up's frames are old on purpose)
            self.hub.fanout_delay.add(now - frame.published_at)
        newest = self.hub.newest or frame
        timestamp = timing.stamp(
            frame.pts, len(frame.data), newest.pts, now - newest.published_at, sub.behind, time.monotonic(),
            self.hub.bitrate.bps(),
        )  # fmt: skip
        if pacer is not None and not timing.catching_up:
            log.info(
                "stream=%s subscriber=%s caught up from the GOP cache: frames=%d bytes=%d in %.0fms",
                self.hub.stream, self.name, pacer.frames, pacer.bytes, (time.monotonic() - timing.started) * 1000,
            )  # fmt: skip
        return OutgoingFrame(frame, timestamp)

    def stop(self) -> None:
        super().stop()
        if self.subscription is not None:
            self.subscription.close()


def attach_to_sender(sender: RTCRtpSender, hub: PacketHub, batch: bool = True) -> None:
    """Make ``sender`` pack shared frames, route its PLI/FIR to the shared encoder and send per frame
    (``batch``: through the socket batcher, relay.webrtc.udpbatch)."""
    borrowed.attach(sender, SharedPacker(), hub.request_keyframe)
    install(sender, batch)


def h264_preferences() -> list[RTCRtpCodecCapability]:
    """H.264 packetization-mode 1 (best profile first) and its RTX, nothing else."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    h264 = [
        c for c in codecs if c.mimeType.lower() == "video/h264" and str(c.parameters.get("packetization-mode")) == "1"
    ]
    rank = {profile: i for i, profile in enumerate(PREFERRED_PROFILES)}
    h264.sort(key=lambda c: rank.get(c.parameters.get("profile-level-id"), len(rank)))
    rtx = [c for c in codecs if c.mimeType.lower() == "video/rtx"]
    return h264 + rtx


def install(sender: RTCRtpSender, batch: bool = True) -> None:
    """Give ``sender`` the per-frame send loop and the matching retransmission; ``batch``: through the
    socket batcher (relay.webrtc.udpbatch), else a system call per datagram."""
    borrowed.replace_send_loop(sender, _run_rtp, _retransmit)
    sender.__dict__[_SEND] = send_now if batch else send_direct


async def _run_rtp(self: RTCRtpSender, codec) -> None:
    fields = borrowed.SenderFields(self)
    fields.started()
    history: dict[int, tuple[int, int, bool, bytes, int]] = {}
    self.__dict__[_HISTORY] = history
    send = self.__dict__.get(_SEND, send_now)
    sequence = random_sequence_number()
    origin = random32()
    try:
        while True:
            if not fields.track:
                await asyncio.sleep(0.02)
                continue
            frame = await fields.next_frame(codec)
            if frame is None:
                continue
            timestamp = uint32_add(origin, frame.timestamp)
            payloads = frame.payloads
            ntp = clock.current_ntp_time()
            template = RtpPacket(payload_type=codec.payloadType, sequence_number=sequence, timestamp=timestamp)
            template.ssrc = fields.ssrc
            template.extensions.abs_send_time = (ntp >> 14) & 0x00FFFFFF
            template.extensions.mid = fields.mid
            header = bytearray(template.serialize(fields.extensions_map))  # no payload: the header
            dtls = self.transport
            protocol, addr, protect = borrowed.dtls_socket(dtls)
            last = len(payloads) - 1
            sent = octets = 0
            pt = header[1] & 0x7F
            for i, payload in enumerate(payloads):
                header[1] = pt | 0x80 if i == last else pt
                header[2] = sequence >> 8
                header[3] = sequence & 0xFF
                data = protect(bytes(header) + payload)
                send(protocol, data, addr)
                history[sequence % RTP_HISTORY_SIZE] = (sequence, timestamp, i == last, payload, codec.payloadType)
                sent += len(data)
                octets += len(payload)
                sequence = uint16_add(sequence, 1)
            fields.count(ntp, timestamp, octets, len(payloads))
            borrowed.count_dtls_sent(dtls, sent, len(payloads))
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:
        # As aiortc does: the loop must end with rtp_exited set, or stop() hangs.
        log.warning("rtp send loop failed: %s", traceback.format_exc())
    fields.exited()


async def _retransmit(self: RTCRtpSender, sequence_number: int) -> None:
    entry = self.__dict__.get(_HISTORY, {}).get(sequence_number % RTP_HISTORY_SIZE)
    if entry is None or entry[0] != sequence_number:
        return
    fields = borrowed.SenderFields(self)
    sequence, timestamp, marker, payload, payload_type = entry
    self.__dict__[RETRANSMITS] = self.__dict__.get(RETRANSMITS, 0) + 1
    packet = RtpPacket(payload_type=payload_type, marker=int(marker), sequence_number=sequence, timestamp=timestamp)
    packet.ssrc = fields.ssrc
    packet.payload = payload
    packet.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
    packet.extensions.mid = fields.mid
    rtx = fields.rtx_payload_type
    if rtx is not None:
        packet = wrap_rtx(packet, payload_type=rtx, sequence_number=fields.next_rtx_sequence(), ssrc=fields.rtx_ssrc)
    await fields.send_rtp(packet.serialize(fields.extensions_map))

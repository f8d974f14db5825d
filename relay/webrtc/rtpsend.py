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

Here each viewer's sender serializes its header once, with aiortc's own
serializer (``HeaderTemplate``: only the timestamp, and abs-send-time where
it is negotiated (a WHIP publisher's; viewers' answers name none:
``sessions.UNUSED_EXTENSIONS``), change from frame to frame, put in place
per frame; aiortc's serializer per frame was 12 us, 28 us with the playout-delay element, against 3), then copies each
payload beside it into one buffer (one a thread, shared by every sender on it:
they send one frame after another, and it stays in the CPU's cache), patches
the sequence number and marker bit there and SRTP-protects it in place
(``borrowed.SrtpFrameWriter.protect_frame``: one loop, one libsrtp call a
packet and no other call); each run of equal-size packets (``udpbatch.gso_runs``'
rule, worked out in the same loop) leaves that buffer, as a view of it (no
copy), in one segmented write at once (``udpbatch.send_run_at_once``: this
viewer's frame is on its way while the next viewer's is protected), or one
system call a datagram with batching off: no per-packet objects, clock reads
or awaits. Its socket, peer address and SRTP session are looked up once per
ICE pair (``borrowed.DtlsSocket``).

Where the C send path is built (``relay/webrtc/_fastsend.c``, by ``pip
install -e .``; ``C_SEND``, off with ``[webrtc] c_send = false``), all of that
for a frame is one C call (``send_frame``: ``borrowed.SrtpFrameWriter
.send_frame``): the same buffer, the same packets, libsrtp's ``srtp_protect``
from pylibsrtp's own binding on the same session, each run written with one
segmented ``sendmsg`` (one a datagram where segmentation is off) from C, so
no Python runs per packet. It is taken only through the batcher, while the
socket holds nothing back (``Batcher.c_route``); what C cannot write (the
socket's buffer full, segmentation refused, any error) it hands, from that
datagram on, to the batcher's own writer, which queues, falls back and counts
as on the Python path; so a backed-up socket looks the same to the code
below. Where the extension is missing, or C declines a frame (an address by
name, a payload not bytes), the Python path sends it. RTCP sender reports keep their counts
(updated once per frame) and NACKed packets are rebuilt on demand from the
frames sent (``SentFrames``: one entry a frame).

A live viewer's frames do not wait for its send loop at all: while the loop
waits for the next frame with nothing queued, the hub's ``publish`` hands
each frame to the viewer's ``HubTrack`` (``Subscription.push``), which sends
it there and then through the same ``FrameSender``: no task woken per viewer
per frame. It declines (and the frame is queued, and the loop woken, as
before) while the viewer catches up from the GOP cache, while its socket
holds datagrams it could not send yet, and once a send fails; so pacing,
the keyframe wait and the bounded queue with its counted drops work as
without it, and a viewer whose socket backs up never holds up the publish.
Nor does the send loop take a frame while the socket is backed up: the
frames wait in the hub's backlog, whose lag limit bounds them and counts
what a viewer too far behind skips (relay.lag), instead of piling up in
asyncio's datagram buffer, which has no bound.

Where the C send path is on, a live viewer is not sent to alone either: the
hub hands each frame to every subscriber that would take it now in one call
(``PacketHub.batch_push``: ``push_batch``), which sends it to all of them in
one C call (``borrowed.send_batch``). Each sender's C lane
(``FrameSender.lane``, made with the sender) holds what the frame needs
that is this viewer's: its route (bound once per ICE pair, socket and SRTP
session by ``FrameSender.lane_ready``, after a frame it sent alone), header
template, timestamp origin and offset, sequence number, the counts for
sender reports and stats (synced into aiortc's fields when aiortc reads
them: ``borrowed.SYNCED_COUNTS``, exact at every report with no work per
frame) and the frames a NACK may name; the sequence number and the NACK
history are the lane's whichever path sends. A lane that cannot take the
frame now (unbound, its socket or batcher holding anything back, DTLS, the
ICE pair, the SRTP session or the sender not as bound, its timestamp not
advancing) is declined, and its viewer takes the frame through ``_push``
as above; one whose send fails mid-frame leaves the batch for good
(``FrameSender.lane_left``), its frame sent again alone only where C had
protected none of its packets (a protected packet's sequence number is
spent: ``push_batch``). ``[webrtc]
c_batch = false``: one C call a viewer-frame (``send_frame``), the A/B.

The sender's private fields are reached through ``relay.webrtc.borrowed``;
tests/test_aiortc_hooks.py fails if an aiortc upgrade moves them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import struct
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import MediaStreamError, MediaStreamTrack, RTCRtpCodecCapability, RTCRtpSender
from aiortc.rtcrtpsender import random_sequence_number
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket, wrap_rtx
from aiortc.utils import random32, uint32_add

from .. import h264
from ..hub import EncodedFrame, HubClosed, PacketHub, Subscription
from ..logsafe import Throttled
from . import borrowed, reports
from .catchup import ViewerTiming
from .playout import add_elements
from .resend import ResendBudget
from .udpbatch import MAX_GSO_BYTES, MAX_SEGMENTS, batcher_for, send_run_at_once, send_run_direct

log = logging.getLogger(__name__)

# The profile every browser decodes in hardware or software: constrained baseline, level 3.1.
PREFERRED_PROFILES = ("42e01f", "42001f")

_HISTORY = "camrelay_history"
_LANE = "camrelay_lane"  # a sender's C lane (``FrameSender.lane``): what its NACKs may name is there
RETRANSMITS = "camrelay_retransmits"  # NACKed packets sent again, per sender
_RESEND = "camrelay_resend"  # its ResendBudget: what its viewer's NACKs may have sent again
_resend_refused = Throttled(log)
_SEND = "camrelay_send"  # how a sender's datagrams leave: a GSO run a write (udpbatch.send_run_at_once) or one by one
_EXTRA = "camrelay_extensions"  # (id, value) header extensions aiortc does not know, in every packet of a frame

NTP_UNIX_OFFSET = 2_208_988_800  # seconds from the NTP epoch (1900) to the Unix epoch (1970)
# The header a sender makes its template from is serialized twice, its abs-send-time 0 and then all ones: the
# three bytes that differ are where each frame's abs-send-time goes (``HeaderTemplate``).
ABS_SEND_TIME_PROBE = 0xFFFFFF  # abs-send-time is 24 bits (6.18 fixed point seconds)
ABS_SEND_TIME_BYTES = 3
RTP_FIXED_HEADER = 12  # bytes: version to SSRC
_TIMESTAMP = struct.Struct("!I")  # an RTP header's timestamp, at byte 4
# A send loop whose socket is backed up looks again after this long before it takes the next frame: its frames
# wait in the hub's backlog, bounded by the stream's lag limit (relay.lag), not in asyncio's datagram buffer,
# which has no bound. A fraction of a frame's time, and only while backed up.
BACKED_UP_RETRY = 0.005  # seconds
# The C send path (``send_frame``): on where it was built (``borrowed.C_SEND_BUILT``), unless the relay's
# ``[webrtc] c_send`` says off (``use_c_send``, from ``sessions.process_patches``): the benchmarks' A/B.
C_SEND = borrowed.C_SEND_BUILT
C_SEND_ENV = "CAMRELAY_WEBRTC_C_SEND"  # [webrtc] c_send from the environment (relay.config), for the benchmarks
# With the C send path: one C call a published frame for every live viewer of a stream that can take it now
# (``push_batch``), where the viewers' senders' counts are read through their sync (``borrowed.SYNCED_COUNTS``);
# off (``[webrtc] c_batch = false``): one C call a viewer (``send_frame``), the batch's A/B.
C_BATCH = C_SEND
C_BATCH_ENV = "CAMRELAY_WEBRTC_C_BATCH"
# A stream whose C lanes fail (an SRTP error mid-frame) says so at most this often; each such viewer leaves the
# batch and goes on through its own path.
LANE_WARNING_INTERVAL = 1.0  # seconds


def use_c_send(on: bool, batch: bool = True) -> Callable[[], None]:
    """The C send path on (where built) or off in this process, and (``batch``) one C call a frame for every
    viewer of a stream, until the returned undo puts back what was."""
    global C_SEND, C_BATCH
    previous, C_SEND = (C_SEND, C_BATCH), on and borrowed.C_SEND_BUILT
    C_BATCH = C_SEND and batch
    if on and borrowed.C_SEND_STALE:
        log.warning(
            "send path: Python (relay/webrtc/_fastsend was built from an older _fastsend.c: run pip install -e . again)"
        )
    elif on and not borrowed.C_SEND_BUILT:
        log.info("send path: Python (relay/webrtc/_fastsend.c is not built here: pip install -e . builds it)")

    def undo() -> None:
        global C_SEND, C_BATCH
        C_SEND, C_BATCH = previous

    return undo


def ntp_now() -> int:
    """The wall clock as 64-bit NTP time, as aiortc's ``clock.current_ntp_time`` gives it (to the microsecond),
    without its datetime arithmetic: read once per frame per viewer."""
    return ntp_at(time.time_ns())


def ntp_at(unix_ns: int) -> int:
    """64-bit NTP time of ``unix_ns`` (nanoseconds since the Unix epoch), to the microsecond, as aiortc's."""
    seconds, micros = divmod(unix_ns // 1000 + NTP_UNIX_OFFSET * 1_000_000, 1_000_000)
    return (seconds << 32) | ((micros << 32) // 1_000_000)


class SentFrames:
    """The frames a sender sent lately, for retransmitting what a NACK names (sans-io).

    One entry a frame, holding its shared payloads (no per-packet work while
    sending), and at least the last ``packets`` packets, as aiortc's own
    history of ``RTP_HISTORY_SIZE`` packets.
    """

    def __init__(self, packets: int = RTP_HISTORY_SIZE) -> None:
        self.packets = packets
        # (first sequence number, RTP timestamp, payloads, payload type)
        self._frames: collections.deque[tuple[int, int, list[bytes], int]] = collections.deque()
        self._held = 0  # packets in _frames

    def add(self, sequence: int, timestamp: int, payloads: list[bytes], payload_type: int) -> None:
        self._frames.append((sequence, timestamp, payloads, payload_type))
        self._held += len(payloads)
        while self._held - len(self._frames[0][2]) >= self.packets:
            self._held -= len(self._frames.popleft()[2])

    def find(self, sequence: int) -> tuple[int, bool, bytes, int] | None:
        """(timestamp, marker, payload, payload type) of the packet numbered ``sequence``, if still held."""
        for first, timestamp, payloads, payload_type in reversed(self._frames):
            index = (sequence - first) & 0xFFFF
            if index < len(payloads):
                return timestamp, index == len(payloads) - 1, payloads[index], payload_type
        return None


class HeaderTemplateError(ValueError):
    """Two serializations of one sender's header that cannot be a template; ``str()`` says why."""


class HeaderTemplate:
    """One sender's RTP header, serialized once (sans-io): a frame's header differs from it only in its timestamp
    and abs-send-time, and ``SrtpFrameWriter.add`` sets each packet's sequence number and marker. Made from the
    same header serialized twice (``FrameSender``: aiortc's serializer, then any extension aiortc does not know),
    with abs-send-time 0 and ``ABS_SEND_TIME_PROBE``: where they differ is where the abs-send-time lies (nowhere
    for a sender without one: audio)."""

    __slots__ = ("template", "abs_send_time_at")

    def __init__(self, zero: bytes, probe: bytes) -> None:
        if len(zero) < RTP_FIXED_HEADER or zero[0] >> 6 != 2:
            raise HeaderTemplateError("not an RTP version 2 header")
        if len(zero) != len(probe):
            raise HeaderTemplateError(f"the two headers differ in length: {len(zero)} and {len(probe)} bytes")
        differ = [i for i, (a, b) in enumerate(zip(zero, probe, strict=True)) if a != b]
        if differ and (
            len(differ) != ABS_SEND_TIME_BYTES or differ[-1] - differ[0] != ABS_SEND_TIME_BYTES - 1
            or differ[0] < RTP_FIXED_HEADER
        ):  # fmt: skip
            raise HeaderTemplateError(f"the two headers differ at bytes {differ}, not in one abs-send-time")
        if differ and zero[differ[0] : differ[-1] + 1] != bytes(ABS_SEND_TIME_BYTES):
            raise HeaderTemplateError("the first header's abs-send-time is not 0")
        self.template = bytes(zero)
        self.abs_send_time_at = differ[0] if differ else None

    def header(self, timestamp: int, abs_send_time: int) -> bytearray:
        """A frame's header: the template with ``timestamp`` and ``abs_send_time`` (its low 24 bits) in place."""
        header = bytearray(self.template)
        _TIMESTAMP.pack_into(header, 4, timestamp)
        at = self.abs_send_time_at
        if at is not None:
            header[at : at + ABS_SEND_TIME_BYTES] = (abs_send_time & ABS_SEND_TIME_PROBE).to_bytes(3, "big")
        return header


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
        try:  # its NAL units' places, from its worker: no scan
            frame.payloads = (
                None if frame.nals is None else borrowed.packetize_nals(h264.nals_at(frame.data, frame.nals))
            )
        except h264.H264Error:  # places that do not fit it (checked at the pipe; anything else): scanned after all
            frame.payloads = None
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

    Live, its frames are pushed: while its send loop waits with nothing
    queued, the hub hands it each frame as it publishes it (``_push``), and it
    sends it through the loop's ``FrameSender`` at once.
    """

    kind = "video"

    def __init__(self, hub: PacketHub, name: str) -> None:
        super().__init__()
        self.hub = hub
        self.name = name
        self.subscription: Subscription | None = None
        self.timing = ViewerTiming()
        self._pushed = 0  # frames sent by the hub's push one by one (``pushed`` adds the batch's)
        self._sender: FrameSender | None = None  # the send loop's, while it runs: live frames are pushed to it
        self._lane = None  # its sender's C lane, if any: the batch's frames are counted there

    @property
    def pushed(self) -> int:
        """Frames sent by the hub's push, alone or in the stream's batch (the others went through the send loop)."""
        return self._pushed + (self._lane.frames if self._lane is not None else 0)

    def push_to(self, sender: FrameSender | None) -> None:
        """Live frames go straight to ``sender`` as the hub publishes them (None: through ``recv`` only)."""
        self._sender = sender
        if sender is not None and sender.lane is not None:
            self._lane = sender.lane
        if self.subscription is not None:
            self.subscription.push = self._push if sender is not None else None
            self.subscription.lane = None  # in the batch again after a frame pushed alone (``_join_batch``)

    def _pull_timeline(self) -> None:
        """The timeline as the C lane left it: the batch's frames moved its last timestamp."""
        if self._lane is not None:
            self.timing.timeline.last, self.timing.timeline.offset = self._lane.timeline

    def _push_timeline(self) -> None:
        """The lane's timeline as this track's: the frame just stamped here moved it."""
        if self._lane is not None:
            timeline = self.timing.timeline
            self._lane.timeline = (timeline.last, timeline.offset)

    def _join_batch(self, sender: FrameSender) -> None:
        """After a live frame pushed alone: the next ones go with the stream's batch (``push_batch``) if its
        sender's lane can take them (bound, or bound anew here: a new ICE pair, socket or SRTP session)."""
        sub = self.subscription
        if sub is None or not C_BATCH or not sender.lane_ready():
            if sub is not None:
                sub.lane = None
            return
        sub.lane = sender.lane
        if self.hub.batch_push is None:
            self.hub.batch_push = functools.partial(push_batch, self.hub)

    def _push(self, frame: EncodedFrame) -> bool:
        """The hub's synchronous delivery of a live frame, while the send loop waits for one: sent now, with no
        task woken. False: not taken (catching up, the socket backed up, or the send failed), so it goes to the
        queue as before."""
        sender = self._sender
        if sender is None or self.timing.catching_up:
            return False
        self._pull_timeline()
        try:
            payloads = payloads_for(frame)
            if not sender.enabled or not payloads:
                return True  # as aiortc does for a disabled sender, and a frame with nothing to send: dropped
            # A socket that backs up gets its frames through the send loop, whose queue is bounded and counts
            # its drops, never through the hub's publish. (A TURN relay's backlog is not seen here, nor by the
            # send loop: aioice's TURN transport has no write buffer to ask. Known, not yet bounded.)
            timestamp = self.timing.timeline.peek(frame.pts)
            if not sender.send(payloads, timestamp, unless_backed_up=True, shift=timestamp - frame.pts):
                return False
        except Exception as exc:  # never into the hub's publish: the send loop meets it with the next frame
            self.push_to(None)
            if not isinstance(exc, ConnectionError):
                log.warning("stream=%s subscriber=%s push failed: %r", self.hub.stream, self.name, exc)
            return False
        self.timing.timeline.live(frame.pts)
        self._push_timeline()
        self.hub.fanout_delay.add(time.time() - frame.published_at)
        self._pushed += 1
        try:
            self._join_batch(sender)
        except Exception as exc:  # the frame is sent: this viewer stays on its own path, for good, said once
            sender.lane_left = True
            if self.subscription is not None:
                self.subscription.lane = None
            log.warning("stream=%s subscriber=%s cannot join the batch, sent alone: %r", self.hub.stream, self.name,
                        exc)  # fmt: skip
        return True

    async def recv(self) -> OutgoingFrame:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        timing = self.timing
        try:
            if self.subscription is None:
                self.subscription = self.hub.subscribe(self.name)
                self.push_to(self._sender)
            sub = self.subscription
            if timing.catching_up or sub.replaying:
                sub.lane = None  # out of the batch while it catches up: its frames are paced, one by one
                delay = timing.wait(sub.replaying, self.hub.bitrate.bps(), time.monotonic())
                await asyncio.sleep(delay)  # 0 too: the other viewers' frames go first
            frame = await sub.get()
        except HubClosed:
            self.stop()
            raise MediaStreamError from None
        self._pull_timeline()
        now, pacer = time.time(), timing.pacer
        if pacer is None:  # live: how long the fan-out took (a catch-up's frames are old on purpose)
            self.hub.fanout_delay.add(now - frame.published_at)
        newest = self.hub.newest or frame
        bitrate = self.hub.bitrate.bps() if pacer is not None else 0.0  # paces a catch-up alone
        timestamp = timing.stamp(
            frame.pts, len(frame.data), newest.pts, now - newest.published_at, sub.behind, time.monotonic(), bitrate
        )
        self._push_timeline()
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
    borrowed.attach(sender, SharedPacker(), hub.request_keyframe_for_viewer)
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
    """Give ``sender`` the per-frame send loop, the matching retransmission and sender reports sent with every
    other sender's (relay.webrtc.reports); ``batch``: through the socket batcher (relay.webrtc.udpbatch), else a
    system call per datagram."""
    send_run = send_run_at_once if batch else send_run_direct
    borrowed.replace_send_loop(sender, _run_rtp, _retransmit, reports.run_rtcp(send_run))
    sender.__dict__[_SEND] = send_run


def add_header_extension(sender: RTCRtpSender, ext_id: int, value: bytes) -> None:
    """Before it starts, ``sender`` adds header extension ``ext_id`` with ``value`` to every packet of every frame
    (one aiortc does not know, negotiated with ``borrowed.answer_extension``: playout-delay)."""
    sender.__dict__[_EXTRA] = (*sender.__dict__.get(_EXTRA, ()), (ext_id, value))


class FrameSender:
    """One aiortc sender's RTP, a frame at a time: its sequence numbers, timestamp origin, SRTP buffer and the
    frames it sent (for NACKs). Its send loop (``_run_rtp``) and a live viewer's push (``HubTrack``) both
    send through ``send``, on the event loop, one frame after the other."""

    def __init__(self, sender: RTCRtpSender, codec) -> None:
        self.sender = sender
        self.fields = borrowed.SenderFields(sender)
        self.payload_type = codec.payloadType
        self.clock_rate = codec.clockRate  # RTP ticks a second: 90 kHz (H.264), 48 kHz (Opus)
        # What a NACK may name, kept only for a codec whose receiver may send one (video; never Opus)
        nack = any(fb.type == "nack" for fb in codec.rtcpFeedback)
        self.writer = _shared_writer()
        self.send_run = sender.__dict__.get(_SEND, send_run_at_once)
        self.origin = random32()
        # Where the C send path is built, its lane (``borrowed.new_lane``) holds this sender's sequence number and
        # the frames a NACK may name, whichever path sends (the batch, or this sender alone); else these do.
        self.lane = borrowed.new_lane(self.origin, random_sequence_number(), self.clock_rate, RTP_HISTORY_SIZE * nack)
        self._sequence = self.lane.sequence if self.lane is not None else random_sequence_number()
        self.history = SentFrames() if nack and self.lane is None else None
        self.extensions = sender.__dict__.get(_EXTRA, ())  # add_header_extension's
        self.template: HeaderTemplate | None = None  # made at the first frame, once aiortc has set mid and SSRC
        self._socket = borrowed.DtlsSocket(sender.transport)
        borrowed.read_rtcp_at_once(sender.transport)  # its viewer's reports read as they come, not queued
        self._unsync: Callable[[], None] | None = None  # ``borrowed.sync_counts``' release, once the lane is bound
        self._bound = False  # its lane was bound (``lane_ready``): unbound since, it failed in the batch
        # Its lane failed mid-frame in the batch (C unbinds it): this sender's frames go alone from then on, never
        # back into the batch (each frame would fail in C again, be sent again alone, and be said again)
        self.lane_left = False
        sender.__dict__[_HISTORY] = self.history
        sender.__dict__[_LANE] = self.lane

    @property
    def sequence(self) -> int:
        """The next packet's sequence number."""
        return self.lane.sequence if self.lane is not None else self._sequence

    @sequence.setter
    def sequence(self, value: int) -> None:
        if self.lane is not None:
            self.lane.sequence = value
        else:
            self._sequence = value

    def sync(self) -> None:
        """What the batch sent since the last sync into aiortc's counts (sender reports, stats): run before aiortc
        reads them (``borrowed.SYNCED_COUNTS``), and before this sender sends a frame alone."""
        counts = self.lane.take_counts() if self.lane is not None else None
        if counts is not None:
            ntp, timestamp, octets, packets, protected = counts
            self.fields.count(ntp, timestamp, octets, packets)
            borrowed.count_dtls_sent(self.sender.transport, protected, packets)

    def lane_ready(self) -> bool:
        """Whether the batch (``push_batch``) can send this sender's next frame: its lane bound to the current ICE
        pair, socket and SRTP session, and nothing held back; bound anew here if it is not."""
        lane = self.lane
        if lane is None or self.lane_left or self.template is None or not borrowed.SYNCED_COUNTS.installed:
            return False
        if lane.ready():
            return True
        if self._bound and not lane.bound:  # only send_batch unbinds a bound lane: it failed there mid-frame
            self.lane_left = True
            return False
        if self.send_run is not send_run_at_once:
            return False
        try:
            protocol, addr, _ = self.socket()
        except ConnectionError:
            return False
        batcher = batcher_for(protocol)
        route = batcher.c_route() if batcher is not None else None
        if route is None:
            return False
        fd, family, gso = route

        def fallback(data, segment: int, blocked: bool) -> None:
            batcher.write_run(data, segment, addr, blocked)

        self._bound = borrowed.bind_lane(
            lane, self.sender, fd, family, gso, fallback, batcher.lane_guards(gso), batcher.c_written
        )
        if not self._bound:
            return False
        if self._unsync is None:
            self._unsync = borrowed.sync_counts(self.sender, self.sync)
        return lane.ready()

    def close(self) -> None:
        """Its lane unbound (the session and socket let go) and its counts brought in for good."""
        if self.lane is not None:
            self.sync()
            self.lane.unbind()
        if self._unsync is not None:
            self._unsync()
            self._unsync = None

    def _serialize(self, abs_send_time: int) -> bytes:
        """This sender's header as aiortc serializes it (sequence number and timestamp 0), with the extensions it
        does not know."""
        fields = self.fields
        packet = RtpPacket(payload_type=self.payload_type)
        packet.ssrc = fields.ssrc
        packet.extensions.abs_send_time = abs_send_time
        packet.extensions.mid = fields.mid
        header = packet.serialize(fields.extensions_map)
        return add_elements(header, self.extensions) if self.extensions else header

    def header_template(self) -> HeaderTemplate:
        """The header every frame's is made from (``HeaderTemplate``), made on first use."""
        if self.template is None:
            self.template = HeaderTemplate(self._serialize(0), self._serialize(ABS_SEND_TIME_PROBE))
            if self.lane is not None:
                self.lane.set_header(self.template.template, self.template.abs_send_time_at)
        return self.template

    @property
    def enabled(self) -> bool:
        """Whether the sender sends (aiortc drops the frames of a disabled one)."""
        return self.fields.enabled

    def socket(self) -> tuple:
        """Its DTLS transport's socket protocol, peer address and SRTP session (``borrowed.DtlsSocket``, kept per
        transport); ``ConnectionError`` while DTLS or ICE is down."""
        dtls = self.sender.transport
        if self._socket.dtls is not dtls:
            self._socket = borrowed.DtlsSocket(dtls)
        return self._socket.get()

    def backed_up(self) -> bool:
        """Its socket holds datagrams it could not send yet (False while DTLS or ICE is down: ``send`` says so)."""
        try:
            protocol, _, _ = self.socket()
        except ConnectionError:
            return False
        return bool(_backlog(protocol))

    def send(self, payloads: list[bytes], timestamp: int, unless_backed_up: bool = False, shift: int = 0) -> bool:
        """One frame's payloads, ``timestamp`` before the origin; ``ConnectionError`` while DTLS or ICE is down.
        ``unless_backed_up``: not sent (False) while the socket holds datagrams it could not send yet.
        ``shift``: how far this viewer's timestamps run ahead of the capture clock (``RtpTimeline.offset``)."""
        fields = self.fields
        protocol, addr, session = self.socket()
        if unless_backed_up and _backlog(protocol):
            return False
        self.sync()  # the batch's counts first: this frame's are the latest
        # Sender reports pair an RTP timestamp with the capture clock it stands for (the hub's pts are the wall
        # clock at capture, in ticks), not with when it was sent: audio and video then map onto one clock, and a
        # browser syncs them by what was captured together, whatever each one's way here took.
        # A viewer whose catch-up ended late has its timestamps shifted ahead for good; its reports take the
        # shift back out, so they still name the capture time, not a time up to a frame or so later.
        captured = ntp_at((timestamp - shift) * 1_000_000_000 // self.clock_rate)
        timestamp = uint32_add(self.origin, timestamp)
        template = self.template or self.header_template()
        # abs-send-time: the clock read only for a sender that has it (a WHIP publisher's video; no viewer's)
        header = template.header(timestamp, ntp_now() >> 14 if template.abs_send_time_at is not None else 0)
        sequence = self.sequence
        sent = send_frame(self.writer, session, header, payloads, sequence, self.send_run, protocol, addr)
        if self.lane is not None:
            self.lane.remember(sequence, timestamp, payloads)
        elif self.history is not None:
            self.history.add(sequence, timestamp, payloads, self.payload_type)
        self.sequence = (sequence + len(payloads)) & 0xFFFF
        fields.count(captured, timestamp, sum(map(len, payloads)), len(payloads))
        borrowed.count_dtls_sent(self._socket.dtls, sent, len(payloads))
        return True


_writers = threading.local()


def _shared_writer() -> borrowed.SrtpFrameWriter:
    """This thread's frame writer, shared by every sender on it: they send one frame after another, and each run
    leaves (or is copied) before the next is protected; one buffer stays in the CPU's cache, where one a sender
    did not at tens of viewers."""
    writer = getattr(_writers, "writer", None)
    if writer is None:
        writer = _writers.writer = borrowed.SrtpFrameWriter()
    return writer


def _backlog(protocol) -> int:
    """Bytes asyncio holds for ``protocol``'s socket, unsent (the kernel's buffer was full); 0 without a socket."""
    size = getattr(protocol.transport, "get_write_buffer_size", None)
    return size() if size is not None else 0


async def _run_rtp(self: RTCRtpSender, codec) -> None:
    fields = borrowed.SenderFields(self)
    fields.started()
    sender = FrameSender(self, codec)
    pushing: HubTrack | None = None
    try:
        while True:
            track = fields.track
            if not track:
                await asyncio.sleep(0.02)
                continue
            if track is not pushing:
                if pushing is not None:
                    pushing.push_to(None)
                pushing = track if isinstance(track, HubTrack) else None
                if pushing is not None:
                    pushing.push_to(sender)
            while sender.backed_up():  # the next frames wait in the hub's bounded backlog meanwhile
                await asyncio.sleep(BACKED_UP_RETRY)
            frame = await fields.next_frame(codec)
            if frame is None:
                continue
            sender.send(frame.payloads, frame.timestamp, shift=pushing.timing.timeline.offset if pushing else 0)
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:
        # As aiortc does: the loop must end with rtp_exited set, or stop() hangs.
        log.warning("rtp send loop failed: %s", traceback.format_exc())
    if pushing is not None:
        pushing.push_to(None)
    sender.close()
    fields.exited()


def lane_of(sender: RTCRtpSender):
    """``sender``'s C lane (``FrameSender.lane``), once its send loop runs where the C path is built; else None."""
    return sender.__dict__.get(_LANE)


# A stream's batch failures, said at most once a LANE_WARNING_INTERVAL (the rest counted into the next line): by hub,
# let go with it.
_batch_serials = itertools.count(1)  # push_batch's calls: a lane keeps the last that took it (``Lane.batch``)
_lane_warnings: weakref.WeakKeyDictionary[PacketHub, Throttled] = weakref.WeakKeyDictionary()


def push_batch(hub: PacketHub, frame: EncodedFrame, subs: list[Subscription]) -> list[int]:
    """The hub's batch push (``PacketHub.batch_push``): ``frame`` to every viewer of ``subs`` (live, each with its
    sender's C lane) in one C call (``borrowed.send_batch``); the indices of those it did not send to, which the hub
    offers their own way (``HubTrack._push``: backed up, DTLS down, disabled, their timestamp would not advance).
    A lane that fails mid-frame leaves the batch for good (``FrameSender.lane_left``: its viewer's next frames go
    alone), said once a second a stream; its frame is offered its own way too unless C had protected some of its
    packets (their sequence numbers spent: sent again it would reach the viewer twice, numbered anew), in which case
    the frame is the lane's, and what did not leave is answered to the viewer's NACKs from the lane's history. Never
    raises: where the C call does, the viewers it sent the frame to are taken (a lane counts its frames) and the
    others are offered it their own way."""
    payloads = payloads_for(frame)
    if not C_BATCH:  # turned off since they joined (the benchmarks' A/B): each alone from now on
        for sub in subs:
            sub.lane = None
        return list(range(len(subs)))
    if not payloads:
        return list(range(len(subs)))  # each drops it as it would alone
    lanes = [sub.lane for sub in subs]
    serial = next(_batch_serials)
    try:
        declined, failed, delays = borrowed.send_batch(
            _shared_writer(), lanes, payloads, frame.pts, frame.published_at, MAX_SEGMENTS, MAX_GSO_BYTES, -1, serial
        )
    except Exception as exc:  # a MemoryError in C, a failure after it: a frame sent twice would corrupt the picture
        declined = [i for i, lane in enumerate(lanes) if lane.batch != serial]
        _warn_lanes(hub, "stream=%s viewers=%d batch send failed, not sent to viewers=%d: %r", len(subs),
                    len(declined), exc)  # fmt: skip
        return declined
    if failed:
        for i, _, _ in failed:
            subs[i].lane = None
        declined = sorted([*declined, *(i for i, _, taken in failed if not taken)])
    try:  # nothing raised from here on: the frame is sent, and the hub would offer it again
        hub.fanout_delay.extend(delays)
        if failed:
            i, exc, taken = failed[0]
            _warn_lanes(hub, "stream=%s viewers=%d left the batch, sent alone from now on: subscriber=%s taken=%s %r",
                        len(failed), subs[i].name, taken, exc)  # fmt: skip
    except Exception as exc:
        log.warning("stream=%s batch bookkeeping failed: %r", hub.stream, exc)
    return declined


def _warn_lanes(hub: PacketHub, message: str, *args: object) -> None:
    """A batch's failure said at most once a ``LANE_WARNING_INTERVAL`` a stream (``logsafe.Throttled``)."""
    throttled = _lane_warnings.get(hub)
    if throttled is None:
        throttled = _lane_warnings[hub] = Throttled(log, LANE_WARNING_INTERVAL)
    throttled.warn(message, hub.stream, *args)


def send_frame(
    writer: borrowed.SrtpFrameWriter,
    session,
    header: bytes,
    payloads: list[bytes],
    sequence: int,
    send_run,
    protocol,
    addr: tuple,
) -> int:
    """Protect a frame's packets (``header`` with each payload, numbered from ``sequence``, the marker on the last)
    with ``session`` into ``writer`` and hand each GSO run to ``send_run(protocol, data, segment, addr)``; the
    bytes sent. Through the batcher (``send_run_at_once``) and ``C_SEND`` on, while the socket holds nothing
    back, the whole frame is one C call (``writer.send_frame``) that writes the runs itself and hands
    ``send_run`` only what it could not write; else, or where C declines, the Python path
    (``writer.protect_frame``)."""

    def emit(data, segment: int, blocked: bool = False) -> None:
        if blocked:  # C met a full socket buffer: to the batcher's queue untried (send_run_at_once's batcher)
            batcher.write_run(data, segment, addr, True)
        else:
            send_run(protocol, data, segment, addr)

    batcher = None

    if C_SEND and send_run is send_run_at_once:
        batcher = batcher_for(protocol)
        route = batcher.c_route() if batcher is not None else None
        if route is not None:
            fd, family, gso = route
            try:
                done = writer.send_frame(
                    session, header, payloads, sequence, fd, family, addr, gso, emit, MAX_SEGMENTS, MAX_GSO_BYTES
                )
            except BaseException as exc:  # what C wrote before it is counted all the same
                batcher.written_from_c(*getattr(exc, "camrelay_written", (0, 0)), frame=False)
                raise
            if done is not None:
                sent, datagrams, syscalls = done
                batcher.written_from_c(datagrams, syscalls)
                return sent
    return writer.protect_frame(session, header, payloads, sequence, emit, MAX_SEGMENTS, MAX_GSO_BYTES)


def resend_budget(sender: RTCRtpSender, budget: ResendBudget | None = None) -> ResendBudget:
    """What ``sender``'s viewer's NACKs may have sent again (``budget`` from now on, if given: tests' clocks)."""
    if budget is not None:
        sender.__dict__[_RESEND] = budget
    return sender.__dict__.get(_RESEND) or sender.__dict__.setdefault(_RESEND, ResendBudget())


async def _retransmit(self: RTCRtpSender, sequence_number: int) -> None:
    budget = resend_budget(self)
    fields = borrowed.SenderFields(self)
    hub = getattr(fields.track, "hub", None)  # its stream's, for the counts
    if not budget.allow(sequence_number):  # a NACK flood: held to the viewer's budget
        if hub is not None:
            hub.retransmits_refused += 1
        _resend_refused.warn("a viewer's NACKs past its resend budget (ssrc=%d): %d packets not sent again so far",
                             fields.ssrc, budget.refused)  # fmt: skip
        return
    lane, history = self.__dict__.get(_LANE), self.__dict__.get(_HISTORY)
    source = lane if lane is not None else history
    found = source.find(sequence_number) if source is not None else None
    if found is None:
        return
    timestamp, marker, payload, payload_type = found
    self.__dict__[RETRANSMITS] = self.__dict__.get(RETRANSMITS, 0) + 1
    if hub is not None:
        hub.retransmits += 1
    packet = RtpPacket(
        payload_type=payload_type, marker=int(marker), sequence_number=sequence_number, timestamp=timestamp
    )
    packet.ssrc = fields.ssrc
    packet.payload = payload
    packet.extensions.abs_send_time = (ntp_now() >> 14) & 0x00FFFFFF
    packet.extensions.mid = fields.mid
    rtx = fields.rtx_payload_type
    if rtx is not None:
        packet = wrap_rtx(packet, payload_type=rtx, sequence_number=fields.next_rtx_sequence(), ssrc=fields.rtx_ssrc)
    await fields.send_rtp(packet.serialize(fields.extensions_map))

"""Sources: where frames come from.

A source is opened, read in a loop on a capture thread, and closed. Every read
returns a ``CapturedFrame`` stamped with its capture time. MJPEG sources (USB
cameras, capture cards, the test pattern) hand over the JPEG bytes exactly as
the device delivered them, for snapshots and MJPEG over HTTP; other sources
(RTSP cameras, files) hand over decoded pictures. Sources that demux a
container (``PacketSource``: RTSP cameras, files, UVC cameras in H.264) also
hand over their packets undecoded, for passthrough; ``codec`` says what they
carry, before anything is decoded.

``open_source`` opens what a spec names (``relay.source``): a new kind of
source is a class here and a kind there.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..logsafe import redact_text, redact_url
from ..source import SourceSpec, parse_faults

if TYPE_CHECKING:
    import av  # imported where a source decodes or demuxes: a passed-through RTSP camera's worker never loads it

    from .cameraaudio import AudioTap, TrackFormat
    from .testpattern import PatternRenderer

log = logging.getLogger(__name__)

# V4L2 keeps its own ring of buffers; anything queued in front of it only
# adds latency, so ask FFmpeg's demuxer for no probing and no extra buffering.
V4L2_OPTIONS = {"input_format": "mjpeg", "fflags": "nobuffer", "probesize": "32", "analyzeduration": "0"}
# A UVC camera's own H.264 (a Logitech C920's, say): the same, in FFmpeg's name for it.
V4L2_H264_OPTIONS = {**V4L2_OPTIONS, "input_format": "h264"}
# RTSP in with the least delay: no input buffering, and over TCP (which never reorders) no reorder queue;
# "timeout" is the socket I/O timeout in microseconds, so a camera that hangs mid-stream errors out. No
# probing: the codec and its parameter sets come with the SDP, the worker reads the SPS itself
# (relay/h264.py), and FFmpeg's probe held the stream 1 to 3 s at every open (measured with a 1080p camera:
# 0.06 s to open without it).
RTSP_INPUT = {
    "fflags": "nobuffer",
    "flags": "low_delay",
    "timeout": "5000000",
    "analyzeduration": "0",
    "probesize": "32",
}
RTSP_OPTIONS = {**RTSP_INPUT, "rtsp_transport": "tcp", "reorder_queue_size": "0"}
# Over UDP (a spec's #transport=udp) packets may arrive out of order: FFmpeg's default reorder queue stays.
RTSP_UDP_OPTIONS = {**RTSP_INPUT, "rtsp_transport": "udp"}
OPEN_TIMEOUT = 10.0  # seconds to connect, DESCRIBE and probe the stream
# A read from a camera that hangs mid-stream ends with RTSP's socket timeout ("timeout" above, 5 s), not
# PyAV's read timeout: that one calls back into Python at every I/O, +0.1 % of a core for one 1080p camera
# (benchmarks/passthrough.py). A device or file that hangs is the stall watch's (relay/camera/worker.py).
READ_TIMEOUT = None


class SourceError(Exception):
    """A source could not be opened or stopped delivering frames."""


class UseDemuxer(SourceError):
    """Raised by ``open()`` of a source that cannot read what the camera sends (camrelay's RTSP client and a
    camera that sends H.265, say): ``fallback`` makes the source that can (FFmpeg's demuxer), not yet open."""

    def __init__(self, reason: str, fallback: Callable[[], PacketSource]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fallback = fallback


@dataclass(slots=True)
class CapturedFrame:
    capture_time: float  # wall clock, time.time(), when the picture was taken
    jpeg: bytes | None = None  # the JPEG as the device delivered it (MJPEG sources)
    picture: av.VideoFrame | None = None  # a decoded picture (other sources)


class Source(Protocol):
    """Blocking; used from one capture thread only."""

    width: int
    height: int
    fps: float
    codec: str  # what it delivers: "test pattern", "mjpeg"
    reader: str  # what reads it, for the status: "test pattern", "ffmpeg", "rtspin" (relay.camera.rtspsource)

    def open(self) -> None: ...

    def read(self) -> CapturedFrame: ...

    def close(self) -> None: ...


# When each simulated camera may be opened again, and how many faults it has
# had (keyed by its spec); per process, because the worker opens a new source
# object for every retry.
_DOWN_UNTIL: dict[str, float] = {}
_FAULTS_DONE: dict[str, int] = {}


class TestPatternSource:
    """The synthetic MJPEG camera, paced to its frame rate by the wall clock."""

    codec = "test pattern"
    reader = "test pattern"

    def __init__(self, width: int, height: int, fps: float, label: str = "test", faults: str = "") -> None:
        self.width, self.height, self.fps = width, height, fps
        self._label = label
        self._renderer: PatternRenderer | None = None
        self._next = 0.0
        self._stop = threading.Event()
        self._faults = parse_faults(faults) if faults else None
        self._fault_key = f"{label}?{faults}"
        self._frames = 0

    def open(self) -> None:
        if self._faults and time.monotonic() < _DOWN_UNTIL.get(self._fault_key, 0.0):
            raise SourceError("simulated camera is unplugged")
        from .testpattern import PatternRenderer  # numpy: imported by the workers that draw only

        self._renderer = PatternRenderer(self.width, self.height, self._label)
        self._next = time.monotonic()

    def read(self) -> CapturedFrame:
        if self._renderer is None:
            raise SourceError("test pattern is not open")
        if self._faults:
            self._misbehave()
        delay = self._next - time.monotonic()
        if delay > 0:
            if self._stop.wait(delay):
                raise SourceError("test pattern closed")
        else:
            # Fell behind (a busy machine): skip the missed slots rather than burst.
            self._next = time.monotonic() + delay % (1.0 / self.fps)
        self._next += 1.0 / self.fps
        now = time.time()
        jpeg = self._renderer.jpeg(int(now * 1000))
        self._frames += 1
        if self._faults and self._faults["fault"] == "corrupt" and self._frames % int(self._faults["every"]) == 0:
            jpeg = jpeg[: len(jpeg) // 2]
        return CapturedFrame(now, jpeg=jpeg)

    def _misbehave(self) -> None:
        f = self._faults
        assert f is not None
        if self._frames < f["after"]:
            return
        done = _FAULTS_DONE.get(self._fault_key, 0)
        if f["times"] and done >= f["times"]:
            return
        _FAULTS_DONE[self._fault_key] = done + 1
        if f["fault"] == "die":
            _DOWN_UNTIL[self._fault_key] = time.monotonic() + float(f["down"])
            raise SourceError("simulated camera unplugged")
        if f["fault"] == "hang":
            self._frames = 0  # after the hang, misbehave again later
            if self._stop.wait(float(f["down"])):
                raise SourceError("test pattern closed")
            self._next = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._renderer = None


class PacketSource:
    """A container FFmpeg demuxes: an RTSP camera, a video file (looped), a UVC camera in H.264.

    ``read_packet()`` hands over the camera's packets undecoded (passthrough);
    ``read()`` decodes them (transcoding). Blocking, from the capture thread.
    """

    reader = "ffmpeg"

    def __init__(
        self,
        url: str,
        width: int,
        height: int,
        fps: float,
        *,
        loop: bool = False,
        options: dict[str, str] | None = None,
        format: str | None = None,
        audio: AudioTap | None = None,
    ) -> None:
        self.url = url
        self.width, self.height, self.fps = width, height, fps
        self.codec = ""  # FFmpeg's name for what the source carries (h264, hevc, mjpeg), once open
        self.extradata = b""  # the decoder's setup: avcC from MP4 and MKV, Annex B SPS/PPS (sprop) from RTSP
        self.time_base = 0.0  # seconds per tick of packet.pts
        self._loop = loop
        self._options = options or {}
        self._format = format
        self._container: av.container.InputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._packets = None
        self._pending: collections.deque[av.Packet] = collections.deque()  # read ahead while probing
        self._frames: collections.deque[av.VideoFrame] = collections.deque()
        self._next = 0.0
        self._stop = threading.Event()
        self._owner: int | None = None  # the thread that opened it, and alone may close it
        self._tap = audio  # where its sound goes, when the stream carries it
        self._audio: av.AudioStream | None = None  # its first audio stream, once open, when there is a tap
        self._audio_format: TrackFormat | None = None
        self._audio_clock = SourceClock()  # the sound's own timestamps on the wall clock, as the video's are

    @property
    def name(self) -> str:
        return redact_url(self.url)  # for errors and logs: never a camera's password

    def open(self) -> None:
        import av

        self._owner = threading.get_ident()
        try:
            self._container = av.open(
                self.url, format=self._format, options=self._options, timeout=(OPEN_TIMEOUT, READ_TIMEOUT)
            )
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.name}: {redact_text(str(exc), self.url)}") from exc
        if not self._container.streams.video:
            raise SourceError(f"{self.name} has no video stream")
        self._stream = self._container.streams.video[0]
        ctx = self._stream.codec_context
        self.width, self.height = ctx.width or self.width, ctx.height or self.height
        self.codec = ctx.name
        self.extradata = bytes(ctx.extradata or b"")
        self.time_base = float(self._stream.time_base or 0)
        rate = self._stream.average_rate or self._stream.guessed_rate
        if rate and 1 <= float(rate) <= 120 and self._loop:
            self.fps = float(rate)  # a file plays at its own rate
        if self._tap is not None and self._container.streams.audio:
            self._open_audio(self._container.streams.audio[0])
        if self._tap is not None:
            self._tap.opened(self._audio is not None)
        self._packets = self._demux()
        self._next = time.monotonic()

    def _open_audio(self, stream: av.AudioStream) -> None:
        from .cameraaudio import TrackFormat

        ctx = stream.codec_context
        self._audio = stream
        self._audio_format = TrackFormat(ctx.name, ctx.sample_rate, ctx.channels, bytes(ctx.extradata or b""))
        log.info("%s: sound %s %d Hz %d ch", self.name, ctx.name, ctx.sample_rate, ctx.channels)

    def _demux(self):  # noqa: ANN202 (PyAV's packet iterator)
        assert self._container is not None
        return self._container.demux(*(s for s in (self._stream, self._audio) if s is not None))

    def _audio_in(self, packet: av.Packet) -> None:
        """A packet of its sound to the tap, stamped on the capture clock: no decode on the capture thread."""
        from ..rtpaudio import opus_samples
        from ..rtspin import RtspError
        from .cameraaudio import TapFrame

        fmt, tap = self._audio_format, self._tap
        assert fmt is not None and tap is not None
        data = bytes(packet)
        base = packet.time_base or 0
        try:
            samples = opus_samples(data) if fmt.codec == "opus" else round((packet.duration or 0) * base * fmt.rate)
        except RtspError:
            tap.packets_dropped += 1
            return
        seconds = None if packet.pts is None else float(packet.pts * base)
        tap.put(TapFrame(fmt, data, self._audio_clock.wall_time(seconds, time.time()), samples))

    def read_packet(self) -> av.Packet:
        """The next packet of the video stream, as the source sent it."""
        import av

        if self._stop.is_set():
            raise SourceError(f"{self.name} closed")
        if self._pending:
            return self._pending.popleft()
        if self._container is None or self._packets is None:
            raise SourceError(f"{self.name} is not open")
        try:
            packet = next(self._packets)
            while packet.size == 0 or packet.stream.type != "video":  # end-of-stream markers; its sound
                if packet.size and self._audio is not None:
                    self._audio_in(packet)
                packet = next(self._packets)
        except StopIteration:
            if not self._loop:
                raise SourceError(f"{self.name} ended") from None
            self._container.seek(0)
            self._packets = self._demux()
            return self.read_packet()
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"{self.name} stopped delivering frames: {redact_text(str(exc), self.url)}") from exc
        if self._loop:  # a file plays at its rate, not as fast as it is read
            delay = self._next - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                raise SourceError("file source closed")
            self._next = max(self._next + 1.0 / self.fps, time.monotonic() - 1.0)
        return packet

    def unread(self, packets: list[av.Packet]) -> None:
        """Packets read ahead (to decide passthrough or not) that the next reads give back first."""
        self._pending.extendleft(reversed(packets))

    def read(self) -> CapturedFrame:
        """The next decoded picture."""
        import av

        assert self._stream is not None
        while not self._frames:
            packet = self.read_packet()
            try:
                self._frames.extend(self._stream.codec_context.decode(packet))
            except av.FFmpegError as exc:
                log.debug("%s: undecodable packet: %s", self.name, exc)
        picture = self._frames.popleft()
        picture.pts = None
        return CapturedFrame(time.time(), picture=picture)

    def close(self) -> None:
        """From the thread that reads it: closed now. From any other (a stalled camera, the worker stopping):
        its read ends (the next packet, or RTSP's socket timeout) and its own thread closes it (FFmpeg's
        demuxer closed under a read that is still running deadlocks)."""
        self._stop.set()
        if self._owner not in (None, threading.get_ident()):
            return
        if self._container is not None:
            self._container.close()
            self._container = None
            self._packets = None
            self._pending.clear()
            self._frames.clear()


class V4L2Source:
    """A USB camera or HDMI capture card, read as MJPEG with PyAV's v4l2 input."""

    codec = "mjpeg"
    reader = "ffmpeg"

    def __init__(self, device: str, width: int, height: int, fps: float) -> None:
        self.device = device
        self.width, self.height, self.fps = width, height, fps
        self._container: av.container.InputContainer | None = None

    def open(self) -> None:
        import av

        options = dict(V4L2_OPTIONS, video_size=f"{self.width}x{self.height}", framerate=f"{self.fps:g}")
        try:
            self._container = av.open(self.device, format="video4linux2", options=options)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.device}: {exc}") from exc
        stream = self._container.streams.video[0]
        self.width = stream.codec_context.width or self.width
        self.height = stream.codec_context.height or self.height

    def read(self) -> CapturedFrame:
        import av

        if self._container is None:
            raise SourceError(f"{self.device} is not open")
        try:
            packet = next(self._container.demux(video=0))
        except (av.FFmpegError, OSError, StopIteration) as exc:
            raise SourceError(f"{self.device} stopped delivering frames: {exc}") from exc
        # The kernel's buffer timestamp would be better, but it is on the
        # monotonic clock; the time we receive it is within a few ms of it.
        return CapturedFrame(time.time(), jpeg=bytes(packet))

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


# A source's own timestamps that step this far (seconds) from one frame to the next, or back at all, are a new
# timeline (a file looping, a camera's clock reset), as are timestamps this far ahead of the wall clock: the
# mapping starts again from now.
CLOCK_RESYNC = 1.0
# A source that falls behind the wall clock keeps its own spacing up to this lag (seconds): a network stall
# and its backlog, a camera or a link slower than real time. Re-anchoring there made a jump in the viewers' RTP
# time that a receiver counts as lost frames (a second's worth each time) although none was; mediamtx passes
# a camera's timestamps through untouched. Past this, the mapping starts again so it never drifts for good.
CLOCK_MAX_LAG = 30.0
# A lag that lasts (the least lag over a window of the source's own time: a backlog drains within it, a slow
# clock does not) is taken back gently instead: each frame's step is stretched by this fraction until the lag
# is under CLOCK_LAG_KEPT. A camera clock a few hundred ppm slow (weeks to reach CLOCK_MAX_LAG) never jumps.
CLOCK_SLEW = 0.05
CLOCK_LAG_WINDOW = 10.0  # seconds of the source's time
CLOCK_LAG_KEPT = 0.5  # seconds of lasting lag left alone


class SourceClock:
    """A source's own timestamps on the wall clock: frames keep the spacing the camera gave them (not the
    jitter of the network that brought them, nor its delays), anchored at the wall clock and anchored again
    when the source's timeline jumps, runs ahead of the wall clock, or falls more than ``max_lag`` behind; a
    lag that lasts is taken back a little each frame (``CLOCK_SLEW``)."""

    def __init__(self, resync: float = CLOCK_RESYNC, max_lag: float = CLOCK_MAX_LAG) -> None:
        self._resync = resync
        self._max_lag = max_lag
        self._anchor: tuple[float, float] | None = None  # (source seconds, wall clock) of the anchor frame
        self._last = 0.0  # the source seconds of the frame before
        self._window = (0.0, 0.0)  # (source seconds it began, least lag in it so far)
        self._lasting = 0.0  # lag still to take back: the least of the last whole window, less what was
        self.anchors = 0  # times the mapping started (again): the first frame, then every jump

    def wall_time(self, source_seconds: float | None, now: float) -> float:
        """When a frame with timestamp ``source_seconds`` (None: the source gave none) was taken, received ``now``."""
        if source_seconds is None:
            return now
        step, self._last = source_seconds - self._last, source_seconds
        if self._anchor is not None and 0 <= step <= self._resync:
            t = self._anchor[1] + source_seconds - self._anchor[0]
            if -self._max_lag <= t - now <= self._resync:
                return self._slew(t, now, source_seconds, step)
        self._anchor = (source_seconds, now)
        self._window, self._lasting = (source_seconds, 0.0), 0.0
        self.anchors += 1
        return now

    def map(self, source_seconds: float) -> float | None:
        """Where the mapping puts ``source_seconds`` now, changing nothing (another track's time, put on this
        one's clock); None before its first frame."""
        if self._anchor is None:
            return None
        return self._anchor[1] + source_seconds - self._anchor[0]

    def _slew(self, t: float, now: float, source_seconds: float, step: float) -> float:
        began, least = self._window
        least = min(least, now - t)
        if source_seconds - began >= CLOCK_LAG_WINDOW:
            self._lasting, (began, least) = least, (source_seconds, now - t)
        self._window = (began, least)
        lag = now - t
        if self._lasting > CLOCK_LAG_KEPT and lag > CLOCK_LAG_KEPT:  # lasting, and not caught up since
            shift = min(step * CLOCK_SLEW, self._lasting - CLOCK_LAG_KEPT, lag - CLOCK_LAG_KEPT)
            self._lasting -= shift
            assert self._anchor is not None
            self._anchor = (self._anchor[0], self._anchor[1] + shift)
            t += shift
        return t


def open_source(
    spec: SourceSpec,
    width: int,
    height: int,
    fps: float,
    label: str,
    h264_device: bool = False,
    audio: AudioTap | None = None,
) -> Source | PacketSource:
    """A source for ``spec``; sizes in the spec win over the defaults given. ``h264_device``: a V4L2 camera
    is read in its own H.264 (for passthrough), not MJPEG. An RTSP camera over TCP is read by camrelay's
    own client (``RtspSource``), whose ``open()`` raises ``UseDemuxer`` when the camera sends anything but
    H.264 (or a DESCRIBE it cannot read): FFmpeg's demuxer then reads it as before. ``audio``: where an RTSP
    camera's sound goes, when the stream carries it (``relay.camera.cameraaudio``)."""
    width, height = spec.width or width, spec.height or height
    fps = spec.fps or fps
    if spec.kind == "test":
        return TestPatternSource(width, height, fps, label, spec.target)
    if spec.kind == "v4l2":
        if h264_device:
            options = dict(V4L2_H264_OPTIONS, video_size=f"{width}x{height}", framerate=f"{fps:g}")
            return PacketSource(spec.target, width, height, fps, options=options, format="video4linux2")
        return V4L2Source(spec.target, width, height, fps)
    if spec.kind == "rtsp":
        options = RTSP_UDP_OPTIONS if spec.transport == "udp" else RTSP_OPTIONS
        demuxed = functools.partial(PacketSource, spec.target, width, height, fps, options=options, audio=audio)
        if spec.transport == "udp" or not spec.target.startswith("rtsp://"):
            return demuxed()  # RTP over UDP, RTSP over TLS: FFmpeg's
        from .rtspsource import RtspSource  # it imports this module

        return RtspSource(spec.target, width, height, fps, fallback=demuxed, audio=audio)
    if spec.kind == "file":
        return PacketSource(spec.target, width, height, fps, loop=True, audio=audio)
    raise ValueError(f"unknown source kind {spec.kind!r}")

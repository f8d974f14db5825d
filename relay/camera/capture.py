"""Sources: where frames come from.

A source is opened, read in a loop on a capture thread, and closed. Every read
returns a ``CapturedFrame`` stamped with its capture time. MJPEG sources (USB
cameras, capture cards, the test pattern) hand over the JPEG bytes exactly as
the device delivered them, for snapshots and MJPEG over HTTP; other sources
(RTSP cameras, files) hand over decoded pictures.

``open_source`` opens what a spec names (``relay.source``): a new kind of
source is a class here and a kind there.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import av

from ..logsafe import redact_text, redact_url
from ..source import SourceSpec, parse_faults
from .testpattern import PatternRenderer

log = logging.getLogger(__name__)

# V4L2 keeps its own ring of buffers; anything queued in front of it only
# adds latency, so ask FFmpeg's demuxer for no probing and no extra buffering.
V4L2_OPTIONS = {"input_format": "mjpeg", "fflags": "nobuffer", "probesize": "32", "analyzeduration": "0"}
RTSP_OPTIONS = {"rtsp_transport": "tcp", "fflags": "nobuffer", "flags": "low_delay", "timeout": "5000000"}


class SourceError(Exception):
    """A source could not be opened or stopped delivering frames."""


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


class V4L2Source:
    """A USB camera or HDMI capture card, read as MJPEG with PyAV's v4l2 input."""

    def __init__(self, device: str, width: int, height: int, fps: float) -> None:
        self.device = device
        self.width, self.height, self.fps = width, height, fps
        self._container: av.container.InputContainer | None = None

    def open(self) -> None:
        options = dict(V4L2_OPTIONS, video_size=f"{self.width}x{self.height}", framerate=f"{self.fps:g}")
        try:
            self._container = av.open(self.device, format="video4linux2", options=options)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.device}: {exc}") from exc
        stream = self._container.streams.video[0]
        self.width = stream.codec_context.width or self.width
        self.height = stream.codec_context.height or self.height

    def read(self) -> CapturedFrame:
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


class DecodedSource:
    """An RTSP camera or a video file (looped), decoded on the capture thread."""

    def __init__(self, url: str, width: int, height: int, fps: float, *, loop: bool, options: dict[str, str]) -> None:
        self.url = url
        self.width, self.height, self.fps = width, height, fps
        self._loop = loop
        self._options = options
        self._container: av.container.InputContainer | None = None
        self._frames = None
        self._next = 0.0
        self._stop = threading.Event()

    def open(self) -> None:
        try:
            self._container = av.open(self.url, options=self._options, timeout=10)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {redact_url(self.url)}: {redact_text(str(exc), self.url)}") from exc
        if not self._container.streams.video:
            raise SourceError(f"{redact_url(self.url)} has no video stream")
        ctx = self._container.streams.video[0].codec_context
        self.width, self.height = ctx.width or self.width, ctx.height or self.height
        self._frames = self._container.decode(video=0)
        self._next = time.monotonic()

    def read(self) -> CapturedFrame:
        if self._container is None or self._frames is None:
            raise SourceError(f"{redact_url(self.url)} is not open")
        try:
            picture = next(self._frames)
        except StopIteration:
            if not self._loop:
                raise SourceError(f"{redact_url(self.url)} ended") from None
            self._container.seek(0)
            self._frames = self._container.decode(video=0)
            return self.read()
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(
                f"{redact_url(self.url)} stopped delivering frames: {redact_text(str(exc), self.url)}"
            ) from exc
        if self._loop:  # a file plays at its configured rate, not as fast as it decodes
            delay = self._next - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                raise SourceError("file source closed")
            self._next = max(self._next + 1.0 / self.fps, time.monotonic() - 1.0)
        picture.pts = None
        return CapturedFrame(time.time(), picture=picture)

    def close(self) -> None:
        self._stop.set()
        if self._container is not None:
            self._container.close()
            self._container = None
            self._frames = None


def open_source(spec: SourceSpec, width: int, height: int, fps: float, label: str) -> Source:
    """A source for ``spec``; sizes in the spec win over the defaults given."""
    width, height = spec.width or width, spec.height or height
    fps = spec.fps or fps
    if spec.kind == "test":
        return TestPatternSource(width, height, fps, label, spec.target)
    if spec.kind == "v4l2":
        return V4L2Source(spec.target, width, height, fps)
    if spec.kind == "rtsp":
        return DecodedSource(spec.target, width, height, fps, loop=False, options=RTSP_OPTIONS)
    if spec.kind == "file":
        return DecodedSource(spec.target, width, height, fps, loop=True, options={})
    raise ValueError(f"unknown source kind {spec.kind!r}")
